"""`edfed train central` end to end on a tiny cohort and encoder, and the CLI's handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from edfed.cli.main import main
from edfed.common.config import RUN_DEFAULTS, run_config_from_args
from edfed.common.contract import OUTCOMES
from edfed.common.data import patient_split
from edfed.simulations.central import config_from_args
from edfed.simulations.cohort import generate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("central") / "cohort", visits_per_site=100, seed=1)


@pytest.mark.slow
def test_central_training_writes_the_interface_summary(cohort, tmp_path, tiny_encoder):
    out = tmp_path / "run"
    assert main(["train", "central", "--data", str(cohort), "--model", str(tiny_encoder), "--out", str(out),
                 "--epochs", "2", "--lora-layers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "central"
    assert {"config", "final", "per_site", "privacy", "communication", "wall_seconds"} <= set(summary)
    for outcome in OUTCOMES:
        metrics = summary["final"][outcome]
        assert {"auroc", "auprc", "brier", "ece", "n", "oracle_auroc"} <= set(metrics)
        # each outcome above chance (readmission has ~10 test events here, so no tighter bound per outcome)
        assert metrics["auroc"] > 0.5 and 0.5 < metrics["oracle_auroc"] <= 1
        # the pooled test split is the sites' test splits together
        assert metrics["n"] == sum(site[outcome]["n"] for site in summary["per_site"].values())
        assert metrics["auroc_ci"][0] <= metrics["auroc"] <= metrics["auroc_ci"][1]
    # It learned: two epochs of a tiny random encoder still find the structured signal (measured ~0.72).
    assert sum(summary["final"][o]["auroc"] for o in OUTCOMES) / len(OUTCOMES) > 0.65
    assert summary["history"][-1]["val_mean_auroc"] > summary["history"][0]["val_mean_auroc"] - 0.02
    assert set(summary["timings"]) >= {"contract_check_seconds", "frozen-layer_caching_seconds",
                                       "test_evaluation_seconds", "epochs"} and len(summary["timings"]["epochs"]) == 2
    assert summary["machine"]["precision"] in ("bf16", "fp32")
    assert set(summary["per_site"]) == {f"site-{k}" for k in range(1, 7)}
    assert summary["config"]["model"] == str(tiny_encoder) and summary["config"]["epochs"] == 2
    assert (out / "roc.png").stat().st_size > 1000 and (out / "calibration.png").stat().st_size > 1000


def test_bad_site_file_fails_cleanly_and_writes_nothing(cohort, tmp_path, capsys, tiny_encoder):
    data = tmp_path / "data"
    data.mkdir()
    for path in cohort.glob("site-*.parquet"):
        table = pd.read_parquet(path)
        if path.name == "site-2.parquet":
            table.loc[3, "spo2"] = 999.0  # a sentinel value
        table.to_parquet(data / path.name)
    out = tmp_path / "run"
    assert main(["train", "central", "--data", str(data), "--model", str(tiny_encoder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "site-2.parquet" in err and "spo2" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_model_directory_is_a_clean_error(cohort, tmp_path, capsys):
    assert main(["train", "central", "--data", str(cohort), "--model", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "nope" in capsys.readouterr().err


def test_patient_split_is_by_patient_and_deterministic(cohort):
    table = pd.read_parquet(cohort / "site-1.parquet")
    split = pd.Series(patient_split(table["patient_id"], seed=0), index=table.index)
    assert (split.groupby(table["patient_id"]).nunique() == 1).all()
    assert (split == pd.Series(patient_split(table["patient_id"], seed=0), index=table.index)).all()
    shares = split.value_counts(normalize=True)
    assert 0.55 < shares["train"] < 0.85 and shares["test"] > 0.1
    assert not (split == pd.Series(patient_split(table["patient_id"], seed=1), index=table.index)).all()


def test_flags_left_out_keep_the_files_defaults_and_given_flags_override_their_key():
    from edfed.cli.main import build_parser

    args = build_parser().parse_args(["simulate", "--rounds", "3", "--max-tokens", "64", "--epsilon", "inf"])
    run_config = run_config_from_args(args)
    changed = {k for k in RUN_DEFAULTS if run_config[k] != RUN_DEFAULTS[k]}
    assert changed == {"num-server-rounds", "max-tokens", "epsilon"}
    assert run_config["num-server-rounds"] == 3 and run_config["max-tokens"] == 64
    central = config_from_args(build_parser().parse_args(["train", "central"]))
    expected = RUN_DEFAULTS["central-lr"], RUN_DEFAULTS["central-epochs"], RUN_DEFAULTS["max-tokens"]
    assert (central.lr, central.epochs, central.max_tokens) == expected


def test_oracle_risks_align_when_sites_share_visit_ids(tmp_path):
    from edfed.common.evaluation import oracle_risks

    (tmp_path / "oracle").mkdir()
    for k, risk in ((1, 0.1), (2, 0.9)):
        pd.DataFrame({"visit_id": ["v1", "v2"], **{f"risk_{o}": [risk, risk] for o in OUTCOMES}}).to_parquet(
            tmp_path / "oracle" / f"site-{k}.parquet")
    table = pd.DataFrame({"site": ["site-2", "site-1", "site-2"], "visit_id": ["v1", "v2", "v2"]})
    risks = oracle_risks(tmp_path, table)
    assert risks.shape == (3, 3)
    assert list(risks[:, 0]) == [0.9, 0.1, 0.9]
