"""Federation without Ray: the real ServerApp logic and ClientApp, messages passed in-process.

`InProcessGrid` delivers each Message to `client_app(message, context)` with that node's config,
exactly what a SuperNode does, so replies, strategies, checkpoints and resume are the real ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from edfed.client.client_app import app as client_app
from edfed.client.site import SiteSettings, dp_rng_seed, train_round
from edfed.common.config import TrainConfig
from edfed.common.errors import EdfedError
from edfed.common.privacy import PrivacyLedger, epsilon_of
from edfed.server.federation import run_federation
from edfed.server.strategy import CheckedFedAvg


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are stamped with the sending task's identity, which a SuperLink normally sets."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


# This harness is no SuperLink and signs nothing, so its deployed sites opt out of signed messages explicitly
# (tests/test_signing.py runs signed federations and the refusals).
UNSIGNED = {"unsigned-messages": True}


class InProcessGrid(Grid):
    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.node_configs = node_configs
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.node_configs)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={**UNSIGNED, **self.node_configs[node]},
                              state=RecordDict(), run_config={})
            replies.append(client_app(msg, context))
        self.replies.extend(replies)
        return replies


def _sim_nodes(n: int = 6) -> dict[int, dict]:
    return {100 + k: {"partition-id": k, "num-partitions": n} for k in range(n)}


def _run_config(cohort: Path, run_dir: Path, tiny_encoder: Path, **overrides) -> dict:
    return {"data-dir": str(cohort), "run-dir": str(run_dir), "model": str(tiny_encoder), "num-server-rounds": 2,
            "epsilon": math.inf, "lr": 0.01, "lora-layers": 1, "num-sites": 6, "min-sites": 2, **overrides}


@pytest.mark.slow
def test_two_round_federation_improves_on_round_zero(cohort, tmp_path, tiny_encoder):
    grid = InProcessGrid(_sim_nodes())
    summary = run_federation(grid, _run_config(cohort, tmp_path / "run", tiny_encoder, **{"local-epochs": 2}),
                             pooled=True)
    first, last = summary["rounds"]["0"], summary["rounds"]["2"]
    assert np.mean(list(last.values())) > np.mean(list(first.values())) + 0.05
    assert set(summary["final"]) == {"mortality_30d", "safe_discharge", "readmission_30d"}
    assert len(summary["per_site"]) == 6
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    comm = saved["communication"]  # the 1% target holds for the real encoder (benchmarks/); here: only trainables
    assert 0 < comm["bytes_sent_per_client_round"] < 0.1 * comm["full_model_bytes"]
    assert (tmp_path / "run" / "roc.png").exists()


@pytest.mark.slow
def test_client_reply_holds_only_trainable_arrays_and_scalars(cohort, tmp_path, tiny_encoder):
    grid = InProcessGrid(_sim_nodes())
    run_federation(grid, _run_config(cohort, tmp_path / "run", tiny_encoder, **{"num-server-rounds": 1}),
                   pooled=False)
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 6
    for reply in train_replies:
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        names = set(reply.content["arrays"].keys())
        heads = {"text_proj", "struct_tower", "fusion", "heads", "aux_heads", "lexical"}
        assert names and all("lora_" in n or n.split(".")[0] in heads for n in names)
        assert not any("embeddings" in n or ("dense" in n and "lora_" not in n) for n in names)
        metrics = dict(reply.content["metrics"])
        assert all(isinstance(v, int | float) for v in metrics.values()), metrics
        assert metrics["num-examples"] > 0 and metrics["adapters-changed"] == 1
    for reply in (r for r in grid.replies if r.metadata.message_type == "evaluate"):
        assert set(reply.content.keys()) == {"metrics"}


def _settings(cohort: Path, tmp_path: Path, epsilon: float) -> SiteSettings:
    return SiteSettings(name="site-1", data_path=cohort / "site-1.parquet", epsilon=epsilon, delta=1e-5,
                        declared_patients=100, create_ledger=True,
                        ledger_path=tmp_path / "ledger.json")


def _state(config: TrainConfig) -> dict[str, torch.Tensor]:
    from edfed.common.model import build_model

    return build_model(config).trainable_state()


def test_site_refuses_a_round_that_would_pass_its_budget(cohort, tmp_path, tiny_encoder):
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    settings = _settings(cohort, tmp_path, epsilon=0.05)
    state, metrics = train_round(settings, config, _state(config), run_id="r1", server_round=1, num_rounds=3,
                                 local_epochs=1)
    assert state is None and metrics["refused"] == 1 and metrics["num-examples"] == 0
    assert PrivacyLedger.open(settings.ledger_path).spent(1e-5) == 0.0


@pytest.mark.slow
def test_ledger_persists_across_runs_and_epsilon_accumulates(cohort, tmp_path, tiny_encoder):
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    settings = _settings(cohort, tmp_path, epsilon=4.0)
    # Run A plans 3 rounds but stops after one: part of the budget is spent, the rest is left.
    _, first = train_round(settings, config, _state(config), run_id="run-a", server_round=1, num_rounds=3,
                           local_epochs=1)
    assert first["refused"] == 0 and 0 < first["epsilon"] < 4.0
    ledger = PrivacyLedger.open(settings.ledger_path)  # what a fresh process (next round, next run) reads
    assert ledger.spent(1e-5) == pytest.approx(first["epsilon"])
    # Run B plans its noise from what is left, and ends exactly at the budget.
    _, second = train_round(settings, config, _state(config), run_id="run-b", server_round=1, num_rounds=1,
                            local_epochs=1)
    assert first["epsilon"] < second["epsilon"] <= 4.0 + 1e-6
    assert len(PrivacyLedger.open(settings.ledger_path).history) == 2
    # Nothing is left for run C: the site refuses, whatever the server asks.
    state, third = train_round(settings, config, _state(config), run_id="run-c", server_round=1, num_rounds=1,
                               local_epochs=1)
    assert state is None and third["refused"] == 1


@pytest.mark.slow
def test_dp_noise_is_each_sites_secret_and_replays_only_from_its_own_seed(cohort, tmp_path, tiny_encoder):
    # Same data, same global state, same round: only the site's DP randomness can make the updates differ.
    # Before the fix every site seeded its noise from the run's seed, so all six added the same noise (it never
    # averaged out) and the server, which sets that seed, could replay it.
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    start = _state(config)

    def update(name: str, dp_seed: str | None, ledger: str) -> dict[str, torch.Tensor]:
        settings = SiteSettings(name=name, data_path=cohort / "site-1.parquet", epsilon=8.0, delta=1e-5,
                                declared_patients=100, create_ledger=True,
                                ledger_path=tmp_path / f"{ledger}.json", dp_seed=dp_seed)
        state, metrics = train_round(settings, config, start, run_id="r1", server_round=1, num_rounds=1,
                                     local_epochs=1)
        assert metrics["refused"] == 0
        return state

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[n], b[n]) for n in a)

    site_1 = update("site-1", "site-1", "a")
    assert same(site_1, update("site-1", "site-1", "b"))  # a site's own seed replays its run
    assert not same(site_1, update("site-2", "site-2", "c"))  # another site draws other noise
    unseeded = update("site-1", None, "d")  # deployment default: fresh entropy every round
    assert not same(unseeded, update("site-1", None, "e")) and not same(unseeded, site_1)
    # A later round or run on the same ledger does not reuse the seeded noise: it would cancel between the two.
    seeded = SiteSettings(name="site-1", data_path=cohort / "site-1.parquet", epsilon=8.0, delta=1e-5,
                          declared_patients=100, ledger_path=tmp_path / "seeded.json", dp_seed="site-1")
    ledger = PrivacyLedger.init(seeded.ledger_path)
    first = dp_rng_seed(seeded, ledger)
    ledger.record(1.0, 1.0, 1, unit="patient", run_id="r", server_round=1)
    assert first != dp_rng_seed(seeded, ledger)
    # A new ledger (a reset budget, a moved site) never replays the old one's noise under the same secret.
    assert first != dp_rng_seed(seeded, PrivacyLedger.init(tmp_path / "fresh.json"))


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [4.0, math.inf])
def test_a_site_trains_at_dp_lr_with_dp_and_at_lr_without(cohort, tmp_path, tiny_encoder, epsilon):
    # The rate the site must not use is 0: AdamW then changes nothing (weight decay scales with the rate),
    # so the weights move under the right rate and stay put when only the wrong one is non-zero.
    used, unused = ("dp_lr", "lr") if math.isfinite(epsilon) else ("lr", "dp_lr")
    config = TrainConfig(model=str(tiny_encoder), lora_layers=1, **{used: 0.01, unused: 0.0})
    start = _state(config)
    state, _ = train_round(_settings(cohort, tmp_path, epsilon), config, start, run_id="r1", server_round=1,
                           num_rounds=1, local_epochs=1)
    assert any(not torch.equal(state[n], start[n]) for n in start)
    idle = config.replace(**{used: 0.0, unused: 0.01})
    state, _ = train_round(_settings(cohort, tmp_path / "idle", epsilon), idle, start, run_id="r2", server_round=1,
                           num_rounds=1, local_epochs=1)
    assert all(torch.equal(state[n], start[n]) for n in start)


@pytest.mark.slow
def test_reported_epsilon_matches_google_dp_accounting():
    import dp_accounting

    for noise, q, steps in [(1.0, 1 / 63, 189 * 10), (0.8, 0.05, 300), (2.0, 0.01, 5000)]:
        ours = epsilon_of([(noise, q, steps)], 1e-5)
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)
        pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3).compose(event)
        rdp = dp_accounting.rdp.RdpAccountant().compose(event)
        theirs = pld.get_epsilon(1e-5)
        assert abs(ours - theirs) / theirs < 0.01, (noise, q, steps, ours, theirs)
        assert ours < rdp.get_epsilon(1e-5)  # the ledger's PLD is tighter than the RDP bound


@pytest.mark.slow
def test_planned_noise_spends_the_budget_over_the_whole_run(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json")
    noise = ledger.plan_noise("run", budget=8.0, delta=1e-5, sample_rate=1 / 35, total_steps=3 * 35)
    assert ledger.projected(noise, 1 / 35, 3 * 35, 1e-5) == pytest.approx(8.0, rel=1e-3)
    assert ledger.plan_noise("run", budget=1.0, delta=1e-5, sample_rate=0.5, total_steps=1) == noise  # fixed per run


def _reply(arrays: dict[str, np.ndarray], node: int) -> Message:
    request = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, reply_to=request)


def test_server_rejects_bad_updates_and_aggregates_the_rest():
    expected = {"heads.weight": (3, 4), "heads.bias": (3,)}
    good = [{"heads.weight": np.full((3, 4), float(k), np.float32), "heads.bias": np.zeros(3, np.float32)}
            for k in (1, 3)]
    nan = {"heads.weight": np.full((3, 4), np.nan, np.float32), "heads.bias": np.zeros(3, np.float32)}
    shape = {"heads.weight": np.ones((4, 4), np.float32), "heads.bias": np.zeros(3, np.float32)}
    keys = {"heads.weight": np.ones((3, 4), np.float32), "encoder.word_embeddings": np.zeros(3, np.float32)}
    strategy = CheckedFedAvg(min_available_nodes=2)
    strategy.setup_checks(expected, min_sites=2)
    strategy.site_names = {10 + site: f"site-{site}" for site in range(1, 6)}  # as check_sites leaves them
    replies = [_reply(a, 10 + site) for site, a in enumerate([good[0], nan, shape, keys, good[1]], start=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_torch_state_dict()["heads.weight"].numpy(), 2.0)
    why = {r["site"]: r["why"] for r in strategy.rejected}
    assert set(why) == {"site-2", "site-3", "site-4"}
    assert "NaN" in why["site-2"] and "shape" in why["site-3"] and "keys" in why["site-4"]


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(cohort, tmp_path, tiny_encoder):
    run_dir = tmp_path / "run"
    config = _run_config(cohort, run_dir, tiny_encoder, **{"num-server-rounds": 1})
    run_federation(InProcessGrid(_sim_nodes()), config, pooled=False)
    assert (run_dir / "checkpoints" / "round-1.safetensors").exists()
    # The coordinator "crashed" after round 1 of a 2-round plan: resume finishes rounds 2 only.
    meta = json.loads((run_dir / "run.json").read_text())
    meta["config"]["num-server-rounds"] = 2
    (run_dir / "run.json").write_text(json.dumps(meta))
    grid = InProcessGrid(_sim_nodes())
    summary = run_federation(grid, {"run-dir": str(run_dir), "resume": True}, pooled=False)
    train_rounds = {r.metadata.src_node_id for r in grid.replies if r.metadata.message_type == "train"}
    assert len(train_rounds) == 6 and summary["run_id"] == meta["run-id"]
    assert (run_dir / "checkpoints" / "round-2.safetensors").exists()
    assert sum(1 for r in grid.replies if r.metadata.message_type == "train") == 6  # one round, not two
    # The summary covers both rounds, the one before the crash included, numbered as the run counts them.
    assert set(summary["site_reports"]) == {"1", "2"} and all(len(r) == 6 for r in summary["site_reports"].values())


def _deployed_nodes(data_dir: Path, tmp_path: Path, encoder: Path) -> dict[int, dict]:
    """Node configs as `flower-supernode --node-config` gives them: each site's own path and budget."""
    return {200 + k: {"data-path": str(data_dir / f"site-{k}.parquet"), "epsilon": math.inf, "delta": 1e-5,
                      "ledger-path": str(tmp_path / f"site-{k}.ledger.json"), "model-path": str(encoder),
                      "declared-patients": 100}
            for k in range(1, 7)}


