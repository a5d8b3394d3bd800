"""LP-FT under DP (issue 29, item 2): the DP-GLM (linear probe) first, then LoRA adapters on top of it by DP-SGD.

Each simulated site has one budget, epsilon per patient (default 8, delta 1e-5), split between two phases:

1. the product's DP-GLM federation (`client.site.train_round`, `architecture=glm`), `--glm-rounds` rounds of
   `glm-steps` full-batch Gaussian steps, its noise planned by the site's ledger with the run capped at s * epsilon
   (`max_epsilon_per_run`, the product's own cap);
2. the compact LoRA model (`architecture=compact`) trained by patient-level DP-SGD (`common.privacy.make_private`,
   per-layer clipping, the product's dp-lr and batch size) for `--lora-rounds` rounds, as a residual on the frozen
   probe: logit = GLM(features) + compact(x). The compact model's output layers (heads and auxiliary heads) start at
   zero, so phase 2 starts exactly at the probe; the auxiliary per-branch losses are off (a residual branch is not
   meant to predict alone). Its noise is planned by the same ledger for the rest of the budget: the ledger composes
   phase 1's full-batch steps with phase 2's subsampled ones by PLD (`common.privacy.epsilon_of`), and every site's
   total is asserted to be at most epsilon.

s = 1.0 is the DP-GLM alone (phase 2 skipped). The server is an in-process FedAvg over the six sites, weighted by
each site's declared training patients (as the product's strategy). After every round the global model is scored on
the pooled validation split; the pooled test split is scored once at the end. Choose s on validation only.

    python benchmarks/lp_ft.py run --data data/cohort --split 0.5 --draw 0 --out runs/lp-ft   # one (s, draw); appends
    python benchmarks/lp_ft.py report --out runs/lp-ft --figure docs/figures/lp_ft.png          # table and curve

Every `run` appends one line to OUT/results.jsonl; `report` averages over the noise draws it finds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from edfed.client.site import (
    _SITE_DATA,
    SITE_CACHE,
    SiteSettings,
    _cache_key,
    declared_train_units,
    dp_rng_seed,
    noise_source,
    simulated_declaration,
    site_dataset,
    train_round,
)
from edfed.common.config import TrainConfig
from edfed.common.contract import OUTCOMES
from edfed.common.data import VisitDataset, site_files
from edfed.common.files import atomic_write, private_dir
from edfed.common.metrics import evaluate
from edfed.common.model import OutcomeModel, _transformer_layers, build_model, per_example_loss
from edfed.common.precision import autocast, cpu_name
from edfed.common.privacy import PrivacyLedger, make_private
from edfed.common.train import glm_rows, make_optimizer, predict, train_epoch

LORA_RUN, GLM_RUN = "lp-ft-lora", "lp-ft-glm"


class OffsetDataset:
    """A site's visits for the compact model, each with the frozen probe's logits on it (`offset`, [3])."""

    def __init__(self, dataset: VisitDataset, offset: torch.Tensor) -> None:
        self.dataset, self.offset = dataset, offset
        self.patient_ids, self.labels = dataset.patient_ids, dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "offset": self.offset[i]}

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.dataset.collate([{k: v for k, v in it.items() if k != "offset"} for it in items])
        batch["offset"] = torch.stack([it["offset"] for it in items])
        return batch


class Residual(nn.Module):
    """logit = probe logit (fixed, in the batch) + the compact LoRA model's logit."""

    def __init__(self, compact: OutcomeModel) -> None:
        super().__init__()
        self.compact = compact

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["offset"] + self.compact(batch)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return per_example_loss(self(batch), batch["labels"])


