"""Training speed and AUROC of the naive setup against edfed's default, side by side in one run.

naive:    LoRA in every encoder layer, every batch padded to 256 tokens, fp32, nothing cached
default:  LoRA in the top layers only, frozen lower layers computed once (bf16) and cached,
          batches padded to their longest note
default-fp32: the default with the frozen layers in fp32, to show what bf16 costs in AUROC

Every setup trains on the same visits for the same epochs and is scored on the same test visits. Each of
--seeds (default 0,1,2) draws another training subset and initialisation, and the table shows the mean over
seeds: at 1,000 training visits one draw can decide a comparison (readmission has 113 positives among the test
visits; default minus naive was -0.017, 0.000 and -0.001 for seeds 0, 1 and 2).

    python benchmarks/train_speed.py [--data data/cohort] [--train-visits 1000] [--epochs 2] [--seeds 0,1,2]  # ~25 min
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from edfed.common.config import TrainConfig
from edfed.common.data import VisitDataset, load_cohort
from edfed.common.display import make_console
from edfed.common.features import load_tokenizer
from edfed.common.metrics import evaluate
from edfed.common.precision import machine_facts
from edfed.common.train import cache_frozen_layers, fit_model, predict

SETUPS = {
    "naive": dict(lora_layers=0, max_tokens=256, padding="max_tokens", cache_frozen=False),
    "default": dict(),
    "default-fp32": dict(),
}
# The frozen pass's float format per setup; None = what this machine picks (common.precision).
PRECISION = {"naive": "fp32", "default": None, "default-fp32": "fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/cohort"))
    parser.add_argument("--train-visits", type=int, default=1000)
    parser.add_argument("--test-visits", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; each draws its own training subset and init")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if not args.data.exists():
        from edfed.simulations.cohort import generate_cohort

        generate_cohort(args.data)
    cohort = load_cohort(args.data, seed=0)
    seeds = [int(x) for x in args.seeds.split(",")]
    full_train = cohort[cohort["split"] == "train"]
    val = cohort[cohort["split"] == "val"]
    test = cohort[cohort["split"] == "test"]
    test = test.iloc[np.sort(np.random.default_rng(0).choice(len(test), min(args.test_visits, len(test)),
                                                            replace=False))]
    console = make_console()
    console.print(f"{min(args.train_visits, len(full_train))} training visits x {args.epochs} epochs, "
                  f"{len(test)} test visits, seeds {seeds}, {torch.get_num_threads()} threads")
    machine = machine_facts()
    console.print(f"CPU: {machine['cpu']}, {machine['cores']} cores, native bf16: {machine['native_bf16']}")
    runs: dict[str, list[tuple[float, float, dict[str, float]]]] = {}
    precisions: dict[str, str] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        train = full_train.iloc[np.sort(rng.choice(len(full_train), min(args.train_visits, len(full_train)),
                                                   replace=False))]
        for name in args.setups.split(","):
            config = TrainConfig(epochs=args.epochs, seed=seed, **SETUPS[name])
            tokenizer = load_tokenizer(config)
            started = time.perf_counter()
            model, history = fit_model(config, train, val, tokenizer, show_progress=True,
                                         precision=PRECISION[name])
            precisions[name] = model.precision
            wall = time.perf_counter() - started
            train_seconds = sum(h["seconds"] for h in history)
            trained = sum(h["examples"] for h in history)
            test_set = VisitDataset(test, tokenizer, config)
            cache_frozen_layers(model, test_set)
            metrics = evaluate(test_set.labels.numpy(), predict(model, test_set), bootstrap=0)
            aurocs = {k: m["auroc"] for k, m in metrics.items()}
            runs.setdefault(name, []).append((trained / train_seconds, trained / wall, aurocs))
            console.print(f"seed {seed} {name}: {trained / train_seconds:.1f} examples/s in training steps, "
                          f"{trained / wall:.1f} examples/s end to end (incl. caching), "
                          f"AUROC {({k: round(v, 3) for k, v in aurocs.items()})}")
    rows = [(name, TrainConfig(**SETUPS[name]), float(np.mean([r[0] for r in results])),
             float(np.mean([r[1] for r in results])),
             {k: float(np.mean([r[2][k] for r in results])) for k in results[0][2]})
            for name, results in runs.items()]
    table = Table(title=f"training speed and AUROC (same data, same epochs; mean over seeds {seeds}; "
                        f"{machine['cpu']}, native bf16 {machine['native_bf16']})")
    for col in ("setup", "LoRA layers", "tokens", "padding", "frozen part", "step ex/s", "end-to-end ex/s",
                *[f"AUROC {k}" for k in rows[0][4]], "mean AUROC"):
        table.add_column(col)
    for name, config, step_speed, e2e_speed, aurocs in rows:
        table.add_row(name, str(config.lora_layers or "all"), str(config.max_tokens), config.padding,
                      precisions[name] + (", cached" if config.cache_frozen else ""),
                      f"{step_speed:.1f}", f"{e2e_speed:.1f}", *[f"{v:.3f}" for v in aurocs.values()],
                      f"{np.mean(list(aurocs.values())):.3f}")
    console.print(table)
    if {"naive", "default"} <= {r[0] for r in rows}:
        by = {r[0]: r for r in rows}
        speedup = by["default"][3] / by["naive"][3]
        gap = np.mean(list(by["default"][4].values())) - np.mean(list(by["naive"][4].values()))
        per_outcome = ", ".join(f"{k} {by['default'][4][k] - v:+.3f}" for k, v in by["naive"][4].items())
        console.print(f"default vs naive: {speedup:.1f}x end-to-end examples/s, mean AUROC {gap:+.3f} "
                      f"({per_outcome})")


if __name__ == "__main__":
    main()
