"""`edfed track`: a finished run in MLflow's local file store (the extra `edfed[mlflow]`)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edfed.cli import main as cli
from edfed.simulations.tracking import run_metrics

OUTCOMES = ("mortality_30d", "safe_discharge", "readmission_30d")


def _summary() -> dict:
    cell = {"auroc": 0.8, "auroc_ci": [0.7, 0.9], "auprc": 0.4, "brier": 0.1, "ece": 0.02, "n": 200, "events": 40,
            "calibration_slope": 0.9, "calibration_intercept": 0.1}
    return {"kind": "federated", "config": {"epsilon": 8.0, "strategy": "fedavg", "num-server-rounds": 2},
            "final": {o: dict(cell) for o in OUTCOMES},
            "per_site": {"site-1": {o: dict(cell) for o in OUTCOMES},
                         "site-6": {o: {**cell, "auroc": 0.684, "events": 9} for o in OUTCOMES}},
            "rounds": {"0": {o: 0.5 for o in OUTCOMES}, "1": {o: 0.7 for o in OUTCOMES},
                       "2": {o: 0.75 for o in OUTCOMES}},
            "privacy": {"site-1": {"epsilon": 7.9}, "site-6": {"epsilon": 8.0}}, "wall_seconds": 61.0,
            "provenance": {"edfed": "0.1.0", "git_commit": "abc"}}


def test_what_is_logged():
    final, rounds = run_metrics(_summary())
    assert final["test/auroc/mortality_30d"] == 0.8 and final["test/calibration_slope/safe_discharge"] == 0.9
    assert final["site/site-1/auroc/readmission_30d"] == 0.8
    assert not any("site-6/auroc" in k for k in final)  # under 10 events: left out, as in the report
    assert final["privacy/site-6/epsilon_spent"] == 8.0 and final["wall_seconds"] == 61.0
    assert rounds["val/auroc/mortality_30d"] == [(0, 0.5), (1, 0.7), (2, 0.75)]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="checks an install without the extra")
def test_without_mlflow_the_extra_is_named(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    assert cli.main(["track", str(tmp_path)]) == 2
    assert "pip install 'edfed[mlflow]'" in capsys.readouterr().err


def test_a_run_in_a_local_file_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run-a"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(_summary()))
    (run_dir / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    uri = (tmp_path / "mlruns").as_uri()
    assert cli.main(["track", str(run_dir), "--uri", uri, "--experiment", "sweep"]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweep")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["epsilon"] == "8.0" and run.data.tags["edfed.git_commit"] == "abc"
    assert run.data.metrics["privacy/site-1/epsilon_spent"] == 7.9
    history = client.get_metric_history(run.info.run_id, "val/auroc/safe_discharge")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.7), (2, 0.75)]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "roc.png"}