@pytest.mark.slow
def test_a_site_that_breaks_the_contract_does_not_join_and_the_run_goes_on(cohort, tmp_path, tiny_encoder):
    data = tmp_path / "sites"
    data.mkdir()
    for k in range(1, 7):
        table = pd.read_parquet(cohort / f"site-{k}.parquet")
        (table.drop(columns=["age"]) if k == 3 else table).to_parquet(data / f"site-{k}.parquet")
    grid = InProcessGrid(_deployed_nodes(data, tmp_path, tiny_encoder))
    summary = run_federation(grid, _run_config(data, tmp_path / "run", tiny_encoder, **{"num-server-rounds": 1}),
                             pooled=False)
    assert set(summary["sites"]) == {"site-1", "site-2", "site-4", "site-5", "site-6"}
    assert [r["node"] for r in summary["refused_sites"]] == [203]
    assert "site-3.parquet" in summary["refused_sites"][0]["why"] and "'age'" in summary["refused_sites"][0]["why"]
    assert set(summary["site_reports"]["1"]) == {"site-1", "site-2", "site-4", "site-5", "site-6"}  # not site-3
    notes = pd.read_parquet(cohort / "site-3.parquet")["note_physician"].dropna()
    snippets = [line for note in notes for line in note.splitlines() if len(line) > 30]
    assert snippets and not any(line in json.dumps(summary) for line in snippets)


