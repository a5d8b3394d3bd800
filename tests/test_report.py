"""`edfed report`: a real central run and synthetic summaries rendered to report.md, small cells suppressed."""

from __future__ import annotations

import json

import pytest

from edfed.cli.main import main
from edfed.common.contract import OUTCOMES
from edfed.server.report import SUPPRESSED, small_cell
from edfed.simulations.audit import audit_run
from edfed.simulations.cohort import generate_cohort


def _metrics(auroc: float, n: int, events: int) -> dict:
    return {"auroc": auroc, "auroc_ci": [auroc - 0.062, auroc + 0.058], "auprc": 0.456, "auprc_ci": [0.4, 0.5],
            "brier": 0.123, "ece": 0.045, "n": n, "events": events}


def _row(report: str, *cells: str) -> str:
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in report.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


@pytest.mark.slow
def test_report_of_a_real_central_run(tmp_path, tiny_encoder, capsys):
    data = generate_cohort(tmp_path / "cohort", n_sites=3, visits_per_site=150, seed=2)
    out = tmp_path / "run"
    assert main(["train", "central", "--data", str(data), "--model", str(tiny_encoder), "--out", str(out),
                 "--epochs", "1", "--lora-layers", "1"]) == 0
    audit = audit_run(out, "site-2")  # central runs keep their model (model.safetensors) for exactly this
    assert audit["model"] == "model.safetensors"
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for outcome, m in summary["final"].items():
        lo, hi = m["auroc_ci"]
        assert _row(report, outcome, f"{m['auroc']:.3f} ({lo:.3f}–{hi:.3f})").endswith(
            f"| {m['brier']:.3f} | {m['ece']:.3f} | {m['oracle_auroc']:.3f} | {m['n']} | {m['events']} |")
    shown = 0
    for site, outcomes in summary["per_site"].items():
        for outcome, m in outcomes.items():
            row = _row(report, site, outcome)
            assert (SUPPRESSED in row) == small_cell(m)
            if not small_cell(m):
                shown += 1
                assert f"| {m['auroc']:.3f} (" in row and f"| {m['n']} | {m['events']} |" in row
    assert shown > 0 and "suppressed" in report  # ~100 test visits a site: some cells large, some small
    for figure in ("roc.png", "calibration.png"):
        assert f"]({figure})" in report and (out / figure).exists()
    assert f"| site-2 | {audit['n_members']} | {audit['n_nonmembers']} | {audit['auroc']:.3f} |" in report
    assert "No differential privacy" in report and f"{summary['history'][0]['loss']:.3f}" in report
    # The regression peers: fitted on the training split, scored on exactly the model's test rows, in the report.
    peers = summary["peers"]
    splits = summary["splits"]
    assert (peers["method"]["train_rows"], peers["test_rows"]) == (splits["train"], splits["test"])
    assert set(peers["pooled"]) == {"structured", "tfidf", "stacked"}
    for outcomes in peers["pooled"].values():
        for outcome, m in outcomes.items():
            assert (m["n"], m["events"]) == (summary["final"][outcome]["n"], summary["final"][outcome]["events"])
            assert m["oracle_auroc"] == summary["final"][outcome]["oracle_auroc"]
    assert "## The model against its regression peers" in report
    m = summary["final"]["mortality_30d"]
    assert f"| edfed multimodal | {m['auroc']:.3f} ({m['auroc_ci'][0]:.3f}–{m['auroc_ci'][1]:.3f}) |" in report
    stacked = peers["pooled"]["stacked"]["safe_discharge"]
    assert f"{stacked['auroc']:.3f} ({stacked['auroc_ci'][0]:.3f}–{stacked['auroc_ci'][1]:.3f})" in report


