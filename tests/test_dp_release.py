"""A site's DP release holds for any global model the coordinator sends, and its budget cannot be reset (issue 28).

A malicious coordinator chooses the global arrays and the training settings; the site's behaviour (refuse or
train) and the finiteness of what it releases must not depend on whether a target patient is in its table. The
update's scale must not depend on a count of its rows. A deployed site never starts a fresh budget by itself. The
noise comes from the OS's CSPRNG, and epsilon is accounted tightly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import edfed.client.site as site_module
from edfed.cli.main import main as edfed
from edfed.client.site import (
    MAX_GLOBAL_ABS,
    REFUSED_RATE,
    SiteSettings,
    check_site,
    declared_train_units,
    settings_from_configs,
    train_round,
)
from edfed.common.config import TrainConfig
from edfed.common.data import load_site_splits
from edfed.common.errors import EdfedError
from edfed.common.model import build_model
from edfed.common.privacy import PrivacyLedger, epsilon_of, rdp_epsilon_of, secure_gaussian
from edfed.simulations.cohort import generate_cohort

EXTREME = 3.4e38


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("release") / "cohort", visits_per_site=120, seed=5)


@pytest.fixture(scope="module")
def with_and_without(cohort, tmp_path_factory) -> tuple[Path, Path]:
    """Site-1's table, and the same table without one training patient (the target)."""
    folder = tmp_path_factory.mktemp("neighbours")
    table = pd.read_parquet(cohort / "site-1.parquet")
    train = load_site_splits("site-1", cohort / "site-1.parquet", 0).part("train")
    target = train["patient_id"].iloc[0]
    (folder / "with").mkdir()
    (folder / "without").mkdir()
    table.to_parquet(folder / "with" / "site-1.parquet")
    table[table["patient_id"] != target].to_parquet(folder / "without" / "site-1.parquet")
    return folder / "with" / "site-1.parquet", folder / "without" / "site-1.parquet"


def _config(tiny_encoder: Path, architecture: str, **changes) -> TrainConfig:
    extra = {"lexical_features": 64} if architecture == "glm" else {"lora_layers": 1}
    return TrainConfig(model=str(tiny_encoder), architecture=architecture, **extra, **changes)


def _settings(data: Path, ledger: Path, **changes) -> SiteSettings:
    return SiteSettings(**{"name": "site-1", "data_path": data, "epsilon": 8.0, "delta": 1e-5, "ledger_path": ledger,
                           "declared_patients": 100, "create_ledger": True, "dp_seed": "s", **changes})


def _attacks(start: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Global models a malicious coordinator might send: the overflow attack of the issue and its relatives, and
    the largest ones the site accepts."""
    def each(fill) -> dict[str, torch.Tensor]:
        return {name: fill(value) for name, value in start.items()}

    def pair(value: torch.Tensor) -> torch.Tensor:  # two coordinates of every row at +-3.4e38
        out = value.clone()
        flat = out.view(-1, out.shape[-1]) if out.dim() else out.view(1)
        flat[..., :2] = EXTREME
        return out

    def alternating(scale: float):
        def fill(value: torch.Tensor) -> torch.Tensor:
            signs = torch.ones(value.numel())
            signs[1::2] = -1
            return (scale * signs).reshape(value.shape)
        return fill

    return {"feature pair at 3.4e38": each(pair), "1e30 everywhere": each(lambda v: torch.full_like(v, 1e30)),
            "alternating +-3.4e38": each(alternating(EXTREME)),
            "alternating at the bound": each(alternating(MAX_GLOBAL_ABS)),
            "the bound everywhere": each(lambda v: torch.full_like(v, MAX_GLOBAL_ABS))}


def _outcome(data: Path, ledger: Path, config: TrainConfig, state: dict[str, torch.Tensor]) -> str:
    """What the coordinator sees of one round: a refusal's reason, or 'finite' / 'NOT FINITE' for the update."""
    try:
        released, metrics = train_round(_settings(data, ledger), config, state, run_id="r", server_round=1,
                                        num_rounds=1, local_epochs=1)
    except EdfedError as exc:
        return f"refused: {exc}"
    if released is None:
        return f"refused: code {metrics['refused']}"
    return "finite" if all(torch.isfinite(v).all() for v in released.values()) else "NOT FINITE"


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["glm", "compact"])
def test_a_malicious_global_model_gets_the_same_behaviour_and_finite_arrays_with_or_without_a_patient(
        with_and_without, tmp_path, tiny_encoder, architecture):
    config = _config(tiny_encoder, architecture, glm_lr=100.0)  # the largest step the site accepts
    start = build_model(config).trainable_state()
    seen = {}
    for k, (name, state) in enumerate(_attacks(start).items()):
        present, absent = (_outcome(data, tmp_path / f"{k}-{i}.json", config, state)
                           for i, data in enumerate(with_and_without))
        assert present == absent, name
        assert present != "NOT FINITE", name
        seen[name] = present
    assert seen["alternating at the bound"] == seen["the bound everywhere"] == "finite"  # accepted, and finite
    assert all(seen[name].startswith("refused") for name in ("feature pair at 3.4e38", "1e30 everywhere"))