def test_a_site_names_training_settings_its_edfed_does_not_know():
    sent = {**TrainConfig().to_dict(), "future_knob": 1}  # a newer server's setting
    with pytest.raises(EdfedError, match=r"does not know \(future_knob\).*different edfed versions"):
        TrainConfig.from_message(sent)
    assert TrainConfig.from_message(TrainConfig(lr=0.5).to_dict()).lr == 0.5


def test_too_few_sites_passing_the_check_stops_the_run(cohort, tmp_path, tiny_encoder):
    nodes = _deployed_nodes(cohort, tmp_path, tiny_encoder)
    for node in list(nodes)[1:]:
        nodes[node] = {**nodes[node], "data-path": str(tmp_path / "missing.parquet")}
    with pytest.raises(EdfedError, match="only 1 of 6 connected sites passed the check"):
        run_federation(InProcessGrid(nodes), _run_config(cohort, tmp_path / "run", tiny_encoder), pooled=False)


@pytest.mark.slow
def test_adapter_loads_with_plain_peft(cohort, tmp_path, tiny_encoder):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    run_dir = tmp_path / "run"
    run_federation(InProcessGrid(_sim_nodes()), _run_config(cohort, run_dir, tiny_encoder,
                                                            **{"num-server-rounds": 1}), pooled=False)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_encoder), run_dir / "adapter")
    final = load_file(run_dir / "checkpoints" / "round-1.safetensors")
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert loaded
    for name, value in loaded.items():
        ours = next(v for k, v in final.items() if k.endswith(name.split("base_model.model.", 1)[1]))
        torch.testing.assert_close(value, ours)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run_and_frozen_parts_never_travel(cohort, tmp_path, tiny_encoder, strategy):
    grid = InProcessGrid(_sim_nodes())
    run_config = _run_config(cohort, tmp_path / "run", tiny_encoder, strategy=strategy,
                             **{"num-server-rounds": 1, "architecture": "compact"})
    summary = run_federation(grid, run_config, pooled=False)
    assert summary["config"]["strategy"] == strategy and not summary["rejected_updates"]
    for reply in (r for r in grid.replies if r.metadata.message_type == "train"):
        names = set(reply.content["arrays"].keys())
        assert any("lora_B" in n for n in names) and any("struct_tower" in n for n in names)
        assert not any("lora_A" in n or "text_proj" in n or "fusion" in n for n in names)


