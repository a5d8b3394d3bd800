"""How much each input carries before any fine-tuning: linear probes, no DP, pooled over the sites.

Logistic regression (standardised features, C = 0.05) fitted on the pooled training splits and scored on the
pooled test split, per outcome, for: the structured features; the frozen encoder's mean-pooled text (LoRA B
is zero at init, so this is the pretrained encoder); the compact model's fixed random projection of that text
(what its heads see of the notes); and the combinations. It shows what a frozen text path keeps or loses.

    python benchmarks/text_probe.py [--data data/cohort] [--model DIR] [--cache runs/probe-cache]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from edfed.client.site import SiteSettings, site_dataset
from edfed.common.config import TrainConfig
from edfed.common.contract import OUTCOMES
from edfed.common.data import site_files
from edfed.common.display import make_console
from edfed.common.model import build_model

PROBES = {"structured": ("struct",), "pooled text": ("pooled",), "random 64-d projection of it": ("proj",),
          "structured + pooled text": ("struct", "pooled"), "structured + projection": ("struct", "proj")}


@torch.no_grad()
def features(model, dataset) -> dict[str, np.ndarray]:
    out: dict[str, list[torch.Tensor]] = {"pooled": [], "proj": [], "struct": [], "labels": []}
    for start in range(0, len(dataset), 64):
        batch = dataset.collate([dataset[i] for i in range(start, min(len(dataset), start + 64))])
        pooled = model.encode_text(batch).float()
        out["pooled"].append(pooled)
        out["proj"].append(model.text_proj(pooled))
        out["struct"].append(batch["struct"])
        out["labels"].append(batch["labels"])
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/cohort"))
    parser.add_argument("--model", type=Path, default=None, help="a local HF encoder directory (default: packaged)")
    parser.add_argument("--cache", type=Path, default=Path("runs/probe-cache"), help="frozen-layer cache folder")
    args = parser.parse_args()
    config = TrainConfig(architecture="compact", model=str(args.model or ""))
    model = build_model(config).eval()
    parts: dict[str, list[dict[str, np.ndarray]]] = {"train": [], "test": []}
    for name, path in site_files(args.data).items():
        settings = SiteSettings(name=name, data_path=path, epsilon=float("inf"), delta=1e-5,
                                declared_patients=100, create_ledger=True,
                                ledger_path=args.cache / f"{name}-unused-ledger.json", cache_dir=args.cache)
        for split in parts:
            parts[split].append(features(model, site_dataset(settings, config, model, split)))
    pooled = {s: {k: np.concatenate([p[k] for p in ps]) for k in ps[0]} for s, ps in parts.items()}
    table = Table(title="linear probes, no DP: pooled test AUROC")
    for col in ("inputs", "width", *OUTCOMES):
        table.add_column(col)
    for label, keys in PROBES.items():
        x_train, x_test = (np.hstack([pooled[s][k] for k in keys]) for s in ("train", "test"))
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
        aurocs = []
        for o in range(len(OUTCOMES)):
            y_train, y_test = pooled["train"]["labels"][:, o], pooled["test"]["labels"][:, o]
            known_train, known_test = ~np.isnan(y_train), ~np.isnan(y_test)  # readmission after death is empty
            clf = LogisticRegression(C=0.05, max_iter=2000).fit(x_train[known_train], y_train[known_train])
            aurocs.append(roc_auc_score(y_test[known_test], clf.predict_proba(x_test[known_test])[:, 1]))
        table.add_row(label, str(x_train.shape[1]), *[f"{a:.3f}" for a in aurocs])
    make_console().print(table)


if __name__ == "__main__":
    main()
