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
from common.display import make_console, progress_bar
from common.errors import EdfedError
from common.evaluation import evaluate_on_test, print_metrics, write_summary
from common.features import load_tokenizer, structured_feature_names
from common.metrics import evaluate
from common.model import OutcomeModel
from common.train import cache_frozen_layers, make_loader, make_optimizer, predict, train_epoch


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {"modality": args.modality, "seed": args.seed, "model": str(args.model or "")}
    for flag, key in (("epochs", "epochs"), ("max_tokens", "max_tokens"), ("lora_layers", "lora_layers"),
                      ("lr", "lr"), ("batch_size", "batch_size")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if getattr(args, "no_bf16", False):
        overrides["bf16"] = False
    if getattr(args, "no_cache", False):
        overrides["cache_frozen"] = False
    return TrainConfig(**overrides)


def fit_central(config: TrainConfig, train: pd.DataFrame, val: pd.DataFrame, tokenizer,
                show_progress: bool = True) -> tuple[OutcomeModel, list[dict]]:
    """Train on `train`, keeping the epoch with the best mean validation AUROC."""
    torch.manual_seed(config.seed)
    model = OutcomeModel(config, n_struct=len(structured_feature_names()))
    train_set, val_set = VisitDataset(train, tokenizer, config), VisitDataset(val, tokenizer, config)
    history, best, best_state = [], -np.inf, None
    with progress_bar(show_progress) as progress:
        cache_frozen_layers(model, train_set, progress=progress)
        cache_frozen_layers(model, val_set, progress=progress)
        optimizer = make_optimizer(model, config.lr, config.weight_decay)
        for epoch in range(config.epochs):
            loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed + epoch)
            stats = train_epoch(model, loader, optimizer, progress=progress,
                                description=f"epoch {epoch + 1}/{config.epochs}")
            val_metrics = evaluate(val_set.labels.numpy(), predict(model, val_set), bootstrap=0)
            val_auroc = float(np.nanmean([m["auroc"] for m in val_metrics.values()]))
            history.append({"epoch": epoch + 1, **stats, "val_mean_auroc": val_auroc,
                            "val_auroc": {o: m["auroc"] for o, m in val_metrics.items()}})
            if val_auroc > best:
                best, best_state = val_auroc, model.trainable_state()
    model.load_trainable_state(best_state)
    return model, history


def run_central(args: argparse.Namespace) -> dict:
    config = config_from_args(args)
    started = time.perf_counter()
    console = make_console()
    cohort = load_cohort(args.data, config.seed)
    tokenizer = load_tokenizer(config)
    out = args.out or Path("runs") / f"central-{config.modality}-{datetime.now():%Y%m%d-%H%M%S}"
    if (out / "summary.json").exists():
        raise EdfedError(f"--out {out}: already holds a finished run (summary.json); choose another folder")
    console.print(f"central training on {cohort['site'].nunique()} sites, {len(cohort)} visits, "
                  f"modality {config.modality}, encoder {config.encoder_dir if config.uses_text else '-'}")
    model, history = fit_central(config, cohort[cohort["split"] == "train"], cohort[cohort["split"] == "val"],
                                 tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    final, per_site = evaluate_on_test(model, cohort[cohort["split"] == "test"], tokenizer, args.data, out,
                                       f"central, {config.modality}")
    trainable_bytes = sum(t.numel() * t.element_size() for t in model.trainable_state().values())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = {
        "kind": "central",
        "config": {**config.to_dict(), "data": str(args.data)},
        "final": final,
        "per_site": per_site,
        "privacy": {},
        "communication": {"bytes_sent_per_client_round": 0, "trainable_bytes": trainable_bytes,
                          "full_model_bytes": full_bytes},
        "history": history,
        "splits": {s: int(n) for s, n in cohort["split"].value_counts().items()},
        "wall_seconds": time.perf_counter() - started,
    }
    write_summary(out, summary)
    print_metrics(final, f"held-out test, pooled ({config.modality})", console)
    console.print(f"wrote {out / 'summary.json'} ({summary['wall_seconds']:.0f} s)")
    return summary
