"""The report's figures and tables: calibration that shows how sure each bin is, the join table as people read it,
one small-cell rule for the log and the report, and the per-site figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from edfed.common.evaluation import print_peers
from edfed.common.metrics import SUPPRESSED, calibration_slope_intercept, evaluate
from edfed.common.plots import calibration_bins, plot_roc_and_calibration, wilson_interval
from edfed.server.report import site_models, sites_table, write_report


def test_a_bin_of_one_visit_is_not_a_confident_one():
    lo, hi = wilson_interval(np.array([1.0, 50.0]), np.array([1, 100]))
    assert lo[0] == pytest.approx(0.2065, abs=1e-3) and hi[0] == 1.0
    assert lo[1] == pytest.approx(0.404, abs=1e-3) and hi[1] == pytest.approx(0.596, abs=1e-3)
    y, p = np.array([1.0, 0, 0, 1, 1]), np.array([0.95, 0.05, 0.07, 0.5, 0.52])
    bins = calibration_bins(y, p)
    assert bins["n"].tolist() == [2, 2, 1] and bins["observed"].tolist() == [0.0, 1.0, 1.0]
    assert bins["low"][-1] < 0.25  # the top bin holds one visit: its interval says so


def test_calibration_slope_and_intercept():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 40_000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    slope, intercept = calibration_slope_intercept(y, p)
    assert slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.0, abs=0.05)
    extreme = 1 / (1 + np.exp(-2 * np.log(p / (1 - p))))  # twice too sure: slope 1/2
    assert calibration_slope_intercept(y, extreme)[0] == pytest.approx(0.5, abs=0.03)
    under = np.clip(p * 0.5, 1e-3, 1)  # risks too low: more events than predicted, intercept above 0
    assert calibration_slope_intercept(y, under)[1] > 0.3
    assert np.isnan(calibration_slope_intercept(np.zeros(10), p[:10])[0])
    metrics = evaluate(np.column_stack([y, y, y])[:500], np.column_stack([p, p, p])[:500], bootstrap=0)
    assert {"calibration_slope", "calibration_intercept"} <= set(metrics["mortality_30d"])


def test_figures_are_drawn_with_one_class_and_missing_references(tmp_path):
    rng = np.random.default_rng(1)
    labels = (rng.uniform(size=(200, 3)) < 0.3).astype(float)
    labels[:, 2] = 0.0  # one class only: no ROC curve, no legend entry for one
    probs = rng.uniform(size=(200, 3))
    oracle = np.full((200, 3), np.nan)  # no true risk known
    paths = plot_roc_and_calibration(labels, probs, evaluate(labels, probs, bootstrap=0), tmp_path, "t",
                                     references={"true risk (oracle)": oracle, "regression: stacked": probs ** 2})
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_the_join_table_reads_as_people_write_it():
    lines = sites_table({"site-1": {"node": 13438927123456789012, "declared-patients": 1410, "epsilon-budget": 8.0,
                                    "patient-level": 1.0, "releases-metrics": 0.0, "epsilon-spent": 0.0}})
    assert lines[0] == "| site | node | declared-patients | epsilon-budget | patient-level | releases-metrics |"
    assert lines[2] == "| site-1 | 13438927123456789012 | 1410 | 8.000 | yes | no |"


def _peers(events: int) -> dict:
    cell = {"auroc": 0.684, "n": 200, "events": events}
    return {"pooled": {}, "local": {"site-6": {p: {o: cell for o in ("mortality_30d", "safe_discharge",
                                                                      "readmission_30d")}
                                               for p in ("structured", "tfidf", "stacked")}}}


def test_the_log_suppresses_what_the_report_suppresses():
    final = {o: {"auroc": 0.7} for o in ("mortality_30d", "safe_discharge", "readmission_30d")}
    per_site = {"site-6": {o: {"auroc": 0.684, "n": 200, "events": 9} for o in final}}
    console = Console(record=True, width=200)
    print_peers(final, _peers(9), console, per_site=per_site)
    text = console.export_text()
    assert SUPPRESSED in text and "0.684" not in text
    console = Console(record=True, width=200)
    print_peers(final, _peers(40), console, per_site={"site-6": {o: {"auroc": 0.684} for o in final}})
    assert "0.684" in console.export_text()


def test_the_report_draws_each_site(tmp_path):
    cell = {"auroc": 0.8, "auroc_ci": [0.7, 0.9], "n": 200, "events": 40}
    per_site = {f"site-{k}": {o: dict(cell) for o in ("mortality_30d", "safe_discharge", "readmission_30d")}
                for k in (1, 2)}
    deployment = {"deployed": per_site, "local-only": per_site, "regression: stacked": per_site,
                  "choices": {s: {o: "global" for o in per_site[s]} for s in per_site}}
    assert list(site_models({"deployment": deployment})) == ["deployed", "local-only", "own stacked regression"]
    assert list(site_models({"kind": "federated", "per_site": per_site})) == ["global model"]
    summary = {"kind": "federated", "final": per_site["site-1"], "per_site": per_site, "deployment": deployment}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = write_report(tmp_path).read_text()
    assert "![sites](sites.png)" in report and (tmp_path / "sites.png").stat().st_size > 10_000
