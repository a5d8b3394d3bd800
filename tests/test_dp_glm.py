"""The DP-GLM experiment (simulations/dp_glm.py): its sensitivity is a true bound and its noise fits the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.contract import OUTCOMES
from common.data import load_cohort
from common.privacy import epsilon_of
from simulations.cohort import generate_cohort
from simulations.dp_glm import (
    glm_features,
    gradient_sum,
    noise_for,
    patient_weights,
    pooled_text,
    run,
    sensitivity,
    site_training_sets,
    train_federated,
)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("glm") / "cohort", n_sites=2, visits_per_site=120, seed=3)


@pytest.fixture(scope="module")
def features(cohort_dir, tiny_encoder):
    table = load_cohort(cohort_dir, 0)
    return table, glm_features(table, pooled_text(table, str(tiny_encoder)), 256)


def test_every_block_has_norm_at_most_one(features):
    _, x = features
    blocks = np.cumsum([0, 1, x.shape[1] - 1 - 256 - 32, 32, 256])  # intercept, structured, text (tiny: 32), lexical
    for start, end in zip(blocks[:-1], blocks[1:], strict=True):
        norms = np.sqrt(np.asarray(x[:, start:end].multiply(x[:, start:end]).sum(axis=1)).ravel())
        assert norms.max() <= 1 + 1e-5


def test_no_patient_moves_the_gradient_sum_by_more_than_the_sensitivity(features):
    table, x = features
    labels = table[list(OUTCOMES)].to_numpy(float)
    ids = table["patient_id"].to_numpy()
    weights = patient_weights(ids)
    assert np.bincount(np.unique(ids.astype(str), return_inverse=True)[1], weights).round(9).tolist() == \
        [1.0] * len(np.unique(ids))
    rng = np.random.default_rng(0)
    largest = 0.0
    for _ in range(3):  # far from zero too, where residuals approach +-1
        w = rng.normal(0, 5, (x.shape[1], len(OUTCOMES)))
        for patient in np.unique(ids)[:200]:
            rows = np.flatnonzero(ids == patient)
            largest = max(largest, np.linalg.norm(gradient_sum(w, x[rows], labels[rows], weights[rows])))
    assert 0.3 * sensitivity() < largest <= sensitivity() + 1e-9


def test_noise_is_the_smallest_that_fits_the_budget():
    noise = noise_for(8.0, 1e-5, 30)
    assert epsilon_of([(noise, 1.0, 30)], 1e-5) <= 8.0 < epsilon_of([(noise * 0.99, 1.0, 30)], 1e-5)
    assert noise_for(math.inf, 1e-5, 30) == 0.0


def test_training_without_noise_lowers_the_loss(features):
    table, x = features
    labels = table[list(OUTCOMES)].to_numpy(float)
    train = (table["split"] == "train").to_numpy()
    sites = site_training_sets(table, x, labels)
    assert sum(len(w) for _, _, w, _ in sites.values()) == train.sum()

    def loss(w):
        risk = np.clip(1 / (1 + np.exp(-(x[train] @ w))), 1e-9, 1 - 1e-9)
        y = labels[train]
        return np.nanmean(-(y * np.log(risk) + (1 - y) * np.log(1 - risk)))

    fitted = train_federated(sites, 20, 2.0, 1e-4, 0.0, np.random.default_rng(0))
    assert loss(fitted) < loss(np.zeros_like(fitted)) - 0.05


def test_run_reports_the_mean_of_its_draws_at_the_spent_epsilon(cohort_dir, tiny_encoder, tmp_path):
    result = run(cohort_dir, 4.0, 2, "val", 5, 2.0, 1e-4, model_dir=str(tiny_encoder),
                 cache=tmp_path / "text.npy")
    assert result["epsilon_spent"] <= 4.0 and result["noise_multiplier"] > 0
    for k, outcome in enumerate(OUTCOMES):
        assert result["auroc_mean"][outcome] == pytest.approx(np.mean([d[k] for d in result["auroc_by_draw"]]))
    assert (tmp_path / "text.npy").exists()
