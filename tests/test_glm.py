"""The DP model (architecture "glm"): its sensitivity is a true bound, a DP site spends exactly what its ledger says,
only the GLM's two arrays leave (a federation and a site's deployment on it: tests/test_federation.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edfed.client.site import SiteSettings, train_round
from edfed.common.config import TrainConfig
from edfed.common.data import VisitDataset, load_site_splits
from edfed.common.features import load_tokenizer
from edfed.common.model import build_model
from edfed.common.privacy import PrivacyLedger, epsilon_of
from edfed.common.train import cache_frozen_layers, glm_gradient_sum, glm_rows, glm_step


def _config(tiny_encoder, **changes) -> TrainConfig:
    return TrainConfig(model=str(tiny_encoder), architecture="glm", lexical_features=256, **changes)


def _rows(cohort, tiny_encoder, model, unit="patient"):
    table = load_site_splits("site-1", cohort / "site-1.parquet", 0).part("train")
    dataset = VisitDataset(table, load_tokenizer(model.config), model.config)
    cache_frozen_layers(model, dataset)
    return glm_rows(model, dataset, unit), table


def test_every_feature_block_has_norm_at_most_one_whatever_the_input(cohort, tiny_encoder):
    model = build_model(_config(tiny_encoder))
    rows, _ = _rows(cohort, tiny_encoder, model)
    width_struct = model.glm.in_features - model.encoder.config.hidden_size - 256
    blocks = np.cumsum([0, width_struct, model.encoder.config.hidden_size, 256])
    for start, end in zip(blocks[:-1], blocks[1:], strict=True):
        assert rows.features[:, start:end].norm(dim=1).max() <= 1.0
    wild = {"struct": torch.full((2, width_struct), 1e6), "lexical": torch.full((2, 256), 50.0),
            "hidden": torch.randn(2, 5, model.encoder.config.hidden_size) * 1e4,
            "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    x = model.glm_inputs(wild)
    assert x.norm(dim=1).max() <= math.sqrt(model.glm_blocks - 1)
    assert model.glm_sensitivity == pytest.approx(math.sqrt(3) * math.sqrt(4))


def test_no_patient_moves_the_gradient_sum_by_more_than_the_sensitivity(cohort, tiny_encoder):
    model = build_model(_config(tiny_encoder))
    rows, table = _rows(cohort, tiny_encoder, model)
    ids = table["patient_id"].to_numpy()
    sums = {p: 0.0 for p in ids}
    for p, w in zip(ids, rows.weights.tolist(), strict=True):
        sums[p] += w
    assert np.allclose(list(sums.values()), 1.0)  # every patient weighs 1
    largest = 0.0
    torch.manual_seed(0)
    for _ in range(3):  # far from zero too, where residuals approach +-1
        with torch.no_grad():
            model.glm.weight.normal_(0, 5)
            model.glm.bias.normal_(0, 5)
        for patient in np.unique(ids)[:100]:
            mask = torch.from_numpy(ids == patient)
            one = type(rows)(rows.features[mask], rows.labels[mask], rows.weights[mask])
            weight, bias = glm_gradient_sum(model, one)
            largest = max(largest, float(torch.sqrt(weight.square().sum() + bias.square().sum())))
    assert 0.3 * model.glm_sensitivity < largest <= model.glm_sensitivity


def test_steps_without_noise_lower_the_loss(cohort, tiny_encoder):
    model = build_model(_config(tiny_encoder))
    rows, _ = _rows(cohort, tiny_encoder, model)

    def loss() -> float:
        logits = rows.features @ model.glm.weight.T + model.glm.bias
        known = ~torch.isnan(rows.labels)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(rows.labels),
                                                                   reduction="none")
        return float((bce * known).sum() / known.sum())

    before = loss()
    for _ in range(10):
        glm_step(model, rows, rows.units)
    assert loss() < before - 0.05


def test_a_dp_site_takes_full_batch_gaussian_steps_within_its_budget(cohort, tmp_path, tiny_encoder):
    config = _config(tiny_encoder, glm_steps=3)
    settings = SiteSettings(name="site-1", data_path=cohort / "site-1.parquet", epsilon=4.0, delta=1e-5,
                            declared_patients=100, create_ledger=True,
                            ledger_path=tmp_path / "ledger.json", dp_seed="mine")
    start = build_model(config).trainable_state()
    states = []
    for server_round in (1, 2):
        state, metrics = train_round(settings, config, start, run_id="r", server_round=server_round, num_rounds=2,
                                     local_epochs=1)
        assert set(state) == {"glm.weight", "glm.bias"} and metrics["sample-rate"] == 1.0 and metrics["steps"] == 3
        states.append(state)
    history = PrivacyLedger.open(settings.ledger_path).history
    assert [(h["sample-rate"], h["steps"]) for h in history] == [(1.0, 3), (1.0, 3)]
    noise = history[0]["noise"]
    assert epsilon_of([(noise, 1.0, 6)], 1e-5) <= 4.0 < epsilon_of([(0.98 * noise, 1.0, 6)], 1e-5)
    # The same global model, two rounds: other noise (the site's secret seed moves on with its ledger).
    assert not torch.equal(states[0]["glm.weight"], states[1]["glm.weight"])
    refused, metrics = train_round(settings, config, start, run_id="r2", server_round=1, num_rounds=2,
                                   local_epochs=1)
    assert refused is None and metrics["refused"] == 1  # the budget is spent: nothing more leaves