def test_proximal_step_pulls_towards_the_global_model(cohort, tiny_encoder):
    from edfed.common.data import VisitDataset
    from edfed.common.model import build_model
    from edfed.common.train import make_loader, make_optimizer, train_epoch

    config = TrainConfig(model=str(tiny_encoder), lora_layers=1, modality="structured", lr=0.01)
    model = build_model(config)
    global_state = model.trainable_state()
    data = VisitDataset(pd.read_parquet(cohort / "site-1.parquet").assign(site="site-1"), None, config)
    optimizer = make_optimizer(model, config.lr, 0.0)
    # lr * mu = 1: every step is undone by the proximal step, so the model stays at the global one.
    train_epoch(model, make_loader(data, 16, shuffle=True), optimizer, proximal_mu=1 / config.lr,
                global_state=global_state)
    for name, value in model.trainable_state().items():
        torch.testing.assert_close(value, global_state[name])
    train_epoch(model, make_loader(data, 16, shuffle=True), optimizer)
    assert any(not torch.equal(v, global_state[n]) for n, v in model.trainable_state().items())


def test_opacus_per_example_gradients_match_autograd_on_cached_inputs(tiny_encoder):
    """Per-example grads (Opacus hooks) of the adapters and heads sum to the ordinary batch gradient."""
    from opacus import GradSampleModule

    from edfed.common.model import build_model

    config = TrainConfig(model=str(tiny_encoder), lora_layers=1)
    model = build_model(config, None, precision="fp32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (6, 12), generator=g)
    mask = torch.ones(6, 12, dtype=torch.long)
    mask[2, 7:] = 0
    n_struct = model.struct_tower[0].in_features
    batch = {"hidden": model.lower(ids, mask), "attention_mask": mask, "struct": torch.randn(6, n_struct, generator=g),
             "lexical": torch.rand(6, config.lexical_features, generator=g),
             "labels": torch.tensor([[1.0, 0.0, float("nan")]] * 3 + [[0.0, 1.0, 1.0]] * 3)}
    model.train()
    model.fusion[2].p = 0.0  # dropout off so both passes see the same function
    model.training_loss(batch).mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    hooked = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.training_loss(batch).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad_sample.mean(0), reference[name], atol=1e-5, rtol=1e-4)
    hooked._close()


