"""Everything that runs inside a hospital: its settings, its data, one training round, its evaluation.

A site operator can audit this file: the table is read and validated here, the frozen encoder
layers are cached here (on the site's own disk), DP-SGD runs here under the site's own budget, and
what it returns is `trainable_state()` arrays plus the scalar metrics built below — nothing else.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import TrainConfig
from common.data import VisitDataset, load_site_splits
from common.errors import EdfedError
from common.exchange import encoder_fingerprint, frozen_init_fingerprint
from common.features import load_tokenizer, structured_feature_names
from common.metrics import evaluate
from common.model import OutcomeModel
from common.privacy import PrivacyLedger, make_private
from common.train import cache_frozen_layers, make_loader, make_optimizer, predict, train_epoch


@dataclass(frozen=True)
class SiteSettings:
    """What belongs to the site alone. In deployment all of it comes from the node config."""

    name: str
    data_path: Path
    epsilon: float  # the site's total budget; inf turns DP off
    delta: float
    ledger_path: Path
    cache_dir: Path | None = None
    mapping: Path | None = None
    model_path: str = ""  # the site's copy of the encoder; "" = the packaged default
    # DP-SGD's randomness (Poisson sampling and noise) must be the site's own secret: whoever can replay it can
    # strip the noise, and noise shared by sites would not average out. None (deployment default): fresh OS
    # entropy every round. A site may set its own `dp-seed` to replay its runs; simulation uses the site's name.
    dp_seed: str | None = None
    # The float format of the frozen encoder pass on this machine (common.precision): "" = auto-detected.
    precision: str = ""

    @property
    def site_index(self) -> int:
        digits = "".join(ch for ch in self.name if ch.isdigit())
        return int(digits) if digits else 0


def settings_from_configs(node_config: dict, message_config: dict) -> SiteSettings:
    """Deployment: node config keys `data-path`, `epsilon`, `delta`, `ledger-path`, `cache-dir`, ...

    Simulation (a node config with only `partition-id`): the site is `site-<partition-id + 1>` of the
    run's data folder, with the run's per-site budget. A node config's budget always wins: the server
    cannot raise it.
    """
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"]))
        name = str(node_config.get("site-name", data_path.stem))
        ledger = Path(str(node_config.get("ledger-path", data_path.parent / f"{name}.privacy-ledger.json")))
        cache = node_config.get("cache-dir")
        mapping = node_config.get("mapping")
        return SiteSettings(
            name=name, data_path=data_path,
            epsilon=float(node_config.get("epsilon", message_config.get("site-epsilon", math.inf))),
            delta=float(node_config.get("delta", message_config.get("site-delta", 1e-5))),
            ledger_path=ledger, cache_dir=Path(str(cache)) if cache else None,
            mapping=Path(str(mapping)) if mapping else None, model_path=str(node_config.get("model-path", "")),
            dp_seed=str(node_config["dp-seed"]) if "dp-seed" in node_config else None,
            precision=str(node_config.get("precision", "")))
    if "partition-id" not in node_config or "data-dir" not in message_config:
        raise EdfedError("this node has no `data-path` in its node config; start it with "
                         "--node-config 'data-path=\"/path/to/site.parquet\"'")
    name = f"site-{int(node_config['partition-id']) + 1}"
    run_dir = Path(str(message_config["run-dir"]))
    data_dir = Path(str(message_config["data-dir"]))
    candidates = [data_dir / f"{name}.parquet", data_dir / f"{name}.csv"]
    data_path = next((p for p in candidates if p.exists()), candidates[0])
    ledger_dir = Path(str(message_config.get("ledger-dir") or run_dir / "ledgers"))
    return SiteSettings(name=name, data_path=data_path, epsilon=float(message_config.get("site-epsilon", math.inf)),
                        delta=float(message_config.get("site-delta", 1e-5)), ledger_path=ledger_dir / f"{name}.json",
                        cache_dir=run_dir / "cache", model_path=str(message_config.get("model", "")), dp_seed=name)


# Datasets with their frozen-layer output, kept in this process across rounds (simulation reuses
# worker processes) and on the site's disk (deployment starts a fresh process every round).
_SITE_DATA: dict[str, dict[str, VisitDataset]] = {}


def _cache_key(settings: SiteSettings, config: TrainConfig, precision: str) -> str:
    stat = settings.data_path.stat()
    parts = [settings.data_path.resolve(), stat.st_size, stat.st_mtime_ns, config.modality, config.max_tokens,
             config.note_sections, config.lora_layers, precision, config.cache_frozen, config.seed,
             encoder_fingerprint(config.encoder_dir) if config.uses_text else "-"]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def site_datasets(settings: SiteSettings, config: TrainConfig, model: OutcomeModel) -> dict[str, VisitDataset]:
    """The site's train/val/test datasets, validated against the contract, frozen layers cached."""
    key = _cache_key(settings, config, model.precision)
    if key in _SITE_DATA:
        return _SITE_DATA[key]
    splits = load_site_splits(settings.name, settings.data_path, config.seed, settings.mapping)
    tokenizer = load_tokenizer(config)
    datasets = {s: VisitDataset(splits.part(s), tokenizer, config) for s in ("train", "val", "test")}
    disk = settings.cache_dir / f"{settings.name}-{key}.pt" if settings.cache_dir else None
    if disk is not None and disk.exists():
        saved = torch.load(disk)
        for split, ds in datasets.items():
            ds.frozen_hidden = list(torch.split(saved[split]["flat"], saved[split]["lengths"]))
    else:
        for ds in datasets.values():
            cache_frozen_layers(model, ds)
        if disk is not None and datasets["train"].frozen_hidden is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(".tmp")
            torch.save({s: {"flat": torch.cat(ds.frozen_hidden), "lengths": [len(h) for h in ds.frozen_hidden]}
                        for s, ds in datasets.items()}, tmp)
            tmp.replace(disk)
    _SITE_DATA[key] = datasets
    return datasets


