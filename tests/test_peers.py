"""The regression peers: fitted on training rows only, scored on the model's test rows, shown in every report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edfed.common import peers as peers_module
from edfed.common.contract import OUTCOMES
from edfed.common.data import load_cohort, site_files
from edfed.common.peers import PEERS, federation_peers, fit_peers, regression_peers
from edfed.server.report import SUPPRESSED, render_report
from edfed.simulations.cohort import generate_cohort


@pytest.fixture(scope="module")
def signal_cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("peers") / "cohort", n_sites=3, visits_per_site=400, seed=3)


def _recording_fits(monkeypatch) -> list:
    fitted = []

    def record(train, seed=0):
        fitted.append(original(train, seed))
        return fitted[-1]

    original = peers_module.fit_peers
    monkeypatch.setattr(peers_module, "fit_peers", record)
    return fitted


def _flip_held_out_labels(data_dir, seed: int) -> None:
    """Invert every label of the validation and test visits in the site files (training rows untouched)."""
    cohort = load_cohort(data_dir, seed)
    for site, path in site_files(data_dir).items():
        table = pd.read_parquet(path)
        split = cohort.loc[cohort["site"] == site, "split"].to_numpy()
        held_out = split != "train"
        for outcome in OUTCOMES:
            table.loc[held_out, outcome] = 1 - table.loc[held_out, outcome]
        table.to_parquet(path, index=False)


@pytest.mark.slow
def test_peers_learn_from_training_rows_only(signal_cohort, tmp_path, monkeypatch):
    fitted = _recording_fits(monkeypatch)
    first = federation_peers(signal_cohort, seed=0, bootstrap=0)
    before = list(fitted)
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for path in signal_cohort.rglob("*.parquet"):
        (flipped / path.relative_to(signal_cohort)).parent.mkdir(parents=True, exist_ok=True)
        (flipped / path.relative_to(signal_cohort)).write_bytes(path.read_bytes())
    _flip_held_out_labels(flipped, seed=0)
    second = federation_peers(flipped, seed=0, bootstrap=0)
    after = fitted[len(before):]
    assert len(before) == len(after) == 4  # pooled, then each of the three sites
    for a, b in zip(before, after, strict=True):
        for outcome in OUTCOMES:
            for peer, coef in a.coefficients()[outcome].items():
                np.testing.assert_array_equal(coef, b.coefficients()[outcome][peer])
    # ... while the scores, made on the flipped test rows, do change: the test labels are read only to score.
    cohort = load_cohort(signal_cohort, 0)
    test = cohort[cohort["split"] == "test"]
    for peer in PEERS:
        for outcome in OUTCOMES:
            n_known = int(test[outcome].notna().sum())
            assert first["pooled"][peer][outcome]["n"] == second["pooled"][peer][outcome]["n"] == n_known
            assert first["pooled"][peer][outcome]["auroc"] == pytest.approx(
                1 - second["pooled"][peer][outcome]["auroc"])
    assert first["test_rows"] == len(test) and first["method"]["train_rows"] == int((cohort["split"] == "train").sum())
    for site, own in first["local"].items():
        site_test = test[test["site"] == site]
        assert own["structured"]["safe_discharge"]["n"] == len(site_test)
        assert first["local_method"][site]["train_rows"] == int(((cohort["site"] == site)
                                                                 & (cohort["split"] == "train")).sum())


@pytest.mark.slow
def test_the_stack_is_at_least_as_good_as_its_worse_input(signal_cohort):
    cohort = load_cohort(signal_cohort, 0)
    result = regression_peers(cohort[cohort["split"] == "train"], cohort[cohort["split"] == "test"], signal_cohort,
                              bootstrap=0)
    pooled = result["pooled"]
    for outcome in OUTCOMES:
        aurocs = {p: pooled[p][outcome]["auroc"] for p in PEERS}
        assert aurocs["stacked"] >= min(aurocs["structured"], aurocs["tfidf"]), (outcome, aurocs)
        # the simulated cohort puts signal in both modalities: each peer finds some of it
        assert min(aurocs.values()) > 0.6, (outcome, aurocs)
        assert np.isfinite(pooled["stacked"][outcome]["oracle_auroc"])  # scored like the model, oracle included
    assert result["seconds"] < 60


def test_peers_without_notes_or_events_still_score(signal_cohort):
    cohort = load_cohort(signal_cohort, 0)
    train, test = cohort[cohort["split"] == "train"].copy(), cohort[cohort["split"] == "test"]
    train[["note_triage", "note_physician", "note_assessment_plan"]] = ""
    train["mortality_30d"] = 0  # no deaths among the training rows: nothing to learn, the prevalence is predicted
    fitted = fit_peers(train)
    assert fitted.peers == ("structured",)
    probs = fitted.predict(test)["structured"]
    assert np.all(probs[:, 0] == 0.0) and fitted.method()["not_fitted"] == ["mortality_30d"]
    assert 0 < probs[:, 1].min() < probs[:, 1].max() < 1


def _m(auroc: float, n: int, events: int) -> dict:
    return {"auroc": auroc, "auroc_ci": [auroc - 0.05, auroc + 0.05], "auprc": 0.4, "brier": 0.1, "ece": 0.02,
            "n": n, "events": events, "oracle_auroc": 0.95}


def test_reports_show_the_model_next_to_its_peers(tmp_path):
    import json

    final = {o: _m(0.80, 600, 90) for o in OUTCOMES}
    pooled = {"structured": {o: _m(0.71, 600, 90) for o in OUTCOMES},
              "tfidf": {o: _m(0.72, 600, 90) for o in OUTCOMES},
              "stacked": {o: _m(0.76, 600, 90) for o in OUTCOMES}}
    local = {"site-1": {p: {o: _m(0.61 + 0.01 * k, 300, 45) for o in OUTCOMES} for k, p in enumerate(PEERS)},
             "site-2": {p: {o: _m(0.5, 40, 3) for o in OUTCOMES} for p in PEERS}}
    summary = {"kind": "federated", "config": {"strategy": "fedavg"}, "final": final,
               "per_site": {"site-1": {o: _m(0.83, 300, 45) for o in OUTCOMES},
                            "site-2": {o: _m(0.9, 40, 3) for o in OUTCOMES}},
               "peers": {"method": {"train_rows": 4200, "cv_folds": "5, grouped by patient"}, "test_rows": 600,
                         "pooled": pooled, "local": local, "seconds": 3.2}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = render_report(tmp_path)
    assert "## The model against its regression peers" in report
    assert "| federated model | 0.800 (0.750–0.850) |" in report
    assert "| logistic regression, note TF-IDF (1-2 grams) | 0.720 (0.670–0.770) |" in report
    assert "| the two stacked (out-of-fold logits) | 0.760 (0.710–0.810) |" in report
    assert "| true risk (oracle ceiling) | 0.950 | 0.950 | 0.950 |" in report
    assert "| site-1 | mortality_30d | 0.830 | 0.610 | 0.620 | 0.630 | 300 | 45 |" in report
    assert f"| site-2 | mortality_30d | {SUPPRESSED} |" in report  # 3 events: no numbers at all
    assert "0.900" not in report  # site-2's model AUROC sits in suppressed cells only


@pytest.mark.slow
def test_simulate_adds_the_federation_peers_and_reports_them(signal_cohort, tmp_path, monkeypatch, capsys):
    """`edfed simulate` (its federation replaced by a stub that scores like the server) writes and prints peers."""
    from edfed.cli.main import main
    from edfed.simulations import federated

    def fake_simulate(run_config, n_sites, quiet=False, verbose=False):
        Path(run_config["run-dir"]).mkdir(parents=True)  # as the real federation's run folder does
        cohort = load_cohort(signal_cohort, int(run_config["seed"]))
        test = cohort[cohort["split"] == "test"]
        labels = test[list(OUTCOMES)].to_numpy(float)
        from edfed.common.evaluation import oracle_risks
        from edfed.common.metrics import evaluate

        oracle = oracle_risks(signal_cohort, test)
        per_site = {s: evaluate(labels[(test["site"] == s).to_numpy()], oracle[(test["site"] == s).to_numpy()], 0)
                    for s in pd.unique(test["site"])}
        return {"kind": "federated", "config": dict(run_config), "final": evaluate(labels, oracle, 0, 0, oracle),
                "per_site": per_site, "privacy": {}, "wall_seconds": 1.0, "client_train_seconds": 1.0,
                "communication": {"bytes_sent_per_client_round": 1, "share_of_full_model": 0.01,
                                  "full_model_bytes": 100}}

    monkeypatch.setattr(federated, "simulate", fake_simulate)
    out = tmp_path / "run"
    assert main(["simulate", "--data", str(signal_cohort), "--out", str(out), "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "fitting regression peers:" in printed and "the model against each site's own regressions" in printed
    summary = __import__("json").loads((out / "summary.json").read_text())
    peers = summary["peers"]
    assert set(peers["local"]) == set(summary["per_site"]) == {"site-1", "site-2", "site-3"}
    for outcome, m in summary["final"].items():
        assert peers["pooled"]["stacked"][outcome]["n"] == m["n"]
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    own = peers["local"]["site-1"]
    truth = summary["per_site"]["site-1"]["safe_discharge"]["auroc"]
    assert (f"| site-1 | safe_discharge | {truth:.3f} | {own['structured']['safe_discharge']['auroc']:.3f} | "
            f"{own['tfidf']['safe_discharge']['auroc']:.3f} | {own['stacked']['safe_discharge']['auroc']:.3f} |"
            in report)