def test_small_cells_are_suppressed_and_subgroups_rendered(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "roc.png").write_bytes(b"\x89PNG fake")  # calibration.png is missing: it must not be linked
    summary = {
        "kind": "federated", "run_id": "abc123", "config": {"epsilon": 8.0, "seed": 0, "strategy": "fedavg"},
        "final": {o: _metrics(0.801, 1200, 150) for o in OUTCOMES},
        "per_site": {"site-1": {"mortality_30d": _metrics(0.777, 200, 3),  # 3 events
                                "safe_discharge": _metrics(0.812, 200, 80),
                                "readmission_30d": _metrics(0.733, 200, 195)},  # 5 non-events
                     "site-2": {"mortality_30d": {"auroc": 0.744, "n": 50}}},  # no event count: not shown
        "deployment": {
            **{c: {"site-3": {"mortality_30d": _metrics(0.701 + k / 100, 200, 3),
                              "safe_discharge": _metrics(0.801 + k / 100, 200, 80)}}
               for k, c in enumerate(("local-only", "global", "personalized", "global + local-only",
                                      "regression: stacked", "global + regressions"))},
            "deployed": {"site-3": {"mortality_30d": _metrics(0.765, 200, 3),
                                    "safe_discharge": _metrics(0.834, 200, 80)}},
            "choices": {"site-3": {"mortality_30d": "global", "safe_discharge": "personalized"}},
            "gain_over_local_only": {"safe_discharge": {"mean_gain": 0.0123, "mean_gain_ci": [-0.004, 0.027],
                                                        "sites": 6}},
            "gain_over_own_regression": {"safe_discharge": {"mean_gain": 0.0071, "mean_gain_ci": [-0.009, 0.021],
                                                            "sites": 6}}},
        "subgroups": {"sex": {"female": {"mortality_30d": _metrics(0.821, 600, 70)},
                              "male": {"mortality_30d": _metrics(0.699, 40, 4)}},
                      "age band": {"80+": {"safe_discharge": _metrics(0.688, 300, 120)}}},
        "privacy": {"site-1": {"epsilon": 7.95, "delta": 1e-5, "noise_multiplier": 1.234, "sample_rate": 0.03,
                               "steps": 132, "budget": 8.0, "refused_rounds": 0}},
        "communication": {"bytes_sent_per_client_round": 297508, "full_model_bytes": 91150372,
                          "share_of_full_model": 0.00326},
        "wall_seconds": 457.6,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert _row(report, "site-1", "safe_discharge", "0.812 (0.750–0.870)")
    for site, outcome in (("site-1", "mortality_30d"), ("site-1", "readmission_30d"), ("site-2", "mortality_30d")):
        assert _row(report, site, outcome, SUPPRESSED)
    assert "0.777" not in report and "0.733" not in report and "0.744" not in report and "0.765" not in report
    assert "## Each site's deployed model against what it can build alone" in report
    # deployed, chosen, local-only, own stacked regression, then global, global + regressions, personalized
    assert _row(report, "site-3", "safe_discharge", "0.834", "personalized", "0.801", "0.841", "0.811", "0.851",
                "0.821")
    assert _row(report, "site-3", "mortality_30d", SUPPRESSED) and "0.701" not in report
    assert _row(report, "deployed - local-only", "safe_discharge", "0.012", "[-0.004, 0.027]", "6")
    assert _row(report, "deployed - own stacked regression", "safe_discharge", "0.007", "[-0.009, 0.021]", "6")
    assert _row(report, "female", "mortality_30d", "0.821 (0.759–0.879)") and "0.699" not in report
    assert _row(report, "male", "mortality_30d", SUPPRESSED) and "0.688 (" in _row(report, "80+", "safe_discharge")
    assert "### sex" in report and "### age band" in report
    assert _row(report, "site-1", "7.950", "8.000", "1e-05", "1.234", "0.0300", "132", "0")
    assert "297,508 bytes" in report and "457.6 s" in report
    assert "![roc](roc.png)" in report and "calibration.png" not in report
    assert "Membership-inference audit" not in report  # no audit.json


def test_experiment_folder_links_its_runs_and_renders_csv(tmp_path, capsys):
    folder = tmp_path / "experiment"
    for arm, auroc in (("arm-a", 0.71), ("nested/arm-b", 0.72)):
        (folder / arm).mkdir(parents=True)
        (folder / arm / "summary.json").write_text(json.dumps(
            {"kind": "central", "final": {o: _metrics(auroc, 500, 50) for o in OUTCOMES}, "wall_seconds": 12.0}))
    (folder / "comparison.csv").write_text("arm,mean_auroc\narm-a,0.7101\narm-b,0.7202\n")
    (folder / "figure.png").write_bytes(b"\x89PNG fake")
    # An experiment's own results (another command's format): arms, and subgroups with a small cell.
    results = {"experiment": "subgroups", "arms": {"arm-a": {"label": "multimodal", "final": {
                   "mortality_30d": _metrics(0.711, 300, 8)}}},  # pooled: shown whole
               "subgroups": {"sex": {"female": {"mortality_30d": _metrics(0.766, 150, 30)},
                                     "male": {"mortality_30d": _metrics(0.655, 150, 6)}}},
               "delta_auroc_vs_all_sections": {"no-notes": {"mortality_30d": -0.0412}}}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "results.md").write_text("# subgroups\n\n| male | 0.655 [6/150] |\n")  # not suppressed there
    assert main(["report", str(folder)]) == 0
    report = (folder / "report.md").read_text()
    assert "| [arm-a](arm-a/report.md) | central | 0.710 | 0.710 | 0.710 | 12 |" in report
    assert "[nested/arm-b](nested/arm-b/report.md)" in report and (folder / "nested/arm-b/report.md").exists()
    assert "| arm-b | 0.720 |" in report and "![figure](figure.png)" in report
    assert _row(report, "multimodal", "mortality_30d", "0.711 (0.649–0.769)")
    assert _row(report, "female", "mortality_30d", "0.766 (0.704–0.824)")
    assert _row(report, "male", "mortality_30d", SUPPRESSED) and "0.655" not in report
    assert "[results.md](results.md)" in report and "| no-notes | -0.041 |" in report
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "nothing to report" in err and "no such folder" in err and "Traceback" not in err
