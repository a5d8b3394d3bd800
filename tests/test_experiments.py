"""`edfed experiment`: the named comparisons on a tiny cohort and encoder, their arms, results and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import edfed.client.local_models as local_models
import edfed.simulations.central as central
import edfed.simulations.experiments as experiments
import edfed.simulations.federated as federated
from edfed.cli.main import main
from edfed.common.config import NOTE_SECTIONS
from edfed.common.contract import OUTCOMES
from edfed.common.data import load_cohort
from edfed.common.metrics import evaluate
from edfed.simulations.cohort import generate_cohort
from edfed.simulations.experiments import arm_parts, experiment_arms, subgroup_levels, subgroup_metrics


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("experiments") / "cohort", visits_per_site=60, seed=1)


def _args(name: str, cohort: Path, encoder: Path, out: Path, *extra: str) -> list[str]:
    return ["experiment", name, "--data", str(cohort), "--model", str(encoder), "--out", str(out), "--epochs", "1",
            "--bootstrap", "5", *extra]


@pytest.fixture(scope="module")
def modality_run(cohort, tiny_encoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("modality") / "experiment"
    assert main(_args("modality", cohort, tiny_encoder, out)) == 0
    return out


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe equality


@pytest.mark.slow
def test_modality_results_hold_every_arm_with_its_own_summary_values(modality_run):
    results = json.loads((modality_run / "results.json").read_text())
    table = (modality_run / "results.md").read_text()
    arms = experiment_arms("modality", [])
    assert list(results["arms"]) == [a.name for a in arms]
    assert {"logistic-regression", "gradient-boosting"} <= set(results["arms"])
    summaries = {a.name: json.loads((modality_run / a.name / "summary.json").read_text()) for a in arms}
    for arm in arms:
        summary = summaries[arm.name]
        assert _same(results["arms"][arm.name]["final"], summary["final"])
        row = next(line for line in table.splitlines() if line.startswith(f"| {arm.label} |"))
        for outcome in OUTCOMES:
            m = summary["final"][outcome]
            lo, hi = m["auroc_ci"]
            assert f"| {m['auroc']:.3f} ({lo:.3f}-{hi:.3f}) | {m['auprc']:.3f} |" in row, (arm.name, outcome)
            # every arm, neural or not, is scored on the same pooled test visits
            assert m["n"] == summaries["multimodal"]["final"][outcome]["n"]
        assert summary["splits"]["train"] == summaries["multimodal"]["splits"]["train"]
    for name in ("multimodal", "text", "structured"):
        assert summaries[name]["kind"] == "central" and summaries[name]["config"]["modality"] == name
        assert summaries[name]["config"]["epochs"] == 1
    assert summaries["gradient-boosting"]["kind"] == "baseline"
    assert summaries["logistic-regression"]["config"]["estimator"] == "logistic"
    assert results["settings"]["epochs"] == 1 and results["settings"]["rounds"] is None
    assert (modality_run / "auroc.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_second_invocation_reruns_only_the_unfinished_arm(modality_run, cohort, tiny_encoder, tmp_path,
                                                            monkeypatch, capsys):
    out = tmp_path / "experiment"
    shutil.copytree(modality_run, out)
    (out / "gradient-boosting" / "summary.json").unlink()  # as if interrupted during the last arm
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    trained, baselines = [], []
    fit, fit_baseline = central.fit_model, experiments.fit_structured_baseline
    monkeypatch.setattr(central, "fit_model", lambda *a, **k: trained.append(1) or fit(*a, **k))
    monkeypatch.setattr(experiments, "fit_structured_baseline",
                        lambda arm, *a, **k: baselines.append(arm.name) or fit_baseline(arm, *a, **k))
    assert main(_args("modality", cohort, tiny_encoder, out)) == 0
    assert trained == [] and baselines == ["gradient-boosting"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert (out / "gradient-boosting" / "summary.json").exists()
    # the same folder under other settings is refused, not silently mixed
    capsys.readouterr()
    assert main(_args("modality", cohort, tiny_encoder, out)[:-4] + ["--epochs", "2"]) == 2
    assert "epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_subgroups_from_a_finished_arm_partition_the_test_split(modality_run, cohort, tiny_encoder, tmp_path,
                                                                monkeypatch):
    out = tmp_path / "subgroups"
    out.mkdir()
    shutil.copytree(modality_run / "multimodal", out / "multimodal")  # finished: only the scoring runs
    monkeypatch.setattr(central, "fit_model", lambda *a, **k: pytest.fail("a finished arm was re-trained"))
    assert main(_args("subgroups", cohort, tiny_encoder, out)) == 0
    results = json.loads((out / "results.json").read_text())
    n_test = {o: m["n"] for o, m in results["arms"]["multimodal"]["final"].items()}
    assert set(results["subgroups"]) == {"age", "sex", "site", "visits"}
    for levels in results["subgroups"].values():
        for outcome in OUTCOMES:
            assert sum(level[outcome]["n"] for level in levels.values()) == n_test[outcome]
    assert "## Subgroups of the test split" in (out / "results.md").read_text()


def test_subgroup_metrics_on_a_constructed_table():
    rng = np.random.default_rng(0)
    n = 60
    table = pd.DataFrame({
        "visit_id": [f"v{i}" for i in range(n)],
        "patient_id": [f"p{i // 2}" if i < 20 else f"p{i}" for i in range(n)],  # p0..p9: two visits each
        "site": [["site-1", "site-2", "site-10"][(i // 2) % 3] for i in range(n)],
        "age": np.r_[[49.9, 50.0, 69.9, 70.0], rng.uniform(18, 100, n - 4)],
        "sex": rng.choice(["female", "male"], n),
    })
    labels = (rng.random((n, 3)) < 0.4).astype(float)
    labels[rng.random(n) < 0.2, 2] = np.nan  # readmission not applicable
    probs = rng.random((n, 3))
    assert list(subgroup_levels(table)["age"][:4]) == ["<50", "50-69", "50-69", ">=70"]
    metrics = subgroup_metrics(table, labels, probs, bootstrap=0)
    pooled = evaluate(labels, probs, bootstrap=0)
    assert list(metrics["site"]) == ["site-1", "site-2", "site-10"]
    assert list(metrics["visits"]) == ["one visit", "several visits"]
    assert metrics["visits"]["several visits"]["mortality_30d"]["n"] == 20
    for group, levels in metrics.items():
        for outcome in OUTCOMES:
            assert sum(m[outcome]["n"] for m in levels.values()) == pooled[outcome]["n"], group
            assert sum(m[outcome]["events"] for m in levels.values()) == pooled[outcome]["events"], group


def test_notes_arms_remove_exactly_one_section_or_keep_one_half(cohort, tmp_path, monkeypatch):
    arms = {a.name: a.changes["note_sections"] for a in experiment_arms("notes", [])}
    assert arms.pop("all-sections") == NOTE_SECTIONS
    assert arms.pop("only-impression-assessment_plan") == ("impression", "assessment_plan")
    assert arms.pop("only-triage-history") == ("triage", "history")
    assert sorted(arms) == sorted(f"without-{s}" for s in NOTE_SECTIONS)
    for section in NOTE_SECTIONS:
        kept = arms[f"without-{section}"]
        assert tuple(s for s in NOTE_SECTIONS if s != section) == kept  # the rest, in reading order
    # the sections reach the training config of each arm (training itself replaced by a stub)
    seen = {}

    def fake_train(config, data_dir, out, **kwargs):
        seen[out.name] = config
        _write_fake_summary(out, 0.8 - 0.01 * len(seen))

    monkeypatch.setattr(central, "train_central", fake_train)
    assert main(_args("notes", cohort, tmp_path / "enc", tmp_path / "notes")) == 0
    for name, sections in {"all-sections": NOTE_SECTIONS, **arms}.items():
        assert seen[name].note_sections == sections and seen[name].modality == "multimodal"
    results = json.loads((tmp_path / "notes" / "results.json").read_text())
    assert results["delta_auroc_vs_all_sections"]["without-impression"]["mortality_30d"] == pytest.approx(-0.01)


def test_loso_arms_train_without_the_held_out_site_and_test_on_all_of_it(cohort):
    table = load_cohort(cohort, 0)
    sites = sorted(table["site"].unique())
    arms = experiment_arms("loso", sites)
    assert [a.held_out for a in arms] == ["", *sites]
    for arm in arms[1:]:
        train, val, test = arm_parts(arm, table)
        assert arm.held_out not in set(train["site"]) | set(val["site"])
        assert set(train["site"]) == set(sites) - {arm.held_out}
        assert set(test["visit_id"]) == set(table.loc[table["site"] == arm.held_out, "visit_id"])
        others = table[table["site"] != arm.held_out]
        assert len(train) == (others["split"] == "train").sum() and len(val) == (others["split"] == "val").sum()


def test_settings_reads_federated_and_local_only_results(cohort, tmp_path, monkeypatch):
    calls = []
    test = load_cohort(cohort, 0).query("split == 'test'")

    def fake_simulate(args):
        calls.append(args)
        summary = _write_fake_summary(args.out, 0.75, per_site=test["site"].unique())
        for site, rows in test.groupby("site"):  # what local_only_models keeps: predictions per site
            (args.out / "local-only" / site).mkdir(parents=True)
            pd.DataFrame({"site": rows["site"], "visit_id": rows["visit_id"], **{o: rows[o] for o in OUTCOMES},
                          **{f"p_{o}": np.linspace(0, 1, len(rows)) for o in OUTCOMES}}).to_parquet(
                args.out / "local-only" / site / "predictions.parquet")
        summary.update(local_only=summary["per_site"], wall_seconds_total=30.0,
                       config={"num-server-rounds": args.rounds, "local-epochs": 1, "strategy": "fedavg"})
        (args.out / "summary.json").write_text(json.dumps(summary))

    monkeypatch.setattr(central, "train_central", lambda config, data_dir, out, **k: _write_fake_summary(out, 0.8))
    monkeypatch.setattr(federated, "run_simulate", fake_simulate)
    out = tmp_path / "settings"
    assert main(_args("settings", cohort, tmp_path / "enc", out, "--rounds", "3", "--epsilon", "8")) == 0
    (args,) = calls
    assert args.rounds == 3 and args.epsilon == 8 and args.local_baselines and args.out == out / "federated"
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["rounds"] == 3 and results["settings"]["epsilon"] == 8
    assert results["local_only"]["final"]["mortality_30d"]["n"] == len(test)
    assert results["arms"]["federated"]["mean_per_site_auroc"]["mortality_30d"] == pytest.approx(0.75)
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert any("centralized" in r for r in rows) and any("DP epsilon 8" in r for r in rows)
    assert any(r.startswith("| local-only") for r in rows)
    # a federation that finished before its local-only baselines: only those are run again
    summary = json.loads((out / "federated" / "summary.json").read_text())
    local = summary.pop("local_only")
    (out / "federated" / "summary.json").write_text(json.dumps(summary))
    baselines = []
    monkeypatch.setattr(local_models, "local_only_models", lambda *a: baselines.append(1) or local)
    assert main(_args("settings", cohort, tmp_path / "enc", out, "--rounds", "3", "--epsilon", "8")) == 0
    assert len(calls) == 1 and baselines == [1]


def test_experiment_command_lists_and_rejects_flags_that_do_not_apply(cohort, tmp_path, capsys):
    assert main(["experiment", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("modality", "settings", "notes", "subgroups", "loso"))
    assert main(["experiment", "modality", "--data", str(cohort), "--rounds", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--rounds" in err and "Traceback" not in err and not (tmp_path / "x").exists()


def _write_fake_summary(out: Path, auroc: float, per_site=()) -> dict:
    metrics = {o: {"auroc": auroc, "auroc_ci": [auroc - 0.1, auroc + 0.1], "auprc": 0.5, "n": 10, "events": 3}
               for o in OUTCOMES}
    summary = {"kind": "central", "final": metrics, "per_site": {s: metrics for s in per_site}, "wall_seconds": 1.0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary))
    return summary