def zero_output_state(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The compact model's seeded start with its output layers at zero: it adds nothing to the probe at first."""
    model = build_model(config)
    state = model.trainable_state()
    for name in state:
        if name.startswith(("heads.", "aux_heads.")):
            state[name] = torch.zeros_like(state[name])
    return state


@torch.no_grad()
def prepare_caches(sites: list[SiteSettings], glm_config: TrainConfig, lora_config: TrainConfig) -> None:
    """Both models' frozen-layer caches, in the product's format and place (`client.site.site_dataset`), for the
    price of one encoder pass: the compact model's (the layers below its adapters) first, then the GLM's (every
    layer) by running only the remaining frozen layers on it. The same arithmetic as the GLM's own pass, split in two.
    """
    compact, glm = build_model(lora_config), build_model(glm_config)
    upper = _transformer_layers(glm.encoder)[compact.first_adapted:]
    for site in sites:
        for split in ("train", "val", "test"):
            key = _cache_key(site, glm_config, glm.precision)
            disk = site.cache_dir / f"{site.name}-{key}-{split}.pt"
            if disk.exists() or (key, split) in _SITE_DATA:
                continue
            low = site_dataset(site, lora_config, compact, split)
            order = np.argsort([len(h) for h in low.frozen_hidden], kind="stable")
            out: list[torch.Tensor | None] = [None] * len(low)
            for start in range(0, len(order), 64):
                idx = order[start:start + 64]
                batch = low.collate([low[i] for i in idx])
                with autocast(glm.precision):
                    hidden = batch["hidden"]
                    mask = create_bidirectional_mask(config=glm.encoder.config, inputs_embeds=hidden,
                                                     attention_mask=batch["attention_mask"])
                    for layer in upper:
                        hidden = layer(hidden, mask)
                for row, i in enumerate(idx):
                    out[i] = hidden[row, : len(low.frozen_hidden[i])].clone()
            private_dir(disk.parent)
            atomic_write(disk, lambda tmp, out=out: torch.save(
                {"flat": torch.cat(out), "lengths": [len(h) for h in out]}, tmp))
            print(f"cached {site.name} {split}: {len(low)} visits", flush=True)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {name: sum(w / total * s[name] for s, w in zip(states, weights, strict=True)) for name in states[0]}


def make_sites(data_dir: Path, epsilon: float, delta: float, ledger_dir: Path, draw: int, seed: int
               ) -> list[SiteSettings]:
    """The simulated sites as `client.site.settings_from_configs` makes them (noise seed: name, seed, draw)."""
    return [SiteSettings(name=name, data_path=path, epsilon=epsilon, delta=delta,
                         ledger_path=ledger_dir / f"{name}.json", declared_patients=simulated_declaration(path),
                         cache_dir=path.parent / SITE_CACHE,
                         dp_seed=f"{name}#seed{seed}" + (f"#draw{draw}" if draw else ""), create_ledger=True)
            for name, path in site_files(data_dir).items()]


def pooled_scores(sites: list[SiteSettings], datasets, model: nn.Module, split: str) -> dict[str, float]:
    """AUROC per outcome of `model` on every site's `split`, pooled."""
    labels, probs = [], []
    for site in sites:
        data = datasets(site, split)
        labels.append(data.labels.numpy())
        probs.append(predict(model, data))
    result = evaluate(np.concatenate(labels), np.concatenate(probs), bootstrap=0)
    return {o: float(result[o]["auroc"]) for o in OUTCOMES}


def run_glm(sites: list[SiteSettings], config: TrainConfig, share: float, rounds: int, log
            ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Phase 1: the product's DP-GLM rounds at every site (its ledger plans the noise for s * epsilon)."""
    state, history = build_model(config).trainable_state(), []
    for server_round in range(1, rounds + 1):
        states, weights = [], []
        for site in sites:
            capped = dataclasses.replace(site, max_epsilon_per_run=share * site.epsilon)
            new, metrics = train_round(capped, config, state, run_id=GLM_RUN, server_round=server_round,
                                       num_rounds=rounds, local_epochs=1)
            if new is None:
                raise SystemExit(f"{site.name} refused GLM round {server_round}: {metrics}")
            states.append(new)
            weights.append(metrics["num-examples"])
        state = fedavg(states, weights)
        model = build_model(config, state)
        val = pooled_scores(sites, lambda s, split, m=model: site_dataset(s, config, m, split), model, "val")
        history.append({"phase": "glm", "round": server_round, "val": val})
        log(f"GLM round {server_round}/{rounds}: val AUROC " + " ".join(f"{v:.3f}" for v in val.values()))
    return state, history


def probe_offsets(sites: list[SiteSettings], glm_config: TrainConfig, glm_state: dict[str, torch.Tensor]
                  ) -> dict[tuple[str, str], tuple[torch.Tensor, np.ndarray]]:
    """The frozen probe's logits on every site's visits, and their visit ids, per (site, split)."""
    probe = build_model(glm_config, glm_state)
    offsets = {}
    for site in sites:
        for split in ("train", "val", "test"):
            data = site_dataset(site, glm_config, probe, split)
            with torch.no_grad():
                offsets[site.name, split] = probe.glm(glm_rows(probe, data).features), data.visit_ids
    return offsets


def run_lora(sites: list[SiteSettings], glm_config: TrainConfig, config: TrainConfig,
             glm_state: dict[str, torch.Tensor], rounds: int, max_grad_norm: float, clipping: str, log
             ) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, float]]:
    """Phase 2: DP-SGD on the compact model as a residual on the probe, with the rest of each site's budget."""
    offsets = probe_offsets(sites, glm_config, glm_state)
    template = build_model(config)
    cache: dict[tuple[str, str], OffsetDataset] = {}

    def datasets(site: SiteSettings, split: str) -> OffsetDataset:
        if (site.name, split) not in cache:
            data = site_dataset(site, config, template, split)
            offset, visits = offsets[site.name, split]
            if not np.array_equal(data.visit_ids, visits):  # the probe's rows and the LoRA model's, in one order
                raise SystemExit(f"{site.name} {split}: the GLM's and the compact model's visits differ in order")
            cache[site.name, split] = OffsetDataset(data, offset)
        return cache[site.name, split]

    state, history, noises = zero_output_state(config), [], {}
    for server_round in range(1, rounds + 1):
        states, weights = [], []
        for site in sites:
            units = declared_train_units(site)
            per_epoch = max(1, math.ceil(units / config.batch_size))
            sample_rate, steps = 1 / per_epoch, per_epoch  # one local epoch, as the product's DP-SGD round
            with PrivacyLedger.locked(site.ledger_path, create=site.new_ledger_id) as ledger:
                noise = ledger.plan_noise(LORA_RUN, site.epsilon, site.delta, sample_rate, rounds * steps)
                after = ledger.projected(noise, sample_rate, steps, site.delta)
                if not math.isfinite(noise) or after > site.epsilon * (1 + 1e-6):
                    raise SystemExit(f"{site.name}: no noise up to the ledger's maximum fits phase 2 in the budget "
                                     f"left (noise {noise}, epsilon after {after:.3f})")
                seed = dp_rng_seed(site, ledger)
                model = Residual(build_model(config, state))
                optimizer = make_optimizer(model, config.dp_lr, config.weight_decay)
                optimizer, loader = make_private(
                    model, optimizer, datasets(site, "train"), noise_multiplier=noise, max_grad_norm=max_grad_norm,
                    sample_rate=sample_rate, steps=steps, expected_units=units * sample_rate,
                    noise=noise_source(site, seed), sampling_seed=seed, clipping=clipping, unit=site.privacy_unit)
                train_epoch(model, loader, optimizer)
                ledger.record(noise, sample_rate, steps, unit=site.privacy_unit, run_id=LORA_RUN,
                              server_round=server_round)
                ledger.save()
            noises[site.name] = noise
            states.append(model.compact.trainable_state())
            weights.append(units)
        previous, state = state, fedavg(states, weights)
        moved = math.sqrt(sum(float((state[n] - previous[n]).pow(2).sum()) for n in state))
        model = Residual(build_model(config, state))
        val = pooled_scores(sites, datasets, model, "val")
        # How far the LoRA branch has moved the prediction off the probe (mean |residual logit| on validation).
        residual = float(torch.cat([_logits(model.compact, datasets(s, "val")) for s in sites]).abs().mean())
        history.append({"phase": "lora", "round": server_round, "val": val, "state_moved": moved,
                        "mean_abs_residual_logit": residual})
        log(f"LoRA round {server_round}/{rounds}: val AUROC " + " ".join(f"{v:.3f}" for v in val.values())
            + f" (global state moved {moved:.3f}, mean |residual logit| {residual:.3f})")
    test = pooled_scores(sites, datasets, Residual(build_model(config, state)), "test")
    return state, history, {"test": test, "noise": noises}