def test_settings_that_overflow_whatever_the_data_are_refused_before_any_budget_is_spent(cohort, tmp_path,
                                                                                         tiny_encoder):
    start = build_model(_config(tiny_encoder, "glm")).trainable_state()
    for changes in ({"glm_lr": 1e38}, {"glm_l2": 2.0, "glm_lr": 4.0}, {"glm_steps": 10**6}):
        with pytest.raises(EdfedError, match="outside this site's bounds"):
            train_round(_settings(cohort / "site-1.parquet", tmp_path / "l.json"), _config(tiny_encoder, "glm",
                        **changes), start, run_id="r", server_round=1, num_rounds=1, local_epochs=1)
    with pytest.raises(EdfedError, match="max-grad-norm"):
        train_round(_settings(cohort / "site-1.parquet", tmp_path / "l.json"), _config(tiny_encoder, "compact"),
                    build_model(_config(tiny_encoder, "compact")).trainable_state(), run_id="r", server_round=1,
                    num_rounds=1, local_epochs=1, max_grad_norm=1e30)
    assert not (tmp_path / "l.json").exists()


def test_a_nan_logit_counts_as_zero_so_the_gradient_sum_stays_within_the_sensitivity(cohort, tiny_encoder):
    from edfed.common.data import VisitDataset
    from edfed.common.features import load_tokenizer
    from edfed.common.train import cache_frozen_layers, glm_gradient_sum, glm_rows

    model = build_model(_config(tiny_encoder, "glm"))
    dataset = VisitDataset(load_site_splits("site-1", cohort / "site-1.parquet", 0).part("train"),
                           load_tokenizer(model.config), model.config)
    cache_frozen_layers(model, dataset)
    rows = glm_rows(model, dataset)
    with torch.no_grad():
        model.glm.weight[:, :2] = torch.tensor([EXTREME, -EXTREME])  # inf - inf in some logits
    weight_sum, bias_sum = glm_gradient_sum(model, rows)
    assert torch.isfinite(weight_sum).all() and torch.isfinite(bias_sum).all()
    assert torch.cat([weight_sum.flatten(), bias_sum]).norm() <= model.glm_sensitivity * rows.units * (1 + 1e-5)


def _with_train_patients(cohort: Path, folder: Path, n: int) -> Path:
    """Site-1's table cut to exactly `n` training patients (the split is by patient and never moves)."""
    table = pd.read_parquet(cohort / "site-1.parquet")
    split = load_site_splits("site-1", cohort / "site-1.parquet", 0).table
    train = split.loc[split["split"] == "train", "patient_id"].unique()
    keep = set(split.loc[split["split"] != "train", "patient_id"]) | set(train[:n])
    folder.mkdir(parents=True, exist_ok=True)
    table[table["patient_id"].isin(keep)].to_parquet(folder / "site-1.parquet")
    return folder / "site-1.parquet"


