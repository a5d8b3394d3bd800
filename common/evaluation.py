"""Held-out evaluation of a trained model: pooled and per site, with oracle AUROC and plots.

Central and federated runs both end here, so their `summary.json` numbers mean the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from edfed.common.contract import OUTCOMES
from edfed.common.data import VisitDataset, load_oracle
from edfed.common.display import make_console
from edfed.common.files import atomic_write, atomic_write_text
from edfed.common.metrics import SUPPRESSED, evaluate, small_cell
from edfed.common.model import OutcomeModel
from edfed.common.plots import plot_roc_and_calibration
from edfed.common.train import cache_frozen_layers, predict


def oracle_risks(data_dir: Path, table: pd.DataFrame) -> np.ndarray | None:
    """True risks aligned with `table`'s rows ([n, 3]), or None when the cohort has no oracle."""
    frames = []
    for site in pd.unique(table["site"]):
        oracle = load_oracle(data_dir, site)
        if oracle is None:
            return None
        frames.append(oracle.assign(site=site))
    # visit_id is unique only within a site's file, so align on both.
    merged = table[["site", "visit_id"]].merge(pd.concat(frames), on=["site", "visit_id"], how="left")
    return merged[[f"risk_{o}" for o in OUTCOMES]].to_numpy(float)


def evaluate_on_test(model: OutcomeModel, test: pd.DataFrame, tokenizer, data_dir: Path, out_dir: Path,
                     title: str, predictions_path: Path | None = None) -> tuple[dict, dict]:
    """(`final`, `per_site`) metrics on a pooled test table (which has a `site` column); writes plots."""
    config = model.config
    dataset = VisitDataset(test, tokenizer, config)
    cache_frozen_layers(model, dataset)
    probs = predict(model, dataset)
    return score_test(test, dataset.labels.numpy(), probs, data_dir, out_dir, title, config.bootstrap, config.seed,
                      predictions_path)


def score_test(test: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, data_dir: Path, out_dir: Path, title: str,
               bootstrap: int = 200, seed: int = 0, predictions_path: Path | None = None) -> tuple[dict, dict]:
    """(`final`, `per_site`) metrics of predicted risks [n, 3] for the rows of `test`; writes plots.

    Any model's predictions (neural or not) are scored here, so their numbers mean the same thing.
    `predictions_path`: also keep each test visit's labels and predicted risks there (Parquet).
    """
    oracle = oracle_risks(data_dir, test)
    final = evaluate(labels, probs, bootstrap, seed, oracle)
    per_site = {}
    for site in pd.unique(test["site"]):
        rows = (test["site"] == site).to_numpy()
        per_site[site] = evaluate(labels[rows], probs[rows], bootstrap, seed,
                                  None if oracle is None else oracle[rows])
    plot_roc_and_calibration(labels, probs, final, out_dir, title,
                             references=None if oracle is None else {ORACLE_LABEL: oracle})
    if predictions_path is not None:
        ids = test[[c for c in ("site", "visit_id", "split") if c in test]].reset_index(drop=True)
        risks = pd.DataFrame({**{o: labels[:, k] for k, o in enumerate(OUTCOMES)},
                              **{f"p_{o}": probs[:, k] for k, o in enumerate(OUTCOMES)}})
        predictions = pd.concat([ids, risks], axis=1)  # one row a visit: owner-only, like the site's table
        atomic_write(predictions_path, lambda tmp: predictions.to_parquet(tmp, index=False))
    return final, per_site


ORACLE_LABEL = "true risk (oracle)"
POOLED_PREDICTIONS = "test-predictions.parquet"  # a simulation's pooled test risks (PooledEvaluation.test)


def plot_with_references(run_dir: Path, final: dict, data_dir: Path, title: str,
                         references: dict[str, np.ndarray], predictions_path: Path | None = None) -> list[Path]:
    """A run's roc.png and calibration.png drawn again with more curves on the same pooled test rows (e.g. the
    regression peers, fitted after the model), from its saved test predictions (default: POOLED_PREDICTIONS)."""
    predictions = pd.read_parquet(predictions_path or run_dir / POOLED_PREDICTIONS)
    labels = predictions[list(OUTCOMES)].to_numpy(float)
    probs = predictions[[f"p_{o}" for o in OUTCOMES]].to_numpy(float)
    oracle = oracle_risks(data_dir, predictions)
    return plot_roc_and_calibration(labels, probs, final, run_dir, title,
                                    references={**({ORACLE_LABEL: oracle} if oracle is not None else {}),
                                                **references})