@torch.no_grad()
def _logits(model: OutcomeModel, data: OffsetDataset) -> torch.Tensor:
    model.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=False, collate_fn=data.collate)
    return torch.cat([model(batch) for batch in loader])


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    tag = f"s{args.split:g}-draw{args.draw}"
    ledger_dir = args.out / "ledgers" / tag
    if ledger_dir.exists() and any(ledger_dir.iterdir()):
        raise SystemExit(f"{ledger_dir} holds ledgers of an earlier run; remove it to rerun {tag}")
    sites = make_sites(args.data, args.epsilon, args.delta, ledger_dir, args.draw, args.seed)
    glm_config = TrainConfig(architecture="glm", model=args.model, seed=args.seed)
    lora_config = TrainConfig(architecture="compact", model=args.model, seed=args.seed, aux_weight=1.0)

    def log(line: str) -> None:
        print(f"[{tag} {time.perf_counter() - started:5.0f} s] {line}", flush=True)

    prepare_caches(sites, glm_config, lora_config)
    glm_state, history = run_glm(sites, glm_config, args.split, args.glm_rounds, log)
    phase1 = {s.name: PrivacyLedger.open(s.ledger_path).spent(s.delta) for s in sites}
    if args.split < 1:
        _, lora_history, extra = run_lora(sites, glm_config, lora_config, glm_state, args.lora_rounds,
                                          args.max_grad_norm, args.clipping, log)
        history += lora_history
        test, noise2 = extra["test"], extra["noise"]
    else:
        model = build_model(glm_config, glm_state)
        test = pooled_scores(sites, lambda s, split: site_dataset(s, glm_config, model, split), model, "test")
        noise2 = {}
    privacy = {}
    for site in sites:
        ledger = PrivacyLedger.open(site.ledger_path)
        total = ledger.spent(site.delta)
        # The whole point of the split: each site's two phases together stay within its one budget.
        assert total <= site.epsilon * (1 + 1e-9), f"{site.name} spent {total} > {site.epsilon}"
        privacy[site.name] = {"phase1": phase1[site.name], "total": total,
                              "noise_glm": ledger.plans[GLM_RUN], "noise_lora": noise2.get(site.name)}
    result = {"split": args.split, "draw": args.draw, "epsilon": args.epsilon, "delta": args.delta,
              "glm_rounds": args.glm_rounds, "lora_rounds": args.lora_rounds if args.split < 1 else 0,
              "val": history[-1]["val"], "test": test, "history": history, "privacy": privacy,
              "wall_seconds": time.perf_counter() - started, "cpu": cpu_name(), "model": args.model or "default"}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    log("val " + " / ".join(f"{result['val'][o]:.3f}" for o in OUTCOMES) + " ; epsilon per site "
        + ", ".join(f"{n} {p['phase1']:.2f}->{p['total']:.3f}" for n, p in privacy.items()))
    return result