def build_model(config: TrainConfig, global_state: dict[str, torch.Tensor] | None,
                precision: str | None = None) -> OutcomeModel:
    torch.manual_seed(config.seed)  # same LoRA A at every site (FFA-LoRA keeps it frozen)
    model = OutcomeModel(config, n_struct=len(structured_feature_names()), precision=precision)
    if global_state is not None:
        model.load_trainable_state(global_state)
    return model


def check_encoder(config: TrainConfig, expected_fingerprint: str) -> None:
    if config.uses_text and expected_fingerprint:
        mine = encoder_fingerprint(config.encoder_dir)
        if mine != expected_fingerprint:
            raise EdfedError(f"this site's encoder ({config.encoder_dir}, fingerprint {mine}) is not the one the "
                             f"server expects ({expected_fingerprint}); refusing to train")


def check_site(settings: SiteSettings, config: TrainConfig, expected_fingerprint: str = "") -> dict[str, float]:
    """Before a site's first round: its encoder matches, its table passes the data contract, its ledger reads.

    Raises EdfedError (the message names file, column and rule, never a value) when the site cannot
    join; otherwise returns the scalars the coordinator logs: split sizes and the budget left.
    """
    check_encoder(config, expected_fingerprint)
    table = load_site_splits(settings.name, settings.data_path, config.seed, settings.mapping).table
    counts = table["split"].value_counts()
    metrics = {"site-id": settings.site_index, "rows": len(table), "epsilon-budget": settings.epsilon,
               **{f"{split}-rows": int(counts.get(split, 0)) for split in ("train", "val", "test")}}
    if math.isfinite(settings.epsilon):
        metrics["epsilon-spent"] = PrivacyLedger.open(settings.ledger_path).spent(settings.delta)
    return metrics


