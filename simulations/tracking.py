"""`edfed track RUN_DIR`: a finished run in MLflow, so runs of a sweep sit side by side in its UI.

Optional (`pip install edfed[mlflow]`); a local file store by default (`file:./mlruns`, `mlflow ui` reads it). From
the run folder's summary.json alone, so any finished run can be logged, now or later:

- parameters: every run setting (config), the edfed version and commit as tags;
- metrics: the pooled validation AUROC per round (step = round), the pooled test metrics, each site's test AUROC
  (cells of fewer than 10 events left out, as in the report), each site's epsilon spent, the wall time;
- artifacts: summary.json, report.md and the figures.

Only aggregates go in, as in the report: no row, note or identifier.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from edfed.common.errors import EdfedError
from edfed.common.metrics import small_cell

DEFAULT_URI = "file:./mlruns"
_METRICS = ("auroc", "auprc", "brier", "ece", "calibration_slope", "calibration_intercept", "oracle_auroc")


def _key(*parts: str) -> str:
    """An MLflow metric or parameter name: letters, digits and _ - . / only."""
    return "/".join(str(p).replace(" ", "_").replace(":", "").replace("+", "plus") for p in parts)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_metrics(summary: dict) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """(final metrics, per-round series) of a summary.json, as MLflow names them."""
    final: dict[str, float] = {}
    for outcome, m in (summary.get("final") or {}).items():
        final.update({_key("test", name, outcome): float(m[name]) for name in _METRICS if _finite(m.get(name))})
    for site, outcomes in (summary.get("per_site") or {}).items():
        for outcome, m in outcomes.items():
            if not small_cell(m) and _finite(m.get("auroc")):
                final[_key("site", site, "auroc", outcome)] = float(m["auroc"])
    for site, p in (summary.get("privacy") or {}).items():
        if _finite(p.get("epsilon")):
            final[_key("privacy", site, "epsilon_spent")] = float(p["epsilon"])
    for name in ("wall_seconds", "wall_seconds_total"):
        if _finite(summary.get(name)):
            final[name] = float(summary[name])
    rounds: dict[str, list[tuple[int, float]]] = {}
    for server_round, aurocs in (summary.get("rounds") or {}).items():
        for outcome, value in aurocs.items():
            if _finite(value):
                rounds.setdefault(_key("val", "auroc", outcome), []).append((int(server_round), float(value)))
    return final, rounds


def track_run(run_dir: Path, uri: str = DEFAULT_URI, experiment: str = "edfed") -> str:
    """Log RUN_DIR (its summary.json, report and figures) as one MLflow run; returns the MLflow run id."""
    import json

    try:
        import mlflow
    except ImportError:
        raise EdfedError("experiment tracking needs MLflow: pip install 'edfed[mlflow]'") from None
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise EdfedError(f"{run_dir}: no summary.json (a finished run's folder)")
    summary = json.loads((run_dir / "summary.json").read_text())
    final, rounds = run_metrics(summary)
    config = summary.get("config") or {}
    provenance = summary.get("provenance") or {}
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked for; it is what this command
        # offers (no server, no database), and what `mlflow ui` reads.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_dir.name) as run:
        mlflow.set_tags({"edfed.kind": summary.get("kind", "run"), "edfed.run_dir": str(run_dir.resolve()),
                         **{f"edfed.{k}": str(v) for k, v in provenance.items()
                            if k in ("edfed", "git_commit", "git_dirty", "date_utc", "cpu")}})
        # MLflow caps a parameter's value at 6,000 characters; run settings are short
        mlflow.log_params({_key(k): str(v)[:500] for k, v in config.items() if not isinstance(v, dict | list)})
        mlflow.log_metrics(final)
        for name, series in rounds.items():
            for step, value in sorted(series):
                mlflow.log_metric(name, value, step=step)
        for path in [run_dir / "summary.json", run_dir / "report.md", *sorted(run_dir.glob("*.png"))]:
            if path.is_file():
                mlflow.log_artifact(str(path))
        return run.info.run_id