@pytest.mark.parametrize("unit", ["patient", "visit"])
@pytest.mark.parametrize("clipping", ["per-layer", "flat"])
def test_per_layer_clipping_bounds_every_tensor_at_the_same_sensitivity(cohort, tiny_encoder, clipping, unit):
    """Per-layer: each tensor's clipped gradient stays under C/sqrt(n), the thresholds' L2 norm is C (so the
    noise and epsilon are unchanged). Flat clipping lets some tensor take more: the check can tell them apart."""
    from edfed.common.data import VisitDataset
    from edfed.common.features import load_tokenizer
    from edfed.common.model import build_model
    from edfed.common.privacy import make_private, seeded_gaussian
    from edfed.common.train import make_optimizer

    config = TrainConfig(model=str(tiny_encoder), lora_layers=1, cache_frozen=False)
    model = build_model(config)
    model.fusion[2].p = 0.0
    data = VisitDataset(pd.read_parquet(cohort / "site-1.parquet").assign(site="site-1"), load_tokenizer(config),
                        config)
    def private(clipping: str):
        steps = math.ceil(len(data) / 32)
        return make_private(model, make_optimizer(model, 0.0, 0.0), data, noise_multiplier=0.0, max_grad_norm=1.0,
                            sample_rate=1 / steps, steps=steps, expected_units=len(data) / steps,
                            noise=seeded_gaussian(0), sampling_seed=0, clipping=clipping, unit=unit)

    optimizer, loader = private(clipping)
    batch = next(b for b in loader if len(b["labels"]))
    units = len(batch["labels"])
    unit_codes = batch.pop("patient")  # what train_epoch does: the optimizer clips per unit (patient or visit)
    units = len(unit_codes.unique())
    optimizer.group_by(unit_codes)
    model.training_loss(batch).mean().backward()
    optimizer.step()  # lr 0: only the clipped, averaged gradient is left in .grad
    params = [p for p in model.parameters() if p.requires_grad]
    threshold = 1.0 / math.sqrt(len(params)) * units / optimizer.expected_batch_size
    norms = torch.stack([p.grad.norm() for p in params])
    if clipping == "per-layer":
        assert math.isclose(math.hypot(*optimizer.max_grad_norms), 1.0)
        assert optimizer.max_grad_norm == pytest.approx(1.0)  # what the noise is scaled by
        assert (norms <= threshold * (1 + 1e-4)).all()
    else:
        assert (norms > threshold).any()
    with pytest.raises(EdfedError, match="dp-clipping"):
        private("groupwise")