def dp_rng_seed(settings: SiteSettings, config: TrainConfig, server_round: int, earlier_runs: int) -> int:
    """The seed of one round's DP sampling and noise: secret to the site, never the same at two sites.

    With a `dp_seed`, a later run on the same ledger (`earlier_runs` > 0) draws fresh noise: the same noise on
    other gradients would cancel in the difference of the two runs' updates. A first run's key has no suffix, so
    it matches the runs the README quotes.
    """
    if settings.dp_seed is None:
        return secrets.randbits(62)
    key = f"{settings.dp_seed}:{config.seed}:{server_round}" + (f":{earlier_runs}" if earlier_runs else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 2


def train_round(settings: SiteSettings, config: TrainConfig, global_state: dict[str, torch.Tensor], *,
                run_id: str, server_round: int, num_rounds: int, local_epochs: int, proximal_mu: float = 0.0,
                max_grad_norm: float = 1.0, dp_clipping: str = "per-layer",
                expected_fingerprint: str = "", expected_frozen: str = "") -> tuple[dict | None, dict]:
    """One round at the site: (new trainable state or None if the round is refused, scalar metrics)."""
    round_started = time.perf_counter()
    check_encoder(config, expected_fingerprint)
    model = build_model(config, global_state, settings.precision or None)
    if expected_frozen and frozen_init_fingerprint(model) != expected_frozen:
        raise EdfedError("this site's seeded frozen matrices (LoRA A; with compact also the text projection and "
                         "fusion layer) differ from the server's (another torch version?); refusing to train")
    data_started = time.perf_counter()
    data = site_datasets(settings, config, model)["train"]
    data_seconds = time.perf_counter() - data_started  # read, check, tokenize, frozen-layer cache (first round)
    dp = math.isfinite(settings.epsilon)
    ledger = PrivacyLedger.open(settings.ledger_path) if dp else None
    # Without DP the shuffle is a public, reproducible function of the run; with DP it is the site's secret.
    shuffle_seed = (dp_rng_seed(settings, config, server_round, len(set(ledger.plans) - {run_id})) if dp
                    else config.seed * 1000 + server_round)
    loader = make_loader(data, config.batch_size, shuffle=True, seed=shuffle_seed)
    optimizer = make_optimizer(model, config.dp_lr if dp else config.lr, config.weight_decay)
    metrics: dict[str, float] = {"site-id": settings.site_index, "refused": 0, "delta": settings.delta,
                                 "bf16": float(model.precision == "bf16")}
    if dp:
        sample_rate = 1 / len(loader)
        steps = local_epochs * len(loader)
        noise = ledger.plan_noise(run_id, settings.epsilon, settings.delta, sample_rate, num_rounds * steps)
        after = ledger.projected(noise, sample_rate, steps, settings.delta) if math.isfinite(noise) else math.inf
        metrics.update({"noise-multiplier": noise, "sample-rate": sample_rate, "epsilon-budget": settings.epsilon})
        if after > settings.epsilon * (1 + 1e-6):
            ledger.save()  # keep the plan, spend nothing
            return None, {**metrics, "refused": 1, "epsilon": ledger.spent(settings.delta),
                          "epsilon-projected": after, "steps": 0, "num-examples": 0}
        optimizer, loader, accountant = make_private(model, optimizer, loader, noise, max_grad_norm,
                                                     seed=shuffle_seed + 1, clipping=dp_clipping)
    started = time.perf_counter()
    before = {n: t for n, t in model.trainable_state().items() if "lora_" in n}
    losses = [train_epoch(model, loader, optimizer, proximal_mu=proximal_mu, global_state=global_state)["loss"]
              for _ in range(local_epochs)]
    state = model.trainable_state()
    metrics.update({"num-examples": len(data), "train-loss": float(np.mean(losses)),
                    "train-seconds": time.perf_counter() - started,
                    "round-seconds": time.perf_counter() - round_started,  # incl. data, model, cache
                    "data-seconds": data_seconds,
                    # opacus#820: LoRA weights that silently never change; the server can see it here
                    "adapters-changed": float(any(not torch.equal(state[n], t) for n, t in before.items()))})
    if dp:
        taken = sum(h[2] for h in accountant.history)
        ledger.record(noise, sample_rate, taken)
        ledger.save()
        metrics.update({"epsilon": ledger.spent(settings.delta), "steps": taken})
    else:
        metrics.update({"epsilon": math.inf, "steps": local_epochs * len(loader)})
    return state, metrics


def evaluate_site(settings: SiteSettings, config: TrainConfig, global_state: dict[str, torch.Tensor],
                  split: str = "val") -> dict[str, float]:
    """Scalar metrics of the global model on one of the site's splits (no bootstrap: it runs every round)."""
    model = build_model(config, global_state, settings.precision or None)
    data = site_datasets(settings, config, model)[split]
    result = evaluate(data.labels.numpy(), predict(model, data), bootstrap=0)
    metrics = {"num-examples": len(data), "site-id": settings.site_index}
    for outcome, m in result.items():
        metrics[f"{outcome}-auroc"] = m["auroc"] if np.isfinite(m["auroc"]) else 0.5
    metrics["mean-auroc"] = float(np.mean([metrics[f"{o}-auroc"] for o in result]))
    return metrics