def test_the_glm_divides_by_the_declared_size_not_by_a_count_of_its_rows(cohort, tmp_path, tiny_encoder,
                                                                          monkeypatch):
    # 75 and 74 training patients sit on either side of a rounding-to-10 edge (80 against 70).
    divisors, examples = [], []
    real_step = site_module.glm_step

    def recording(model, rows, divisor, *args):
        divisors.append((divisor, rows.units))
        return real_step(model, rows, divisor, *args)

    monkeypatch.setattr(site_module, "glm_step", recording)
    config = _config(tiny_encoder, "glm", glm_steps=1)
    for n in (75, 74):
        data = _with_train_patients(cohort, tmp_path / str(n), n)
        settings = _settings(data, tmp_path / f"{n}.json")
        _, metrics = train_round(settings, config, build_model(config).trainable_state(), run_id="r",
                                 server_round=1, num_rounds=1, local_epochs=1)
        examples.append(metrics["num-examples"])
    (first, units_75), (second, units_74) = divisors
    assert (units_75, units_74) == (75, 74)  # the rows did differ
    assert first == second == declared_train_units(_settings(cohort / "site-1.parquet", tmp_path / "x.json"))
    assert examples[0] == examples[1] == first  # the site's weight in the average: its declared size too


def test_what_a_site_reports_at_join_holds_no_count_of_its_rows(cohort, tmp_path, tiny_encoder):
    settings = _settings(cohort / "site-1.parquet", tmp_path / "l.json")
    metrics = check_site(settings, _config(tiny_encoder, "glm"))
    assert metrics["declared-patients"] == 100 and not [k for k in metrics if "rows" in k]


# --- the budget cannot be reset -------------------------------------------------------------------------------


def test_a_deployed_site_needs_a_ledger_it_initialised_on_purpose(cohort, tmp_path, tiny_encoder, capsys):
    node = {"data-path": str(cohort / "site-1.parquet"), "epsilon": 8.0, "delta": 1e-5, "declared-patients": 100,
            "model-path": str(tiny_encoder)}
    with pytest.raises(EdfedError, match="no `ledger-path`.*edfed ledger init"):
        settings_from_configs(node, {})
    ledger = tmp_path / "hospital" / "ledger.json"
    settings = settings_from_configs({**node, "ledger-path": str(ledger)}, {})
    config = _config(tiny_encoder, "glm")
    for attempt in (lambda: check_site(settings, config),
                    lambda: train_round(settings, config, build_model(config).trainable_state(), run_id="r",
                                        server_round=1, num_rounds=1, local_epochs=1)):
        with pytest.raises(EdfedError, match="edfed ledger init"):
            attempt()
    assert not ledger.exists()
    assert edfed(["ledger", "init", str(ledger)]) == 0
    assert check_site(settings, config)["epsilon-spent"] == 0.0
    assert train_round(settings, config, build_model(config).trainable_state(), run_id="r", server_round=1,
                       num_rounds=1, local_epochs=1)[0] is not None
    assert edfed(["ledger", "init", str(ledger)]) == 2  # never reset
    assert PrivacyLedger.open(ledger).spent(1e-5) > 0
    without_size = {k: v for k, v in node.items() if k != "declared-patients"}
    with pytest.raises(EdfedError, match="declared-patients"):
        settings_from_configs({**without_size, "ledger-path": str(ledger)}, {})


def test_a_seeded_site_never_replays_its_noise_on_a_new_ledger(cohort, tmp_path, tiny_encoder):
    config = _config(tiny_encoder, "glm")
    start = build_model(config).trainable_state()

    def update(ledger: Path, run_id: str, server_round: int) -> dict:
        settings = _settings(cohort / "site-1.parquet", ledger, create_ledger=False)
        return train_round(settings, config, start, run_id=run_id, server_round=server_round, num_rounds=2,
                           local_epochs=1)[0]

    PrivacyLedger.init(tmp_path / "a.json")
    PrivacyLedger.init(tmp_path / "b.json")
    (tmp_path / "copy-of-a.json").write_bytes((tmp_path / "a.json").read_bytes())
    one = update(tmp_path / "a.json", "x", 1)
    # The same ledger (a copy: same id, same history): the server's run id and round change nothing.
    assert all(torch.equal(one[n], v) for n, v in update(tmp_path / "copy-of-a.json", "y", 2).items())
    # A fresh ledger under the same secret draws other noise.
    assert not torch.equal(one["glm.weight"], update(tmp_path / "b.json", "x", 1)["glm.weight"])


