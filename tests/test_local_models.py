"""What a site deploys (issue 29): its candidates include its own regressions and the global model stacked with
them; the choice never takes a model below chance; recalibration keeps the ranking. Fast: no encoder is trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.local_models import CANDIDATES, OWN_REGRESSION, _GlobalStack, choose, recalibrate
from common.contract import OUTCOMES
from common.data import load_site_splits
from common.metrics import evaluate
from common.peers import fit_peers
from simulations.cohort import generate_cohort


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


def test_a_model_below_chance_on_validation_is_never_deployed():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    signal = y + rng.normal(0, 1.0, y.shape)
    risks = {name: 1 / (1 + np.exp(signal)) for name in CANDIDATES}  # every candidate ranks backwards
    assert set(choose(y, risks).values()) == {OWN_REGRESSION}
    risks["local-only"] = 1 / (1 + np.exp(-signal))
    assert set(choose(y, risks).values()) == {"local-only"}


def test_recalibration_keeps_the_ranking_and_fixes_a_miscalibrated_risk():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.05, 0.9, 4000)
    y = (rng.uniform(size=truth.size) < truth).astype(float)
    under = truth**2  # under-predicts, as the DP global model did between 0.3 and 0.6
    val, test = slice(0, 2000), slice(2000, None)
    fixed = recalibrate(under[val], y[val], under[test])
    assert (np.argsort(fixed, kind="stable") == np.argsort(under[test], kind="stable")).all()
    assert np.mean((fixed - y[test]) ** 2) < np.mean((under[test] - y[test]) ** 2) - 0.002
    assert np.array_equal(recalibrate(under[val], 1 - y[val], under[test]), under[test])  # reversed: untouched
