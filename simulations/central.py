"""`edfed train central`: pooled training on every site's training split, the baseline for federation.

It uses exactly the model, local step and evaluation that federated sites use; only the data
differs (all sites' training visits in one loader).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

from edfed.common.config import TrainConfig
from edfed.common.data import load_cohort
from edfed.common.display import Phases, make_console
from edfed.common.errors import EdfedError
from edfed.common.evaluation import (
    POOLED_PREDICTIONS,
    evaluate_on_test,
    plot_with_references,
    print_metrics,
    print_peers,
    write_summary,
)
from edfed.common.features import load_tokenizer
from edfed.common.peers import regression_peers
from edfed.common.precision import machine_facts
from edfed.common.train import fit_model, save_trainable_state


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig's defaults (common/config.py) with every flag the user gave; a flag is named as its field."""
    overrides = {name: getattr(args, name) for name in ("modality", "seed", "epochs", "max_tokens", "lora_layers",
                                                         "lr", "batch_size") if getattr(args, name, None) is not None}
    if args.model is not None:
        overrides["model"] = str(args.model)
    return TrainConfig(**overrides)


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
    model, history = fit_model(config, train, val, tokenizer, phases=phases)
    out.mkdir(parents=True, exist_ok=True)
    save_trainable_state(model, out / "model.safetensors")  # before summary.json: a finished run has its model
    title = title or f"central, {config.modality}"
    predictions_path = out / ("predictions.parquet" if predictions else POOLED_PREDICTIONS)
    with phases("test evaluation"):
        final, per_site = evaluate_on_test(model, test, tokenizer, data_dir, out, title, predictions_path)
    # The regressions a statistician fits first, on the same training and test rows: does the model earn its cost?
    with phases("regression peers"):
        curves: dict = {}
        peers = regression_peers(train, test, data_dir, config.bootstrap, config.seed, console=console,
                                 curves=curves)
        plot_with_references(out, final, data_dir, f"{title}, and its regression peers", curves, predictions_path)
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
