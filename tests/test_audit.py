"""The membership-inference audit: it must catch a model that memorised its training visits, stay at chance
when both sides are unseen, and find a run's final model in every form a run folder keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from edfed.common.config import TrainConfig
from edfed.common.data import VisitDataset, load_site_splits
from edfed.common.errors import EdfedError
from edfed.common.features import structured_feature_names
from edfed.common.model import OutcomeModel
from edfed.common.train import make_loader, make_optimizer, train_epoch
from edfed.simulations.audit import audit_model, audit_run, membership_attack
from edfed.simulations.cohort import generate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("audit") / "cohort", n_sites=2, visits_per_site=500, seed=11)


@pytest.fixture(scope="module")
def site(cohort) -> pd.DataFrame:
    return load_site_splits("site-1", cohort / "site-1.parquet", seed=0).table


@pytest.fixture(scope="module")
def overfit(site) -> tuple[OutcomeModel, pd.DataFrame]:
    """A structured model trained to memorise 40 visits: 150 epochs, lr 1e-2, no weight decay, no DP."""
    members = site[site["split"] == "train"].head(40)
    config = TrainConfig(modality="structured", lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    model = OutcomeModel(config, n_struct=len(structured_feature_names()))
    data = VisitDataset(members, None, config)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 750 tiny steps: a second thread only adds contention (10x slower on 2 busy cores)
    try:
        for epoch in range(150):
            train_epoch(model, make_loader(data, 8, shuffle=True, seed=epoch), optimizer)
    finally:
        torch.set_num_threads(threads)
    return model, members


def test_overfit_model_is_detected(site, overfit):
    model, members = overfit
    result = audit_model(model, members, site[site["split"] == "test"], tokenizer=None)
    assert result["n_members"] == result["n_nonmembers"] == 40  # test (~100 visits) subsampled to the 40 members
    assert result["auroc"] > 0.65, result  # 0.71 here; many unseen visits are easy, so even memorisation is no 1.0
    assert result["mean_loss_members"] < 0.01 < result["mean_loss_nonmembers"]
    assert result["tpr_at_fpr_10pct"] > 0.1 and 0.6 < result["best_balanced_accuracy"] <= 1
    assert result["confidence_auroc"] > 0.65


def test_two_halves_of_unseen_visits_are_at_chance(cohort, overfit):
    model, _ = overfit
    unseen = pd.concat([load_site_splits(f"site-{k}", cohort / f"site-{k}.parquet", seed=0).table for k in (1, 2)])
    unseen = unseen[unseen["split"] != "train"].sample(frac=1.0, random_state=0)  # ~300 visits, none trained on
    half = len(unseen) // 2
    result = audit_model(model, unseen.iloc[:half], unseen.iloc[half:], tokenizer=None)
    assert result["n_members"] > 120
    assert 0.38 < result["auroc"] < 0.62, result  # about 3.5 standard errors either side of 0.5


def test_attack_balances_the_sets_and_reads_the_roc_curve():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.exponential(0.2, 1000), rng.exponential(1.0, 50)
    result = membership_attack(members, nonmembers, seed=1)
    assert result["n_members"] == result["n_nonmembers"] == 50
    assert result["auroc"] > 0.7
    assert result == membership_attack(members, nonmembers, seed=1)  # the subsample is fixed by the seed
    separated = membership_attack(np.r_[np.full(20, 0.1), np.nan], np.full(20, 2.0))  # NaN = no label: dropped
    assert separated["auroc"] == 1.0 and separated["tpr_at_fpr_1pct"] == 1.0
    assert separated["best_balanced_accuracy"] == 1.0 and separated["n_members"] == 20
    with pytest.raises(EdfedError, match="at least 5"):
        membership_attack(np.ones(3), np.ones(30))


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["full", "compact", "glm"])
def test_audit_run_finds_the_checkpoint_and_the_peft_adapter(cohort, tmp_path, tiny_encoder, architecture):
    from edfed.server.run_folder import RunFolder

    config = TrainConfig(model=str(tiny_encoder), lora_layers=1, lora_r=4, architecture=architecture)
    torch.manual_seed(config.seed)
    model = OutcomeModel(config, n_struct=len(structured_feature_names()))
    with torch.no_grad():  # a non-trivial state: B = 0 at init would hide a LoRA loading mistake
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    run_dir = tmp_path / "run"
    RunFolder(run_dir).save_round(1, model, model.trainable_state())
    summary = {"kind": "federated", "config": {"train": config.to_dict(), "data-dir": str(cohort)}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    from_checkpoint = audit_run(run_dir, "site-2")
    assert from_checkpoint["model"] == "checkpoints/round-1.safetensors" and from_checkpoint["site"] == "site-2"
    assert json.loads((run_dir / "audit.json").read_text()) == from_checkpoint
    (run_dir / "checkpoints" / "round-1.safetensors").unlink()  # a deployed coordinator may keep only adapter/
    from_adapter = audit_run(run_dir, "site-2")
    assert from_adapter["model"] == "adapter"
    assert from_adapter["auroc"] == pytest.approx(from_checkpoint["auroc"], abs=1e-9)
    assert from_adapter["mean_loss_members"] == pytest.approx(from_checkpoint["mean_loss_members"], rel=1e-5)
    with pytest.raises(EdfedError, match="site-1, site-2"):
        audit_run(run_dir, "site-9")
    with pytest.raises(EdfedError, match="no summary.json"):
        audit_run(tmp_path / "nothing")