def report(args: argparse.Namespace) -> None:
    """Mean pooled validation AUROC per split over the draws found; the best split's test, and s = 1.0's."""
    path = args.results or args.out / "results.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_split: dict[float, list[dict]] = {}
    for r in results:
        by_split.setdefault(r["split"], []).append(r)
    rows = []
    print("| s (GLM share of ε) | draws | pooled val mortality / discharge / readmission | mean | min-max of mean | "
          "ε per site (max) | wall s per run |")
    print("|---|---|---|---|---|---|---|")
    for split in sorted(by_split, reverse=True):
        runs = by_split[split]
        val = {o: float(np.mean([r["val"][o] for r in runs])) for o in OUTCOMES}
        means = [float(np.mean([r["val"][o] for o in OUTCOMES])) for r in runs]
        spent = max(p["total"] for r in runs for p in r["privacy"].values())
        rows.append((split, val, float(np.mean(means)), runs))
        print(f"| {split:g} | {len(runs)} ({', '.join(str(r['draw']) for r in runs)}) | "
              + " / ".join(f"{val[o]:.3f}" for o in OUTCOMES)
              + f" | {np.mean(means):.3f} | {min(means):.3f}-{max(means):.3f} | {spent:.3f} | "
              + f"{np.mean([r['wall_seconds'] for r in runs]):.0f} |")
    best = max(rows, key=lambda row: row[2])
    print(f"\nbest split on pooled validation (mean over outcomes): s = {best[0]:g}")
    for split, _, _, runs in rows:
        if split in (best[0], 1.0) and all(r.get("test") for r in runs):
            test = {o: float(np.mean([r["test"][o] for r in runs])) for o in OUTCOMES}
            print(f"pooled test, s = {split:g} (mean of {len(runs)} draws): "
                  + " / ".join(f"{test[o]:.3f}" for o in OUTCOMES))
    if args.figure:
        _plot(rows, args.figure)
        print(f"wrote {args.figure}")


