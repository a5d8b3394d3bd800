"""`edfed privacy-sweep`: end to end through Flower's simulation engine once, then resume behaviour with the
federation run in-process (the real ServerApp logic and ClientApp, see test_federation.InProcessGrid)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from flwr.supercore.task_identity import TaskIdentity
from test_federation import InProcessGrid, _sim_nodes

from edfed.cli.main import main
from edfed.common.errors import EdfedError
from edfed.common.privacy import PrivacyLedger
from edfed.simulations.cohort import generate_cohort
from edfed.simulations.sweep import parse_epsilons


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("sweep") / "cohort", n_sites=2, visits_per_site=60, seed=4)


@pytest.fixture(autouse=True)
def fast_enough(monkeypatch):
    """Speed only, nothing under test changes: 20 bootstrap draws instead of 200 (the intervals are not under
    test here and 200 dominate the runtime; the server's pooled evaluation and the local-only models run in this
    process, also under Ray), and one torch thread for tiny tensors on shared cores."""
    import torch

    import edfed.common.metrics

    original = edfed.common.metrics.outcome_metrics
    monkeypatch.setattr(edfed.common.metrics, "outcome_metrics", lambda y, p, bootstrap=200, seed=0, oracle=None:
                        original(y, p, min(bootstrap, 20), seed, oracle))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _argv(cohort: Path, out: Path, encoder: Path, epsilons: str = "2,inf", *extra: str) -> list[str]:
    # Batch 8: ~6 batches a site, so a sample rate of ~1/6; at 1/2 the RDP accountant alone takes a minute.
    return ["privacy-sweep", "--data", str(cohort), "--model", str(encoder), "--out", str(out), "--rounds", "1",
            "--epsilons", epsilons, "--seeds", "1", "--lora-layers", "1", "--lr", "0.01", "--batch-size", "8", *extra]


def _in_process(calls: list, crash: bool = False):
    """Stand-in for `edfed.simulations.federated.simulate`: the same federation, messages passed in-process."""
    from edfed.server.federation import run_federation

    def simulate(run_config: dict, n_sites: int, quiet: bool = False, verbose: bool = False) -> dict:
        calls.append((float(run_config["epsilon"]), int(run_config["seed"])))
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        summary = run_federation(InProcessGrid(_sim_nodes(n_sites)), {**run_config, "num-sites": n_sites},
                                 pooled=True)
        if crash:  # the coordinator dies after its last checkpoint, before the run counts as finished
            (Path(run_config["run-dir"]) / "summary.json").unlink()
            raise RuntimeError("coordinator crashed")
        return summary

    return simulate


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in [*out.glob("eps-*/seed-*/*.json"), *out.glob("local-only/*/summary.json")]}


@pytest.mark.slow
def test_sweep_end_to_end_then_rerun_runs_nothing_and_a_deleted_point_alone(cohort, tmp_path, tiny_encoder,
                                                                            monkeypatch):
    import edfed.simulations.federated

    out = tmp_path / "sweep"
    assert main(_argv(cohort, out, tiny_encoder)) == 0  # through Flower's simulation engine (Ray)
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["epsilon"]) == [2.0, math.inf] and list(results["seed"]) == [0, 0]
    for point in ("eps-2/seed-0", "eps-inf/seed-0"):
        summary = json.loads((out / point / "summary.json").read_text())
        audit = json.loads((out / point / "audit.json").read_text())
        row = results[results["epsilon"] == float(summary["config"]["epsilon"])].iloc[0]
        assert row["mortality_30d_auroc"] == pytest.approx(summary["final"]["mortality_30d"]["auroc"])
        assert row["attack_auroc"] == pytest.approx(audit["auroc"]) and audit["site"] == "site-1"
        assert (out / point / "ledgers").is_dir() == (point == "eps-2/seed-0")  # a fresh budget in each point
    dp = json.loads((out / "eps-2/seed-0/summary.json").read_text())
    assert 0 < max(p["epsilon"] for p in dp["privacy"].values()) <= 2.0 + 1e-6
    # The frozen layers are the sites' own (next to their tables), shared by every point, never in a run folder.
    assert not list(out.rglob("*cache*")) and any((cohort / ".edfed-cache").iterdir())
    sweep = json.loads((out / "summary.json").read_text())
    assert sweep["kind"] == "privacy-sweep"
    assert [b["epsilon"] for b in sweep["budget_vs_leakage"]] == ["2", "inf"]
    audits = [json.loads((out / p / "audit.json").read_text())["auroc"] for p in ("eps-2/seed-0", "eps-inf/seed-0")]
    assert [b["attack_auroc"] for b in sweep["budget_vs_leakage"]] == pytest.approx(audits)
    local = json.loads((out / "local-only" / "seed-0" / "summary.json").read_text())["final"]
    reference = sweep["references"]["local-only (each site alone, no DP)"]
    assert reference["mortality_30d_auroc"] == pytest.approx(local["mortality_30d"]["auroc"])  # one seed: its value
    markdown = (out / "results.md").read_text()
    assert "![privacy-utility](privacy_utility.png)" in markdown and "local-only" in markdown
    # Every budget: each site's deployed model against its local-only one, as the point's deployment measured it.
    gain = dp["deployment"]["gain_over_local_only"]["safe_discharge"]
    row = results[results["epsilon"] == 2.0].iloc[0]
    assert row["safe_discharge_deployed_gain"] == pytest.approx(gain["mean_gain"], nan_ok=True)
    regression = dp["deployment"]["gain_over_own_regression"]["safe_discharge"]
    assert row["safe_discharge_regression_gain"] == pytest.approx(regression["mean_gain"], nan_ok=True)
    assert "deployed model against what it can build alone" in markdown and f"{gain['mean_gain']:+.3f}" in markdown
    assert f"{regression['mean_gain']:+.3f}" in markdown and "own stacked regression" in markdown
    assert f"{dp['final']['mortality_30d']['auroc']:.3f}" in markdown
    assert (out / "privacy_utility.png").stat().st_size > 10_000

    before = _mtimes(out)
    calls: list = []
    monkeypatch.setattr(edfed.simulations.federated, "simulate", _in_process(calls))
    assert main(_argv(cohort, out, tiny_encoder)) == 0
    assert calls == [] and _mtimes(out) == before  # nothing re-run, not even an audit or a local-only model

    import shutil

    shutil.rmtree(out / "eps-2")
    assert main(_argv(cohort, out, tiny_encoder)) == 0
    assert calls == [(2.0, 0)]  # only the deleted point
    after = _mtimes(out)
    assert after["eps-inf/seed-0/summary.json"] == before["eps-inf/seed-0/summary.json"]
    assert after["eps-2/seed-0/summary.json"] != before["eps-2/seed-0/summary.json"]


@pytest.mark.slow
def test_half_finished_point_restarts_from_scratch_with_a_fresh_ledger(cohort, tmp_path, tiny_encoder, monkeypatch):
    import edfed.simulations.federated

    out, calls = tmp_path / "sweep", []
    point = out / "eps-1" / "seed-0"
    monkeypatch.setattr(edfed.simulations.federated, "simulate", _in_process(calls, crash=True))
    with pytest.raises(RuntimeError, match="crashed"):
        main(_argv(cohort, out, tiny_encoder, "1"))
    crashed_run = json.loads((point / "run.json").read_text())["run-id"]
    assert (point / "checkpoints" / "round-1.safetensors").exists() and not (point / "summary.json").exists()
    assert PrivacyLedger.open(point / "ledgers" / "site-1.json").spent(1e-5) > 0  # the crashed run spent budget

    monkeypatch.setattr(edfed.simulations.federated, "simulate", _in_process(calls))
    assert main(_argv(cohort, out, tiny_encoder, "1")) == 0
    assert calls == [(1.0, 0), (1.0, 0)]
    summary = json.loads((point / "summary.json").read_text())
    assert summary["run_id"] != crashed_run  # a new run, not a resumed one
    for site, privacy in summary["privacy"].items():
        # Resumed on the old ledger, the round would not fit in epsilon 1 and every site would refuse it.
        assert privacy["refused_rounds"] == 0 and 0 < privacy["epsilon"] <= 1.0 + 1e-6
        assert len(PrivacyLedger.open(point / "ledgers" / f"{site}.json").history) == 1
    assert (point / "audit.json").exists() and not (point / "cache").exists()


def test_bad_sweep_input_fails_cleanly(cohort, tmp_path, tiny_encoder, capsys):
    assert parse_epsilons("inf, 1,0.5,1") == [0.5, 1.0, math.inf]
    for epsilons, message in (("1,abc", "'abc' is not a number"), ("0,1", "must be positive")):
        with pytest.raises(EdfedError, match=message):
            parse_epsilons(epsilons)
        assert main(_argv(cohort, tmp_path / "a", tiny_encoder, epsilons)) == 2
    assert main(_argv(cohort, tmp_path / "b", tiny_encoder, "1", "--audit-site", "site-9")) == 2
    assert "site-9" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a sweep")
    assert main(_argv(cohort, taken, tiny_encoder, "1")) == 2
    assert "holds no sweep" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "sweep.json").write_text(json.dumps({"settings": {"lr": 0.5}}))
    assert main(_argv(cohort, tmp_path / "c", tiny_encoder, "1")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "lr" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