def test_a_site_whose_seeded_frozen_matrices_differ_refuses_to_train(cohort, tmp_path, tiny_encoder):
    from edfed.common.exchange import frozen_init_fingerprint
    from edfed.common.model import build_model

    config = TrainConfig(model=str(tiny_encoder), lora_layers=1, architecture="compact")
    server_side = frozen_init_fingerprint(build_model(config))
    assert server_side == frozen_init_fingerprint(build_model(config))  # rebuilt from the seed: the same
    assert server_side != frozen_init_fingerprint(build_model(config.replace(seed=1)))
    settings = _settings(cohort, tmp_path, math.inf)
    state, _ = train_round(settings, config, _state(config), run_id="r", server_round=1, num_rounds=1,
                           local_epochs=1, expected_frozen=server_side)
    assert state is not None
    with pytest.raises(EdfedError, match="frozen matrices"):
        train_round(settings, config, _state(config), run_id="r", server_round=1, num_rounds=1, local_epochs=1,
                    expected_frozen=frozen_init_fingerprint(build_model(config.replace(seed=1))))


def test_architecture_auto_follows_the_runs_privacy_setting():
    from edfed.common.config import RUN_DEFAULTS, train_config_from

    assert train_config_from({**RUN_DEFAULTS, "epsilon": 8.0}).glm
    assert train_config_from({**RUN_DEFAULTS, "epsilon": math.inf}).architecture == "full"
    assert train_config_from({**RUN_DEFAULTS, "epsilon": 8.0, "architecture": "compact"}).compact
    assert train_config_from({**RUN_DEFAULTS, "epsilon": math.inf, "architecture": "glm"}).glm
    with pytest.raises(EdfedError, match="architecture must be"):
        train_config_from({**RUN_DEFAULTS, "architecture": "sometimes"})


@pytest.mark.slow
def test_each_site_deploys_what_its_validation_split_prefers_starting_from_the_global_model(
        cohort, tmp_path, tiny_encoder, monkeypatch):
    from safetensors.torch import save_file

    import edfed.client.local_models
    from edfed.client.local_models import CANDIDATES, deployed_models
    from edfed.common.config import train_config_from
    from edfed.common.data import VisitDataset
    from edfed.common.features import load_tokenizer
    from edfed.common.metrics import evaluate
    from edfed.common.model import build_model
    from edfed.common.train import cache_frozen_layers, fit_model, predict

    run_dir = tmp_path / "run"
    run_config = _run_config(cohort, run_dir, tiny_encoder, **{"num-server-rounds": 1, "architecture": "compact"})
    config = train_config_from(run_config)
    # A compact global model as a federation's last checkpoint holds it: here, the seeded init moved at random.
    torch.manual_seed(1)
    global_state = {k: v + 0.1 * torch.randn_like(v) for k, v in build_model(config).trainable_state().items()}
    (run_dir / "checkpoints").mkdir(parents=True)
    save_file(global_state, run_dir / "checkpoints" / "round-1.safetensors")
    save_file({k: v - 1 for k, v in global_state.items()}, run_dir / "checkpoints" / "round-0.safetensors")

    fits = []

    def recording_fit(fit_config, train, val, tokenizer, **kw):
        model, history = fit_model(fit_config, train, val, tokenizer, **kw)
        fits.append((fit_config, val, kw.get("initial_state"), history))
        return model, history

    monkeypatch.setattr(edfed.client.local_models, "fit_model", recording_fit)
    deployment = deployed_models(run_config, cohort, run_dir)
    sites = {f"site-{k}" for k in range(1, 7)}
    assert set(deployment["deployed"]) == sites and all(set(deployment[c]) == sites for c in CANDIDATES)
    for site in sites:  # the deployed model is, per outcome, a blend of the site's candidates, weights summing to 1
        for outcome, recipe in deployment["recipes"][site].items():
            assert set(recipe["parts"]) <= set(CANDIDATES) and sum(recipe["parts"].values()) == pytest.approx(1.0)
            assert all(name in deployment["choices"][site][outcome] for name in recipe["parts"])
    gain = deployment["gain_over_local_only"]["safe_discharge"]
    per_site = [deployment["deployed"][s]["safe_discharge"]["auroc"] - deployment["local-only"][s]["safe_discharge"]
                ["auroc"] for s in sites]
    per_site = [g for g in per_site if np.isfinite(g)]  # a tiny site's test split may hold one class only
    assert gain["sites"] == len(per_site) > 0 and gain["mean_gain"] == pytest.approx(np.mean(per_site))
    assert gain["mean_gain_ci"][0] <= gain["mean_gain"] <= gain["mean_gain_ci"][1]
    assert (run_dir / "deployed" / "site-1" / "predictions.parquet").exists()

    # Each site trains twice: local-only from scratch, and personalized from the last round's global model,
    # both with the whole model trainable (no DP at home).
    personal = [f for f in fits if f[2] is not None]
    local = [f for f in fits if f[2] is None]
    assert len(personal) == len(local) == 6 and not any(f[0].compact for f in fits)
    assert all(torch.equal(f[2][k], global_state[k]) for f in personal for k in global_state)
    full_config, val, start, history = personal[0]
    assert set(start) > set(global_state)
    # ...and that start is the global model itself: same predictions, scored untouched as epoch 0.
    tokenizer = load_tokenizer(config)
    val_set = VisitDataset(val, tokenizer, full_config)
    global_model, start_model = build_model(config, global_state), build_model(full_config, start)
    cache_frozen_layers(global_model, val_set)
    np.testing.assert_allclose(predict(start_model, val_set), predict(global_model, val_set), atol=1e-6)
    untouched = evaluate(val_set.labels.numpy(), predict(global_model, val_set), bootstrap=0)
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[0]["val_auroc"] == pytest.approx({o: m["auroc"] for o, m in untouched.items()}, nan_ok=True)


