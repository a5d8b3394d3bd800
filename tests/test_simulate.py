"""`edfed simulate` through Flower's real simulation engine (Ray), six sites, tiny encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edfed.cli.main import main
from edfed.simulations.cohort import generate_cohort


@pytest.mark.slow
def test_six_site_two_round_simulation_improves_over_round_zero(tmp_path, tiny_encoder, capsys):
    data = generate_cohort(tmp_path / "cohort", visits_per_site=120, seed=5)
    out = tmp_path / "run"
    assert main(["simulate", "--data", str(data), "--model", str(tiny_encoder), "--out", str(out), "--rounds", "2",
                 "--local-epochs", "2", "--epsilon", "inf", "--lr", "0.01", "--lora-layers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "federated" and summary["num_rounds"] == 2
    # A log file follows round 1 site by site, sees the time left, and ends with what to run next.
    log = capsys.readouterr().out
    firsts = [line for line in log.splitlines() if line.startswith("round 1: site-")]
    assert len(firsts) == 6 and "(6/6 sites)" in firsts[-1] and all("s into the round" in f for f in firsts)
    assert "min left for rounds 2-2" in log and f"next: edfed report {out}" in log
    start, end = (np.mean(list(summary["rounds"][r].values())) for r in ("0", "2"))
    assert end > start + 0.05, summary["rounds"]
    assert len(summary["privacy"]) == 6 and summary["communication"]["bytes_sent_per_client_round"] > 0
    assert (out / "adapter" / "adapter_config.json").exists()
    # Every phase is timed and the phases fit inside the whole job's wall time.
    timings = summary["timings"]
    assert set(timings["rounds"]) == {"0", "1", "2"} and set(timings["site_data_seconds"]) == set(summary["privacy"])
    phases = [timings["contract_check_seconds"], timings["join_seconds"], timings["final_evaluation_seconds"],
              *(r["seconds"] + r["validation_seconds"] for r in timings["rounds"].values())]
    assert all(t > 0 for t in phases) and sum(phases) <= summary["wall_seconds_total"]
    # The overhead is the federation's wall time over the sites' summed round time, as recorded; no site's round
    # outlasts the federation, so that sum stays under sites x wall time.
    assert 0 < summary["client_step_seconds"] <= summary["client_train_seconds"]
    assert summary["client_train_seconds"] < len(summary["privacy"]) * summary["wall_seconds"]
    assert summary["federation_overhead"] == pytest.approx(summary["wall_seconds"] / summary["client_train_seconds"])
    assert set(summary["precision"]) == set(summary["privacy"])