def _probe_val(result: dict) -> dict | None:
    """Pooled validation after phase 1 (the DP-GLM at s * epsilon), where the result has it."""
    glm = [h["val"] for h in result.get("history", []) if h["phase"] == "glm"]
    return glm[-1] if glm else result.get("probe_val")


def _plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    splits = [row[0] for row in rows]
    for outcome, marker in zip(OUTCOMES, "osd", strict=True):
        ys = [row[1][outcome] for row in rows]
        line, = ax.plot(splits, ys, marker=marker, label=outcome)
        for row in rows:  # each draw, faint
            ax.scatter([row[0]] * len(row[3]), [r["val"][outcome] for r in row[3]], color=line.get_color(),
                       alpha=0.3, s=12)
        ax.axhline(ys[splits.index(1.0)] if 1.0 in splits else np.nan, color=line.get_color(), ls=":", lw=0.8)
        probe = [(row[0], np.mean([_probe_val(r)[outcome] for r in row[3]])) for row in rows
                 if row[0] < 1 and all(_probe_val(r) for r in row[3])]
        if probe:  # phase 1 alone: the DP-GLM at s * epsilon, before any LoRA round
            ax.plot(*zip(*sorted(probe), strict=True), ls="--", marker=marker, mfc="none", color=line.get_color(),
                    alpha=0.6, lw=0.8)
    ax.set_xlabel("s: share of each site's ε = 8 spent on the DP-GLM (1.0 = DP-GLM alone)")
    ax.set_ylabel("pooled validation AUROC")
    ax.set_title("LP-FT under DP: DP-GLM, then LoRA residual by DP-SGD\n(dashed: the DP-GLM at s·ε alone; "
                 "dotted: at ε)", fontsize=10)
    ax.set_xticks(sorted(set(splits)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one budget split and noise draw; appends to OUT/results.jsonl")
    one.add_argument("--data", type=Path, default=Path("data/cohort"))
    one.add_argument("--split", type=float, required=True, help="share s of the budget for the DP-GLM (0 < s <= 1)")
    one.add_argument("--draw", type=int, default=0)
    one.add_argument("--epsilon", type=float, default=8.0)
    one.add_argument("--delta", type=float, default=1e-5)
    one.add_argument("--glm-rounds", type=int, default=4)
    one.add_argument("--lora-rounds", type=int, default=2)
    one.add_argument("--max-grad-norm", type=float, default=1.0)
    one.add_argument("--clipping", default="per-layer")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--model", default="", help="encoder folder ('' = the packaged default)")
    one.add_argument("--out", type=Path, default=Path("runs/lp-ft"))
    rep = sub.add_parser("report", help="the table over splits and the curve")
    rep.add_argument("--out", type=Path, default=Path("runs/lp-ft"))
    rep.add_argument("--figure", type=Path, default=None)
    rep.add_argument("--results", type=Path, default=None, help="another results file (default OUT/results.jsonl)")
    args = parser.parse_args()
    if args.command == "run":
        if not 0 < args.split <= 1:
            raise SystemExit("--split must be in (0, 1]")
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