@pytest.mark.slow
def test_a_deployed_site_personalizes_from_a_copy_of_the_run_folder(cohort, tmp_path, tiny_encoder, capsys):
    import shutil

    from safetensors.torch import load_file

    from edfed.cli.main import main

    run_dir = tmp_path / "run"
    run_federation(InProcessGrid(_sim_nodes()), _run_config(cohort, run_dir, tiny_encoder,
                                                            **{"num-server-rounds": 1, "architecture": "compact"}))
    handed = tmp_path / "from-coordinator"  # all a site gets: settings and arrays, no other site's data
    handed.mkdir()
    shutil.copy(run_dir / "run.json", handed)
    shutil.copytree(run_dir / "checkpoints", handed / "checkpoints")
    out = tmp_path / "site-2-personal"
    assert main(["personalize", str(handed), "--data", str(cohort / "site-2.parquet"), "--model", str(tiny_encoder),
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "personalized" and set(summary["per_site"]) == {"site-2"}
    assert set(summary["final"]) == {"mortality_30d", "safe_discharge", "readmission_30d"}
    assert all(set(recipe["parts"]) <= set(summary) for recipe in summary["recipes"]["site-2"].values())
    tuned, global_state = load_file(out / "site-2" / "personalized.safetensors"), load_file(
        handed / "checkpoints" / "round-1.safetensors")
    assert set(tuned) > set(global_state)  # the whole model, not only what travelled
    # The deployed model as the site keeps it: edfed predict gives the risks the deployment scored on its test rows.
    assert main(["predict", str(out / "site-2" / "model"), "--data", str(cohort / "site-2.parquet"), "--model",
                 str(tiny_encoder), "--out", str(tmp_path / "risks.csv")]) == 0
    scored = pd.read_parquet(out / "site-2" / "predictions.parquet").set_index("visit_id")
    predicted = pd.read_csv(tmp_path / "risks.csv", dtype={"visit_id": str}).set_index("visit_id").loc[scored.index]
    for outcome in ("mortality_30d", "safe_discharge", "readmission_30d"):
        assert np.allclose(predicted[f"risk_{outcome}"], scored[f"p_{outcome}"], atol=1e-6), outcome

    # Another encoder than the run's is refused, as a training site would refuse it, and nothing is written.
    meta = json.loads((handed / "run.json").read_text())
    (handed / "run.json").write_text(json.dumps({**meta, "encoder-fingerprint": "0" * 16}))
    assert main(["personalize", str(handed), "--data", str(cohort / "site-2.parquet"), "--model", str(tiny_encoder),
                 "--out", str(tmp_path / "refused")]) == 2
    assert "encoder" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    (handed / "run.json").unlink()
    assert main(["personalize", str(handed), "--data", str(cohort / "site-2.parquet")]) == 2
    assert "run.json" in capsys.readouterr().err


class _MatmulDtypes(TorchDispatchMode):
    """Records the float formats that every matrix product and attention kernel actually ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(k in func.__name__ for k in ("mm", "matmul", "linear", "attention", "conv")):
            self.dtypes |= {t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("native", [False, True])
def test_a_site_without_native_bf16_never_runs_bf16_matmuls(cohort, tmp_path, tiny_encoder, monkeypatch, native):
    """Precision is each machine's own: detected where the model runs, never taken from the server."""
    import edfed.common.precision

    monkeypatch.delenv("EDFED_PRECISION", raising=False)
    monkeypatch.setattr(edfed.common.precision, "native_bf16", lambda: native)
    grid = InProcessGrid(_sim_nodes(2))
    with _MatmulDtypes() as recorded:
        summary = run_federation(grid, _run_config(cohort, tmp_path / "run", tiny_encoder, **{
            "num-server-rounds": 1, "num-sites": 2, "epsilon": 8.0}), pooled=True)
    assert (torch.bfloat16 in recorded.dtypes) is native and torch.float32 in recorded.dtypes
    expected = "bf16" if native else "fp32"
    assert summary["precision"] == {"site-1": expected, "site-2": expected}
    assert summary["coordinator"]["precision"] == expected
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["precision"] == summary["precision"]
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert [dict(r.content["metrics"])["bf16"] for r in train] == [float(native)] * 2
    sent = next(m for m in grid.sent if m.metadata.message_type == "train").content["config"]
    assert not {"bf16", "precision"} & set(json.loads(sent["train-config"])) and "precision" not in sent


def test_another_noise_draw_or_seed_gives_every_simulated_site_other_dp_noise(tmp_path):
    from edfed.client.site import settings_from_configs

    def seed(site: int, draw: int, run_seed: int = 0) -> int:
        message = {"run-dir": str(tmp_path), "data-dir": str(tmp_path), "noise-draw": draw,
                   "train-config": json.dumps({"seed": run_seed})}
        settings = settings_from_configs({"partition-id": site}, message)
        return dp_rng_seed(settings, PrivacyLedger.open(settings.ledger_path, create=settings.new_ledger_id))

    assert seed(0, 0) == seed(0, 0) and seed(0, 0) != seed(1, 0)  # replays, and no two sites share noise
    assert seed(0, 1) != seed(0, 0) and seed(1, 1) != seed(1, 0) and seed(0, 1) != seed(1, 1)
    # Each seed of a sweep draws its own noise (a name-and-ledger seed replayed one noise vector at every seed).
    assert seed(0, 0, run_seed=1) != seed(0, 0) and seed(0, 0, run_seed=1) == seed(0, 0, run_seed=1)


@pytest.mark.slow
def test_a_federation_under_dp_sends_only_the_glm_and_a_site_deploys_from_it(cohort, tmp_path, tiny_encoder,
                                                                              monkeypatch):
    import shutil

    import edfed.client.local_models
    from edfed.client.local_models import CANDIDATES, LOCAL_ONLY_CACHE, deploy_at_site
    from edfed.common.data import load_site_splits
    from edfed.common.train import fit_model

    grid = InProcessGrid(_sim_nodes())
    run_dir = tmp_path / "run"
    run_config = _run_config(cohort, run_dir, tiny_encoder, epsilon=8.0, **{"lexical-features": 256,
                                                                             "glm-steps": 4})
    summary = run_federation(grid, run_config, pooled=True)
    assert summary["config"]["train"]["architecture"] == "glm"  # auto: the DP model when the sites use DP
    for reply in (r for r in grid.replies if r.metadata.message_type == "train"):
        assert set(reply.content["arrays"].keys()) == {"glm.weight", "glm.bias"}
    assert np.mean([summary["final"][o]["auroc"] for o in summary["final"]]) > 0.6
    fitted = []

    def recording_fit(config, *args, **kw):
        fitted.append(config.architecture)
        return fit_model(config, *args, **kw)

    monkeypatch.setattr(edfed.client.local_models, "fit_model", recording_fit)
    shutil.rmtree(cohort / LOCAL_ONLY_CACHE, ignore_errors=True)  # what earlier tests kept there
    rows = load_site_splits("site-2", cohort / "site-2.parquet", 0).table
    result, _ = deploy_at_site(run_config, run_dir, rows, cohort, tmp_path / "deployed")
    assert sorted(fitted) == ["full", "glm"]  # local-only: the full model; personalized: the GLM at home
    assert all(set(recipe["parts"]) <= set(CANDIDATES) for recipe in result["recipes"].values())
    again, _ = deploy_at_site(run_config, run_dir, rows, cohort, tmp_path / "deployed-again")
    assert sorted(fitted) == ["full", "glm", "glm"]  # the site's local-only model is kept, not retrained
    assert json.dumps(again["local-only"], sort_keys=True) == json.dumps(result["local-only"], sort_keys=True)
