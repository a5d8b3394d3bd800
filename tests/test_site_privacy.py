"""A site's own privacy guarantee (issue 16): patient-level DP, nothing unaccounted leaves, fail closed,
an intact ledger, no identifiers off-site. Every test here names the claim of docs/deployment.md's threat
model it backs.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_federation import UNSIGNED, InProcessGrid, _run_config

from edfed.client.client_app import _site_and_config
from edfed.client.client_app import app as client_app
from edfed.client.site import (
    REFUSED_REPEAT,
    SiteSettings,
    build_model,
    evaluate_site,
    settings_from_configs,
    train_round,
)
from edfed.common.config import TrainConfig
from edfed.common.data import VisitDataset
from edfed.common.errors import EdfedError
from edfed.common.privacy import PrivacyLedger, make_private, seeded_gaussian
from edfed.common.train import make_optimizer
from edfed.server.federation import run_federation

C = 1e-3  # small enough that every unit's gradient is clipped


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


# --- 1. patient-level DP ---------------------------------------------------------------------------------


def _structured(tiny_encoder: Path) -> TrainConfig:
    return TrainConfig(model=str(tiny_encoder), modality="structured")


def _with_a_three_visit_patient(cohort: Path, config: TrainConfig) -> VisitDataset:
    """40 one-visit patients and patient `p-three`, whose 3 visits are the same visit (the same gradient)."""
    table = pd.read_parquet(cohort / "site-1.parquet").head(40).assign(site="site-1")
    table["patient_id"] = [f"p{i}" for i in range(len(table))]
    three = pd.concat([table.iloc[[0]]] * 3).assign(visit_id=["r0", "r1", "r2"], patient_id="p-three")
    return VisitDataset(pd.concat([table, three], ignore_index=True), None, config)


def _dp(config: TrainConfig, data: VisitDataset, clipping: str, unit: str):
    model = build_model(config)
    model.fusion[2].p = 0.0  # no dropout: a visit's gradient is the same in every batch
    steps = math.ceil(len(data) / 8)
    optimizer, loader = make_private(model, make_optimizer(model, 0.0, 0.0), data, noise_multiplier=0.0,
                                     max_grad_norm=C, sample_rate=1 / steps, steps=steps,
                                     expected_units=len(set(data.patient_ids)) / steps, noise=seeded_gaussian(0),
                                     sampling_seed=0, clipping=clipping, unit=unit)
    return model, optimizer, loader


def _clipped_sum(model, optimizer, items: list[dict], collate) -> torch.Tensor:
    """The noise-free clipped sum the DP optimizer adds noise to, for a batch of these items."""
    batch = collate(items)
    patients = batch.pop("patient", None)
    if patients is not None:
        optimizer.group_by(patients)
    optimizer.zero_grad(set_to_none=True)
    model.training_loss(batch).mean().backward()
    optimizer.step()  # lr 0
    return torch.cat([p.summed_grad.flatten() for p in optimizer.params])


def test_patient_sampling_brings_all_visits_and_clips_one_row_per_patient(cohort, tiny_encoder):
    config = _structured(tiny_encoder)
    data = _with_a_three_visit_patient(cohort, config)
    model, optimizer, loader = _dp(config, data, "per-layer", "patient")
    visits_of = np.bincount(loader.dataset.codes.numpy())
    assert optimizer.expected_batch_size == pytest.approx(len(visits_of) / len(loader))  # patients, not visits
    steps = 0
    for batch in loader:
        if not len(batch["labels"]):
            continue
        codes = batch["patient"].numpy()
        drawn, count = np.unique(codes, return_counts=True)
        assert (count == visits_of[drawn]).all()  # a sampled patient brings every one of its visits
        optimizer.group_by(batch.pop("patient"))
        optimizer.zero_grad(set_to_none=True)
        model.training_loss(batch).mean().backward()
        optimizer.step()
        assert all(p.grad_sample.shape[0] == len(drawn) for p in optimizer.params)  # one row per patient
        steps += 1
    assert steps > 0


@pytest.mark.parametrize("clipping", ["per-layer", "flat"])
def test_a_patients_three_visits_move_the_clipped_sum_by_at_most_C(cohort, tiny_encoder, clipping):
    config = _structured(tiny_encoder)
    data = _with_a_three_visit_patient(cohort, config)
    three = list(range(40, 43))
    model, optimizer, loader = _dp(config, data, clipping, "patient")
    wrapped = loader.dataset
    for patient in [three, [1], [2], [3]]:  # every patient's clipped gradient is at most C
        alone = _clipped_sum(model, optimizer, [wrapped[i] for i in patient], wrapped.collate)
        assert alone.norm() <= C * (1 + 1e-4)
    others = [1, 2, 3]
    with_three = _clipped_sum(model, optimizer, [wrapped[i] for i in [*others, *three]], wrapped.collate)
    without = _clipped_sum(model, optimizer, [wrapped[i] for i in others], wrapped.collate)
    assert (with_three - without).norm() <= C * (1 + 1e-4)
    # Visit-level DP, the same visits: each is clipped alone, so the patient moves the sum by about 3 C.
    model, optimizer, loader = _dp(config, data, clipping, "visit")
    wrapped = loader.dataset
    with_three = _clipped_sum(model, optimizer, [wrapped[i] for i in [*others, *three]], wrapped.collate)
    without = _clipped_sum(model, optimizer, [wrapped[i] for i in others], wrapped.collate)
    assert (with_three - without).norm() > 2 * C


@pytest.mark.slow
def test_patient_level_epsilon_matches_google_dp_accounting(cohort, tmp_path, tiny_encoder):
    import dp_accounting

    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    settings = SiteSettings(name="site-1", data_path=cohort / "site-1.parquet", epsilon=4.0, delta=1e-5,
                            declared_patients=100, create_ledger=True,
                            ledger_path=tmp_path / "ledger.json")
    state, metrics = train_round(settings, config, build_model(config).trainable_state(), run_id="r",
                                 server_round=1, num_rounds=2, local_epochs=1)
    assert state is not None and metrics["patient-level"] == 1
    (entry,) = PrivacyLedger.open(settings.ledger_path).history
    assert entry["unit"] == "patient" and entry["run"] == "r" and entry["round"] == 1
    q, noise, steps = entry["sample-rate"], entry["noise"], entry["steps"]
    assert steps == round(1 / q)  # one epoch: each patient's chance per step is 1 / steps
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    rdp = dp_accounting.rdp.RdpAccountant()
    # The ledger's epsilon is PLD's (tight), below the RDP bound on the same steps.
    assert metrics["epsilon"] == pytest.approx(pld.compose(event).get_epsilon(1e-5), rel=0.01)
    assert metrics["epsilon"] < rdp.compose(event).get_epsilon(1e-5)
    assert metrics["epsilon"] < 4.0  # half of the planned run


# --- 2. nothing unaccounted leaves; 3. fail closed ---------------------------------------------------------


def _message(kind: str, tiny_encoder: Path, state: dict | None = None, **config) -> Message:
    train_config = {k: v for k, v in TrainConfig(model=str(tiny_encoder), lora_layers=1).to_dict().items()
                    if k != "extra"}
    record = {"train-config": json.dumps(train_config), "run-id": "run-1", "server-round": 1, "num-rounds": 2,
              "local-epochs": 1, "max-grad-norm": 1.0, **config}
    content = RecordDict({"config": ConfigRecord(record)})
    if state is not None:
        content["arrays"] = ArrayRecord(state)
    return Message(content, dst_node_id=7, message_type=kind)


def _ask(node_config: dict, msg: Message) -> Message:
    return client_app(msg, Context(run_id=1, node_id=7, node_config={**UNSIGNED, **node_config}, state=RecordDict(),
                                   run_config={}))


def _site(cohort: Path, tmp_path: Path, tiny_encoder: Path, **extra) -> dict:
    if not (tmp_path / "ledger.json").exists():
        PrivacyLedger.init(tmp_path / "ledger.json")
    return {"data-path": str(cohort / "site-1.parquet"), "epsilon": 8.0, "delta": 1e-5, "declared-patients": 100,
            "ledger-path": str(tmp_path / "ledger.json"), "model-path": str(tiny_encoder), **extra}


@pytest.mark.slow
def test_a_train_reply_holds_dp_arrays_the_declared_size_and_dp_parameters_only(cohort, tmp_path, tiny_encoder):
    start = build_model(TrainConfig(model=str(tiny_encoder), lora_layers=1), None).trainable_state()
    reply = _ask(_site(cohort, tmp_path, tiny_encoder), _message("train", tiny_encoder, start))
    assert not reply.has_error()
    metrics = dict(reply.content["metrics"])
    # No training loss (a noise-free function of the training visits) and no timing (by default); `bf16` is the
    # site machine's float format, no patient data.
    assert set(metrics) == {"refused", "delta", "epsilon-budget", "patient-level", "noise-multiplier", "sample-rate",
                            "adapters-changed", "num-examples", "epsilon", "steps", "bf16"}
    assert metrics["num-examples"] == 70  # the declared size's training share, not a count of its rows


def test_evaluate_answers_only_an_opted_in_site_on_val_or_test_up_to_its_cap(cohort, tmp_path, tiny_encoder):
    start = build_model(TrainConfig(model=str(tiny_encoder), lora_layers=1), None).trainable_state()
    closed = _ask(_site(cohort, tmp_path, tiny_encoder), _message("evaluate", tiny_encoder, start, split="val"))
    assert closed.has_error() and "release-metrics" in closed.error.reason
    node = _site(cohort, tmp_path, tiny_encoder, **{"release-metrics": "true", "max-queries-per-run": 2})
    train = _ask(node, _message("evaluate", tiny_encoder, start, split="train"))
    assert train.has_error() and "'train'" in train.error.reason
    for split in ("val", "test"):
        answer = _ask(node, _message("evaluate", tiny_encoder, start, split=split))
        assert not answer.has_error() and set(answer.content.keys()) == {"metrics"}
    over = _ask(node, _message("evaluate", tiny_encoder, start, split="val"))
    assert over.has_error() and "at most 2 evaluations per run" in over.error.reason
    other_run = _ask(node, _message("evaluate", tiny_encoder, start, split="val", **{"run-id": "run-2"}))
    assert not other_run.has_error()


def test_a_deployed_site_without_its_own_budget_refuses_to_join(cohort, tmp_path, tiny_encoder):
    server_says = {"site-epsilon": math.inf, "site-delta": 1e-5}  # the server would switch DP off
    base = {"data-path": str(cohort / "site-1.parquet")}
    for node_config in (base, {**base, "epsilon": 8.0}, {**base, "delta": 1e-5}):
        with pytest.raises(EdfedError, match="sets its own privacy budget"):
            settings_from_configs(node_config, server_says)
    reply = _ask(base, _message("query.check", tiny_encoder, **server_says))
    assert reply.has_error() and "refusing to join" in reply.error.reason
    named = {**base, "ledger-path": str(tmp_path / "ledger.json"), "declared-patients": 100}
    assert settings_from_configs({**named, "epsilon": 4.0, "delta": 1e-6}, server_says).epsilon == 4.0

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:  # `inf` is an explicit opt-out, and the site's log says so
        assert math.isinf(settings_from_configs({**named, "epsilon": "inf", "delta": 1e-5}, server_says).epsilon)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert any("DP is OFF" in line for line in seen)


def test_the_encoder_is_the_sites_own_never_a_path_the_server_sends(cohort, tmp_path, tiny_encoder):
    train_config = {**TrainConfig().to_dict(), "model": "/coordinator/encoders/other"}
    train_config.pop("extra")
    msg = Message(RecordDict({"config": ConfigRecord({"train-config": json.dumps(train_config)})}), dst_node_id=7,
                  message_type="train")

    def context(node_config: dict) -> Context:
        return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})

    own = _site(cohort, tmp_path, tiny_encoder)
    assert _site_and_config(msg, context(own))[1].model == str(tiny_encoder)
    own.pop("model-path")
    assert _site_and_config(msg, context(own))[1].model == ""  # the packaged default


@pytest.mark.slow
def test_max_epsilon_per_run_bounds_what_one_run_spends(cohort, tmp_path, tiny_encoder):
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    settings = SiteSettings(name="site-1", data_path=cohort / "site-1.parquet", epsilon=8.0, delta=1e-5,
                            declared_patients=100, create_ledger=True,
                            ledger_path=tmp_path / "ledger.json", max_epsilon_per_run=1.0)
    start = build_model(config).trainable_state()
    _, first = train_round(settings, config, start, run_id="a", server_round=1, num_rounds=1, local_epochs=1)
    assert 0.9 < first["epsilon"] <= 1.0 + 1e-6  # the server asked for one round: it may take the run's cap, no more
    _, second = train_round(settings, config, start, run_id="b", server_round=1, num_rounds=1, local_epochs=1)
    ledger = PrivacyLedger.open(settings.ledger_path)
    assert ledger.spent_by_run("b", 1e-5) <= 1.0 + 1e-6 and first["epsilon"] < second["epsilon"] < 8.0


# --- 4. ledger integrity -----------------------------------------------------------------------------------


def _dp_site(cohort: Path, ledger: Path, dp_seed: str | None = None) -> SiteSettings:
    return SiteSettings(name="site-1", data_path=cohort / "site-1.parquet", epsilon=8.0, delta=1e-5,
                        declared_patients=100, create_ledger=True,
                        ledger_path=ledger, dp_seed=dp_seed)


@pytest.mark.slow
def test_two_concurrent_train_messages_both_record_their_spend(cohort, tmp_path, tiny_encoder):
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    start = build_model(config).trainable_state()
    settings = _dp_site(cohort, tmp_path / "ledger.json")
    results, barrier = {}, threading.Barrier(2)

    def train(run_id: str) -> None:
        barrier.wait()
        results[run_id] = train_round(settings, config, start, run_id=run_id, server_round=1, num_rounds=2,
                                      local_epochs=1)

    threads = [threading.Thread(target=train, args=(run,)) for run in ("run-a", "run-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results) == {"run-a", "run-b"} and all(r[1]["refused"] == 0 for r in results.values())
    ledger = PrivacyLedger.open(settings.ledger_path)
    assert sorted(h["run"] for h in ledger.history) == ["run-a", "run-b"]
    assert set(ledger.plans) == {"run-a", "run-b"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_a_round_that_already_trained_is_refused(cohort, tmp_path, tiny_encoder):
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    start = build_model(config).trainable_state()
    settings = _dp_site(cohort, tmp_path / "ledger.json", dp_seed="secret")
    state, _ = train_round(settings, config, start, run_id="r", server_round=3, num_rounds=4, local_epochs=1)
    assert state is not None
    again, metrics = train_round(settings, config, start, run_id="r", server_round=3, num_rounds=4, local_epochs=1)
    assert again is None and metrics["refused"] == REFUSED_REPEAT
    assert len(PrivacyLedger.open(settings.ledger_path).history) == 1


@pytest.mark.slow
def test_the_dp_seed_depends_on_nothing_the_server_sends(cohort, tmp_path, tiny_encoder):
    # The same site secret on two fresh ledgers: the server's run id and round number differ, the noise does not.
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    start = build_model(config).trainable_state()
    one, _ = train_round(_dp_site(cohort, tmp_path / "a.json", "secret"), config, start, run_id="x",
                         server_round=1, num_rounds=2, local_epochs=1)
    two, _ = train_round(_dp_site(cohort, tmp_path / "b.json", "secret"), config, start, run_id="y",
                         server_round=2, num_rounds=2, local_epochs=1)
    assert all(torch.equal(one[n], two[n]) for n in one)


# --- 5. no identifiers or values off-site ------------------------------------------------------------------


def test_contract_errors_reach_the_coordinator_without_identifiers_or_values(cohort, tmp_path, tiny_encoder):
    from edfed.common.contract import load_site

    data = tmp_path / "sites"
    data.mkdir()
    for k in range(1, 4):
        table = pd.read_parquet(cohort / f"site-{k}.parquet")
        if k == 3:
            table.loc[0, "visit_id"] = "VSECRET4242"
            table.loc[0, "age"] = 777.25  # out of range: the local message quotes it
            table.loc[1, "sex"] = "zorglub"
        table.to_parquet(data / f"site-{k}.parquet")
    with pytest.raises(EdfedError) as local:  # the site's own staff see both (so this test can see a leak)
        load_site(data / "site-3.parquet")
    assert "VSECRET4242" in str(local.value) and "777.25" in str(local.value) and "zorglub" in str(local.value)

    nodes = {200 + k: {"data-path": str(data / f"site-{k}.parquet"), "epsilon": math.inf, "delta": 1e-5,
                       "ledger-path": str(tmp_path / f"site-{k}.json"), "model-path": str(tiny_encoder),
                       "declared-patients": 100}
             for k in range(1, 4)}
    server_log: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: server_log.append(r.getMessage()) if "client" not in Path(r.pathname).parts else None
    logging.getLogger("flwr").addHandler(handler)
    try:
        grid = InProcessGrid(nodes)
        summary = run_federation(grid, _run_config(data, tmp_path / "run", tiny_encoder, **{
            "num-server-rounds": 1, "num-sites": 3}), pooled=False)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    reasons = [r.error.reason for r in grid.replies if r.has_error()]
    assert reasons and "site-3.parquet" in reasons[0] and "'age'" in reasons[0] and "row 1" in reasons[0]
    offsite = "\n".join([*server_log, *reasons, (tmp_path / "run" / "summary.json").read_text(),
                         json.dumps(summary, default=str),
                         *(json.dumps(dict(r.content[k]), default=str) for r in grid.replies if not r.has_error()
                           for k in r.content.keys() if k != "arrays")])
    assert "site-3" in offsite
    for secret in ("VSECRET4242", "777.25", "zorglub"):
        assert secret not in offsite


# --- 6. the rest ---------------------------------------------------------------------------------------------


def test_sites_are_known_by_their_unique_name_and_a_duplicate_is_refused(cohort, tmp_path, tiny_encoder):
    names = {201: "north", 202: "south", 203: "north"}  # no digits; and one name twice
    nodes = {node: {"data-path": str(cohort / f"site-{node - 200}.parquet"), "site-name": name, "epsilon": math.inf,
                    "delta": 1e-5, "ledger-path": str(tmp_path / f"{node}.json"), "model-path": str(tiny_encoder),
                    "declared-patients": 100}
             for node, name in names.items()}
    summary = run_federation(InProcessGrid(nodes), _run_config(cohort, tmp_path / "run", tiny_encoder, **{
        "num-server-rounds": 1, "num-sites": 3}), pooled=False)
    assert set(summary["sites"]) == {"north", "south"} and summary["sites"]["north"]["node"] == 201
    assert [r["node"] for r in summary["refused_sites"]] == [203] and "taken" in summary["refused_sites"][0]["why"]
    assert set(summary["site_reports"]["1"]) == {"north", "south"}


def test_an_undefined_auroc_is_reported_as_undefined(cohort, tmp_path, tiny_encoder):
    table = pd.read_parquet(cohort / "site-1.parquet").assign(readmission_30d=0.0)  # one class only
    table.to_parquet(tmp_path / "site-1.parquet")
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    settings = SiteSettings(name="site-1", data_path=tmp_path / "site-1.parquet", epsilon=math.inf, delta=1e-5,
                            declared_patients=100, create_ledger=True,
                            ledger_path=tmp_path / "ledger.json", release_metrics=True, max_queries_per_run=None)
    metrics = evaluate_site(settings, config, build_model(config).trainable_state(), split="test")
    assert math.isnan(metrics["readmission_30d-auroc"]) and math.isfinite(metrics["mortality_30d-auroc"])
    assert math.isfinite(metrics["mean-auroc"])  # over the defined ones


def test_nan_global_arrays_are_refused_before_any_budget_is_spent(cohort, tmp_path, tiny_encoder):
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    state = build_model(config).trainable_state()
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    with pytest.raises(EdfedError, match="NaN, Inf"):
        train_round(_dp_site(cohort, tmp_path / "ledger.json"), config, state, run_id="r", server_round=1,
                    num_rounds=1, local_epochs=1)
    assert not (tmp_path / "ledger.json").exists()


@pytest.mark.slow
def test_ledgers_caches_checkpoints_and_run_folders_are_owner_only(cohort, tmp_path, tiny_encoder):
    from edfed.server.run_folder import RunFolder

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    umask = os.umask(0o022)  # the usual default: files 0644, folders 0755
    try:
        config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
        settings = SiteSettings(name="site-1", data_path=cohort / "site-1.parquet", epsilon=8.0, delta=1e-5,
                                declared_patients=100, create_ledger=True,
                                ledger_path=tmp_path / "hospital" / "ledger.json", cache_dir=tmp_path / "cache",
                                model_path=str(tiny_encoder))
        model = build_model(config)
        train_round(settings, config.replace(seed=7), model.trainable_state(), run_id="r", server_round=1,
                    num_rounds=1, local_epochs=1)  # seed 7: a cache key no other test has filled
        folder = RunFolder(tmp_path / "run")
        folder.start({})
        folder.save_round(1, model, model.trainable_state())
    finally:
        os.umask(umask)
    assert mode(settings.ledger_path) == 0o600 and mode(settings.ledger_path.parent) == 0o700
    caches = list((tmp_path / "cache").iterdir())
    assert caches and mode(tmp_path / "cache") == 0o700 and all(mode(p) == 0o600 for p in caches)
    assert mode(tmp_path / "run") == 0o700 and mode(tmp_path / "run" / "checkpoints") == 0o700
    assert mode(tmp_path / "run" / "checkpoints" / "round-1.safetensors") == 0o600
    assert mode(tmp_path / "run" / "run.json") == 0o600


def test_edfeds_entry_points_turn_flower_telemetry_off(monkeypatch, tmp_path):
    import edfed.client.client_app
    import edfed.server.server_app
    from edfed.cli.main import main

    for module in (edfed.client.client_app, edfed.server.server_app):
        monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
        importlib.reload(module)
        assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    assert main(["data", "check", str(tmp_path / "missing.csv")]) == 2
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