def test_max_epsilon_per_day_caps_what_any_runs_spend_in_24_hours(cohort, tmp_path, tiny_encoder, monkeypatch):
    config = _config(tiny_encoder, "glm")
    start = build_model(config).trainable_state()
    settings = _settings(cohort / "site-1.parquet", tmp_path / "l.json", max_epsilon_per_day=1.0)
    _, first = train_round(settings, config, start, run_id="a", server_round=1, num_rounds=1, local_epochs=1)
    assert 0.9 < first["epsilon"] <= 1.0 + 1e-6
    refused, second = train_round(settings, config, start, run_id="b", server_round=1, num_rounds=1, local_epochs=1)
    assert refused is None and second["refused"] == REFUSED_RATE  # a fresh run id gets no fresh day
    now = time.time()
    monkeypatch.setattr(site_module.time, "time", lambda: now + 86400 + 1)
    later, third = train_round(settings, config, start, run_id="c", server_round=1, num_rounds=1, local_epochs=1)
    assert later is not None and third["epsilon"] > first["epsilon"]


# --- the noise and the accounting ------------------------------------------------------------------------------


def test_a_deployed_site_draws_its_noise_from_the_os_csprng(cohort, tmp_path, tiny_encoder, monkeypatch):
    draws = secure_gaussian((200_000,), 2.0).double()
    assert abs(float(draws.mean())) < 0.03 and float(draws.std()) == pytest.approx(2.0, rel=0.01)
    assert not torch.equal(secure_gaussian((8,), 1.0), secure_gaussian((8,), 1.0))
    calls = []

    def counting(shape, std):
        calls.append(shape)
        return secure_gaussian(shape, std)

    monkeypatch.setattr(site_module, "secure_gaussian", counting)
    config = _config(tiny_encoder, "glm", glm_steps=2)
    settings = _settings(cohort / "site-1.parquet", tmp_path / "l.json", dp_seed=None)
    train_round(settings, config, build_model(config).trainable_state(), run_id="r", server_round=1, num_rounds=1,
                local_epochs=1)
    assert len(calls) == 4  # weight and intercept, at each of the two steps


def test_epsilon_is_accounted_tightly_and_checked_against_rdp_and_dp_accounting():
    import dp_accounting

    # Full-batch steps: one Gaussian mechanism, exact. FACTS.md: 32 steps at 3.607 are 7.44 by PLD, 8.00 by RDP.
    assert epsilon_of([(3.607, 1.0, 32)], 1e-5) == pytest.approx(7.44, abs=0.01)
    assert rdp_epsilon_of([(3.607, 1.0, 32)], 1e-5) == pytest.approx(8.00, abs=0.01)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(3.0), 20)
    pld.compose(dp_accounting.GaussianDpEvent(5.0), 12)
    assert epsilon_of([(3.0, 1.0, 20), (5.0, 1.0, 12)], 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=1e-3)
    # Subsampled steps (DP-SGD): PLD, below RDP.
    history = [(1.0, 1 / 63, 189)]
    assert epsilon_of(history, 1e-5) < rdp_epsilon_of(history, 1e-5)
    # The plan meets epsilon 8 over 32 full-batch steps with about 3.40, not RDP's 3.61.
    noise = PrivacyLedger(Path("unused.json")).plan_noise("r", 8.0, 1e-5, 1.0, 32)
    assert 3.35 < noise < 3.45 and epsilon_of([(noise, 1.0, 32)], 1e-5) <= 8.0 < epsilon_of(
        [(0.99 * noise, 1.0, 32)], 1e-5)
    assert np.isfinite(noise)


def test_note_derived_caches_stay_out_of_the_run_folder(tmp_path):
    message = {"data-dir": str(tmp_path / "cohort"), "run-dir": str(tmp_path / "run"), "site-epsilon": 8.0}
    settings = settings_from_configs({"partition-id": 0}, message)
    assert settings.cache_dir is not None and not settings.cache_dir.is_relative_to(tmp_path / "run")
    assert settings.cache_dir.parent == tmp_path / "cohort"
    assert math.isfinite(settings.epsilon)
