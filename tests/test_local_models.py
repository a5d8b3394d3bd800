"""What a site deploys (issue 29): a blend of the global model stacked with its own regressions and its local-only
model; never a part below chance; recalibration keeps the ranking. Fast: no encoder is trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from edfed.client.local_models import (
    CANDIDATES,
    LOCAL_ONLY_WEIGHT,
    OWN_REGRESSION,
    _GlobalStack,
    apply_recipes,
    deployment_recipes,
    fit_recipes,
)
from edfed.common.contract import OUTCOMES
from edfed.common.data import load_site_splits
from edfed.common.metrics import evaluate
from edfed.common.peers import fit_peers
from edfed.simulations.cohort import generate_cohort


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    cohort = generate_cohort(tmp_path_factory.mktemp("local") / "cohort", n_sites=1, visits_per_site=1500, seed=2)
    rows = load_site_splits("site-1", cohort / "site-1.parquet", 0).table
    oracle = pd.read_parquet(cohort / "oracle" / "site-1.parquet").set_index("visit_id")
    return rows, oracle, cohort


def _risky_global(rows: pd.DataFrame, oracle: pd.DataFrame, seed: int) -> np.ndarray:
    """Stands for a global model that knows something the site's regressions do not: the true risk, blurred."""
    truth = np.nan_to_num(oracle.loc[rows["visit_id"], [f"risk_{o}" for o in OUTCOMES]].to_numpy(), nan=0.5)
    logit = np.log(truth / (1 - truth)) + np.random.default_rng(seed).normal(0, 0.8, truth.shape)
    return 1 / (1 + np.exp(-logit))


@pytest.mark.slow
def test_the_global_model_stacked_with_the_sites_regressions_beats_the_regressions_alone(site):
    rows, oracle, _ = site
    train, test = rows[rows["split"] == "train"], rows[rows["split"] == "test"]
    peers = fit_peers(train)
    stack = _GlobalStack.fit(peers, _risky_global(train, oracle, 0), train)
    stacked = stack.predict(peers, _risky_global(test, oracle, 1), test)
    labels = test[list(OUTCOMES)].to_numpy(float)
    ours, theirs = evaluate(labels, stacked, 0), evaluate(labels, peers.predict(test)["stacked"], 0)
    for outcome in ("mortality_30d", "safe_discharge"):
        assert ours[outcome]["auroc"] > theirs[outcome]["auroc"] + 0.005, outcome


def _views(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Labels [n, 3] and a signal per visit that two independent noisy views of it can each see part of."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, 3)).astype(float)
    return y, y + rng.normal(0, 1.0, y.shape)


def test_a_model_below_chance_on_validation_is_never_deployed():
    y, signal = _views(0)
    backwards = 1 / (1 + np.exp(signal))
    risks = {name: backwards for name in CANDIDATES}
    assert all(r == {OWN_REGRESSION: 1.0} for r in deployment_recipes(y, risks).values())
    risks["local-only"] = 1 / (1 + np.exp(-signal))
    assert all(r == {"local-only": 1.0} for r in deployment_recipes(y, risks).values())
    # A stack whose global model ranks backwards is replaced by the site's own stacked regression.
    risks["global + regressions"] = risks[OWN_REGRESSION] = 1 / (1 + np.exp(-signal))
    expected = {OWN_REGRESSION: 1 - LOCAL_ONLY_WEIGHT, "local-only": LOCAL_ONLY_WEIGHT}
    assert all(r == expected for r in deployment_recipes(y, risks).values())
    risks["global"] = risks["local-only"]
    assert all(set(r) == {"global + regressions", "local-only"} for r in deployment_recipes(y, risks).values())


def test_the_blend_of_two_views_beats_either_and_ignores_their_scale():
    y, signal = _views(3, 4000)
    rng = np.random.default_rng(4)
    views = [signal + rng.normal(0, 1.5, y.shape) for _ in range(2)]
    risks = {"global + regressions": 1 / (1 + np.exp(-views[0])), "local-only": 1 / (1 + np.exp(-views[1]))}
    risks["global"] = risks["global + regressions"]
    val, test = slice(0, 1000), slice(1000, None)
    recipes = fit_recipes(deployment_recipes(y[val], {n: r[val] for n, r in risks.items()}), y[val],
                          {n: r[val] for n, r in risks.items()})
    deployed = apply_recipes(recipes, {n: r[test] for n, r in risks.items()})
    ours = evaluate(y[test], deployed, 0)
    for name, risk in risks.items():
        theirs = evaluate(y[test], risk[test], 0)
        assert all(ours[o]["auroc"] > theirs[o]["auroc"] + 0.01 for o in OUTCOMES), name
    # A sharper model (its logits three times as large) gets no more say: the blend's ranking is unchanged.
    sharp = {**risks, "local-only": 1 / (1 + np.exp(-3 * views[1]))}
    again = apply_recipes(fit_recipes({o: r["parts"] for o, r in recipes.items()}, y[val],
                                      {n: r[val] for n, r in sharp.items()}), {n: r[test] for n, r in sharp.items()})
    for k in range(3):
        assert spearmanr(again[:, k], deployed[:, k]).statistic > 0.9999


@pytest.mark.slow
def test_a_global_model_that_ranks_backwards_is_left_out_of_the_stack(site):
    rows, oracle, _ = site
    train, test = rows[rows["split"] == "train"], rows[rows["split"] == "test"]
    peers = fit_peers(train)
    backwards = 1 - _risky_global(train, oracle, 0)
    stack = _GlobalStack.fit(peers, backwards, train)
    assert not any(fit[1] for fit in stack.fits.values() if fit is not None)
    unrelated = np.random.default_rng(5).uniform(size=(len(test), 3))  # what it predicts must not matter now
    stacked = stack.predict(peers, unrelated, test)
    assert np.allclose(stacked, stack.predict(peers, 1 - unrelated, test))


def test_recalibration_keeps_the_ranking_and_fixes_a_miscalibrated_risk():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.05, 0.9, (4000, 3))
    y = (rng.uniform(size=truth.shape) < truth).astype(float)
    under = {"local-only": truth**2}  # under-predicts, as the DP global model did between 0.3 and 0.6
    val, test = slice(0, 2000), slice(2000, None)
    parts = {o: {"local-only": 1.0} for o in OUTCOMES}
    recipes = fit_recipes(parts, y[val], {"local-only": under["local-only"][val]})
    fixed = apply_recipes(recipes, {"local-only": under["local-only"][test]})
    for k in range(3):
        assert spearmanr(fixed[:, k], under["local-only"][test, k]).statistic > 0.9999
    assert np.mean((fixed - y[test]) ** 2) < np.mean((under["local-only"][test] - y[test]) ** 2) - 0.002
    reversed_fit = fit_recipes(parts, 1 - y[val], {"local-only": under["local-only"][val]})
    assert all(r["calibration"] is None for r in reversed_fit.values())  # a reversing fit is never applied
