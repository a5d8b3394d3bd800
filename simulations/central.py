"""`edfed train central`: pooled training on every site's training split, the baseline for federation.

It uses exactly the model, local step and evaluation that federated sites use; only the data
differs (all sites' training visits in one loader).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.config import TrainConfig
from common.data import VisitDataset, load_cohort
from common.display import Phases, make_console, progress_bar
from common.errors import EdfedError
from common.evaluation import evaluate_on_test, print_metrics, print_peers, write_summary
from common.features import load_tokenizer, structured_feature_names
from common.metrics import evaluate
from common.model import OutcomeModel
from common.peers import regression_peers
from common.precision import machine_facts
from common.train import cache_frozen_layers, make_loader, make_optimizer, predict, train_epoch


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig's defaults (common/config.py) with every flag the user gave; a flag is named as its field."""
    overrides = {name: getattr(args, name) for name in ("modality", "seed", "epochs", "max_tokens", "lora_layers",
                                                         "lr", "batch_size") if getattr(args, name, None) is not None}
    if args.model is not None:
        overrides["model"] = str(args.model)
    if getattr(args, "no_cache", False):
        overrides["cache_frozen"] = False
    return TrainConfig(**overrides)


def fit_central(config: TrainConfig, train: pd.DataFrame, val: pd.DataFrame, tokenizer,
                show_progress: bool = True, initial_state: dict[str, torch.Tensor] | None = None,
                precision: str | None = None, phases: Phases | None = None) -> tuple[OutcomeModel, list[dict]]:
    """Train on `train`, keeping the epoch with the best mean validation AUROC.

    From `initial_state` (a federation's global model, fine-tuned at one site), the starting point is
    epoch 0 and a candidate too, so fine-tuning never ends worse on validation than where it began.
    """
    torch.manual_seed(config.seed)
    model = OutcomeModel(config, n_struct=len(structured_feature_names()), precision=precision)
    if initial_state is not None:
        model.load_trainable_state(initial_state)
    train_set, val_set = VisitDataset(train, tokenizer, config), VisitDataset(val, tokenizer, config)
    history, best, best_state = [], -np.inf, None
    phases = phases or Phases(quiet=True)
    with progress_bar(show_progress) as progress:
        with phases("frozen-layer caching"):
            cache_frozen_layers(model, train_set, progress=progress)
            cache_frozen_layers(model, val_set, progress=progress)
        optimizer = make_optimizer(model, config.lr, config.weight_decay)
        for epoch in range(0 if initial_state is None else -1, config.epochs):
            stats = {}
            if epoch >= 0:
                loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed + epoch)
                stats = train_epoch(model, loader, optimizer, progress=progress,
                                    description=f"epoch {epoch + 1}/{config.epochs}")
            val_metrics = evaluate(val_set.labels.numpy(), predict(model, val_set), bootstrap=0)
            aurocs = [m["auroc"] for m in val_metrics.values() if not np.isnan(m["auroc"])]
            val_auroc = float(np.mean(aurocs)) if aurocs else float("nan")
            history.append({"epoch": epoch + 1, **stats, "val_mean_auroc": val_auroc,
                            "val_auroc": {o: m["auroc"] for o, m in val_metrics.items()}})
            if epoch >= 0:
                phases.line(f"epoch {epoch + 1}/{config.epochs}: {stats['seconds']:.0f} s, "
                            f"val mean AUROC {val_auroc:.3f}")
            # A validation split too small to have both classes gives no AUROC: that epoch ranks last, and
            # with no AUROC in any epoch the last epoch is kept.
            score = val_auroc if aurocs else -np.inf
            if best_state is None or score > best or score == best == -np.inf:
                best, best_state = score, model.trainable_state()
    model.load_trainable_state(best_state)
    return model, history


def save_trainable_state(model: OutcomeModel, path: Path) -> Path:
    """The trained arrays (adapters, tower, fusion, heads; not the encoder), atomically, for audits and reuse."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, tmp)
    tmp.replace(path)
    return path


def run_central(args: argparse.Namespace) -> dict:
    config = config_from_args(args)
    out = args.out or Path("runs") / f"central-{config.modality}-{datetime.now():%Y%m%d-%H%M%S}"
    if (out / "summary.json").exists():
        raise EdfedError(f"--out {out}: already holds a finished run (summary.json); choose another folder")
    return train_central(config, args.data, out)


def train_central(config: TrainConfig, data_dir: Path, out: Path, cohort: pd.DataFrame | None = None,
                  parts: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None, title: str | None = None,
                  predictions: bool = False) -> dict:
    """Train, score on the held-out visits and write OUT/summary.json (and plots): one central run.

    By default every site's patient-level train/val/test split is pooled; `parts` = (train, val, test)
    replaces them (e.g. a site left out of training and tested on). `predictions` also writes
    OUT/predictions.parquet: each test visit's labels and predicted risks.
    """
    started = time.perf_counter()
    console = make_console()
    phases = Phases(console)
    if cohort is None:
        with phases("contract check"):
            cohort = load_cohort(data_dir, config.seed)
    train, val, test = parts or tuple(cohort[cohort["split"] == s] for s in ("train", "val", "test"))
    tokenizer = load_tokenizer(config)
    console.print(f"central training on {train['site'].nunique()} sites ({len(train)} training, {len(test)} test "
                  f"visits), modality {config.modality}, encoder {config.encoder_dir if config.uses_text else '-'}")
    model, history = fit_central(config, train, val, tokenizer, phases=phases)
    out.mkdir(parents=True, exist_ok=True)
    save_trainable_state(model, out / "model.safetensors")  # before summary.json: a finished run has its model
    with phases("test evaluation"):
        final, per_site = evaluate_on_test(model, test, tokenizer, data_dir, out,
                                           title or f"central, {config.modality}",
                                           out / "predictions.parquet" if predictions else None)
    # The regressions a statistician fits first, on the same training and test rows: does the model earn its cost?
    with phases("regression peers"):
        peers = regression_peers(train, test, data_dir, config.bootstrap, config.seed, console=console)
    trainable_bytes = sum(t.numel() * t.element_size() for t in model.trainable_state().values())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = {
        "kind": "central",
        "config": {**config.to_dict(), "data": str(data_dir)},
        "final": final,
        "per_site": per_site,
        "peers": peers,
        "privacy": {},
        "communication": {"bytes_sent_per_client_round": 0, "trainable_bytes": trainable_bytes,
                          "full_model_bytes": full_bytes},
        "history": history,
        "splits": {"train": len(train), "val": len(val), "test": len(test)},
        "machine": {**machine_facts(), "precision": model.precision},
        "timings": {**phases.seconds, "epochs": {str(h["epoch"]): h["seconds"] for h in history if "seconds" in h}},
        "wall_seconds": time.perf_counter() - started,
    }
    write_summary(out, summary)
    print_metrics(final, f"held-out test, pooled ({config.modality})", console)
    print_peers(final, peers, console, f"edfed {config.modality}")
    console.print(f"wrote {out / 'summary.json'} ({summary['wall_seconds']:.0f} s)")
    return summary