def score_saved_predictions(files: list[Path], data_dir: Path, bootstrap: int = 200, seed: int = 0) -> dict | None:
    """Pooled metrics of predictions.parquet files (each site's test visits scored by its own model), or None
    when one is missing."""
    if not files or not all(Path(f).exists() for f in files):
        return None
    table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    labels = table[list(OUTCOMES)].to_numpy(float)
    probs = table[[f"p_{o}" for o in OUTCOMES]].to_numpy(float)
    return evaluate(labels, probs, bootstrap, seed, oracle_risks(data_dir, table))


def write_summary(out_dir: Path, summary: dict) -> Path:
    """Write summary.json atomically (a reader never sees half a file), with its `provenance` block."""
    from edfed.common.provenance import provenance

    # a summary re-written later (an experiment adding baselines) keeps the provenance of the run that made it
    summary.setdefault("provenance", provenance())
    return atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=float))


def print_metrics(final: dict, title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("outcome", "AUROC (95% CI)", "oracle AUROC", "AUPRC", "Brier", "ECE", "n", "events"):
        table.add_column(col)
    for name, m in final.items():
        lo, hi = m.get("auroc_ci", [float("nan")] * 2)
        table.add_row(name, f"{m['auroc']:.3f} ({lo:.3f}-{hi:.3f})", f"{m.get('oracle_auroc', float('nan')):.3f}",
                      f"{m['auprc']:.3f}", f"{m['brier']:.3f}", f"{m['ece']:.3f}", str(m["n"]), str(m["events"]))
    (console or make_console()).print(table)


def print_peers(final: dict, peers: dict, console: Console | None = None, model_label: str = "edfed model",
                per_site: dict | None = None) -> None:
    """The model's test AUROC next to its regression peers' (`common.peers`) on the same rows, pooled; with
    `per_site` (a federation's), also each site's model AUROC next to that site's own regressions."""
    from edfed.common.peers import PEER_LABELS

    table = Table(title="held-out test, pooled: the model and its regression peers (AUROC, same test rows)")
    for col in ("model", *OUTCOMES):
        table.add_column(col)
    rows = [(model_label, final), *((PEER_LABELS[p], m) for p, m in peers.get("pooled", {}).items())]
    for label, metrics in rows:
        table.add_row(label, *(f"{metrics[o]['auroc']:.3f}" if o in metrics else "-" for o in OUTCOMES))
    table.add_row("true risk (oracle ceiling)", *(f"{final[o].get('oracle_auroc', float('nan')):.3f}"
                                                 if o in final else "-" for o in OUTCOMES))
    console = console or make_console()
    console.print(table)
    if per_site and peers.get("local"):
        sites = Table(title="per site: the model against each site's own regressions (AUROC on its test visits)")
        names = [p for p in PEER_LABELS if any(p in v for v in peers["local"].values())]
        for col in ("site", "outcome", model_label, *(f"local {p}" for p in names), "n", "events"):
            sites.add_column(col)
        for site, local in peers["local"].items():
            for o in OUTCOMES:
                m = per_site.get(site, {}).get(o, {})
                if small_cell(local[names[0]][o]):  # as the report shows it: no number from a handful of events
                    sites.add_row(site, o, SUPPRESSED, *("-" for _ in names), "-", "-")
                    continue
                sites.add_row(site, o, f"{m.get('auroc', float('nan')):.3f}",
                              *(f"{local[p][o]['auroc']:.3f}" for p in names),
                              str(local[names[0]][o]["n"]), str(local[names[0]][o]["events"]))
        console.print(sites)


class PooledEvaluation:
    """Scores models on every site's held-out visits pooled; only where one machine holds all sites."""

    def __init__(self, data_dir: Path, config) -> None:
        from edfed.common.data import load_cohort
        from edfed.common.features import load_tokenizer

        self.data_dir, self.config = data_dir, config
        self.cohort = load_cohort(data_dir, config.seed)
        self.tokenizer = load_tokenizer(config)
        self._val: VisitDataset | None = None

    def validation(self, model: OutcomeModel) -> dict:
        if self._val is None:
            self._val = VisitDataset(self.cohort[self.cohort["split"] == "val"], self.tokenizer, self.config)
            cache_frozen_layers(model, self._val)
        return evaluate(self._val.labels.numpy(), predict(model, self._val), bootstrap=0)

    def test(self, model: OutcomeModel, out_dir: Path, title: str) -> tuple[dict, dict]:
        return evaluate_on_test(model, self.cohort[self.cohort["split"] == "test"], self.tokenizer, self.data_dir,
                                out_dir, title, out_dir / POOLED_PREDICTIONS)
