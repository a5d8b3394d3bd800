"""Secure aggregation (docs/secure-aggregation.md): Flower's SecAgg+ sums the sites' noisy DP-GLM gradients.

In-process: `StatefulGrid` delivers every message to the real ClientApp with the node's own, persistent Context
(SecAgg+ keeps its keys there between its four stages, as a SuperNode does), signs them through the real
`SignedGrid`, and records everything the ServerApp receives.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

import edfed.client.client_app as client_module
import edfed.server.secure as secure_module
from edfed.client.client_app import app as client_app
from edfed.client.site import SiteSettings, secure_contribution
from edfed.common.config import TrainConfig
from edfed.common.credentials import site_key
from edfed.common.errors import EdfedError
from edfed.common.model import build_model
from edfed.common.privacy import PrivacyLedger, epsilon_of
from edfed.common.signing import ENVELOPE, coordinator_key
from edfed.server.federation import run_federation
from edfed.server.report import _privacy as privacy_section
from edfed.simulations.cohort import generate_cohort

RUN = 5
SITES = 3


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN, 0, 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("secagg") / "cohort", n_sites=SITES, visits_per_site=80, seed=5)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    coordinator_key(root / "coordinator")
    for k in range(SITES):
        site_key(f"ed-site-{k + 1}", root / "sites")
    return root


class StatefulGrid:
    """The SuperLink's part in-process: each node keeps its Context (state) across messages."""

    def __init__(self, node_configs: dict[int, dict], public_keys: dict[int, Path]) -> None:
        self.node_configs, self.public_keys = node_configs, public_keys
        self.contexts = {node: Context(run_id=RUN, node_id=node, node_config=cfg, state=RecordDict(), run_config={})
                         for node, cfg in node_configs.items()}
        self.run = type("Run", (), {"run_id": RUN})()
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def get_nodes(self) -> list[NodeInfo]:
        def pem(path: Path) -> bytes:
            key = serialization.load_ssh_public_key(path.read_bytes())
            return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return [NodeInfo(node_id=node, public_key=pem(self.public_keys[node])) for node in self.node_configs]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_run_id"] = RUN
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            # A copy, as the wire delivers: SecAgg+'s mod edits the message it reads, and its setup stage sends
            # every site the same content.
            reply = client_app(message_from_proto(message_to_proto(msg)), self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        self.received.extend(replies)
        return replies


def _nodes(keys: Path, **extra) -> tuple[dict[int, dict], dict[int, Path]]:
    nodes = {100 + k: {"partition-id": k, "num-partitions": SITES,
                       "coordinator-key": str(keys / "coordinator" / "coordinator.pub"),
                       "site-key": str(keys / "sites" / f"ed-site-{k + 1}.key"), **extra} for k in range(SITES)}
    return nodes, {100 + k: keys / "sites" / f"ed-site-{k + 1}.pub" for k in range(SITES)}


def _run_config(cohort: Path, run_dir: Path, tiny_encoder: Path, keys: Path, **overrides) -> dict:
    return {"data-dir": str(cohort), "run-dir": str(run_dir), "model": str(tiny_encoder), "epsilon": 8.0,
            "delta": 1e-5, "architecture": "glm", "modality": "structured", "glm-steps": 2, "num-server-rounds": 1,
            "num-sites": SITES, "min-sites": 2, "secure-aggregation": True, "secagg-sites": SITES,
            "max-epsilon-without-secagg": 1000.0, "coordinator-key": str(keys / "coordinator" / "coordinator.key"),
            "site-keys": str(keys / "sites"), **overrides}


@pytest.fixture(scope="module")
def secure_run(cohort, tmp_path_factory, tiny_encoder, keys):
    """One signed secure run of 2 steps at 3 sites: what the sites computed, what the coordinator received."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN, 0, 1
    run_dir = tmp_path_factory.mktemp("run") / "run"
    plain: list[dict] = []  # each site's contribution before SecAgg+ (inside the site)
    sums: list[dict] = []

    original_contribution = client_module.secure_contribution
    original_sum = secure_module.secure_sum

    def contribution(settings, *args, **kwargs):
        arrays, units, metrics = original_contribution(settings, *args, **kwargs)
        plain.append({"site": settings.name, "arrays": arrays, "units": units})
        return arrays, units, metrics

    def summed(grid, nodes, state, config, settings, sensitivity, timeout):
        aggregate, outcome = original_sum(grid, nodes, state, config, settings, sensitivity, timeout)
        sums.append({"aggregate": aggregate, "clip": settings.clipping_range(sensitivity)})
        return aggregate, outcome

    patch = pytest.MonkeyPatch()
    patch.setattr(client_module, "secure_contribution", contribution)
    patch.setattr(secure_module, "secure_sum", summed)
    try:
        grid = StatefulGrid(*_nodes(keys))
        summary = run_federation(grid, _run_config(cohort, run_dir, tiny_encoder, keys), pooled=False)
    finally:
        patch.undo()
    return {"grid": grid, "summary": summary, "plain": plain, "sums": sums, "run_dir": run_dir}


def _masked_vectors(grid: StatefulGrid) -> list[tuple[int, list[np.ndarray]]]:
    out = []
    for reply in grid.received:
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
        if record is not None and Key.MASKED_PARAMETERS in record:
            out.append((reply.metadata.src_node_id, [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]))
    return out


def test_the_coordinator_receives_masked_vectors_only(secure_run):
    grid, plain, sums = secure_run["grid"], secure_run["plain"], secure_run["sums"]
    assert len(sums) == 2 and all(s["aggregate"] is not None for s in sums)
    assert len(plain) == 2 * SITES
    # No reply the ServerApp received carries an array: the collect stage's arrays are cleared by SecAgg+.
    for reply in grid.received:
        assert not reply.has_error(), reply.error.reason
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    masked = _masked_vectors(grid)
    assert len(masked) == 2 * SITES
    first_step = {p["site"]: p for p in plain[:SITES]}
    clip = sums[0]["clip"]
    total_units = sum(p["units"] for p in first_step.values())
    for _, vectors in masked[:SITES]:
        values = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)  # [0] is the weight factor
        # A site's quantised contribution lies in [0, 2^22]; its masked vector is uniform on [0, 2^32).
        assert np.mean(values <= 2**22) < 0.05
        for site in first_step.values():  # and matches no site's quantised gradient
            quantised = np.concatenate([((np.clip(a * site["units"] / total_units, -clip, clip) + clip)
                                         * (2**22 / (2 * clip))).ravel() for a in site["arrays"].values()])
            assert np.mean(np.abs(values - quantised) <= 2) < 0.01


def test_the_sum_equals_the_plain_sum_of_the_noisy_gradients(secure_run):
    plain, sums = secure_run["plain"], secure_run["sums"]
    for k, summed in enumerate(sums):
        step = plain[k * SITES:(k + 1) * SITES]
        units = np.array([p["units"] for p in step], dtype=np.float64)
        for i, name in enumerate(["glm.weight", "glm.bias"]):
            expected = sum(p["units"] * p["arrays"][name].astype(np.float64) for p in step) / units.sum()
            # Each site's term is quantised to 2c / 2^22 (c: the clipping range) after weighting by units / total.
            tolerance = SITES * 2 * summed["clip"] / 2**22 + 1e-6 * np.abs(expected).max()
            np.testing.assert_allclose(summed["aggregate"][i], expected, rtol=0, atol=tolerance)
            assert np.abs(expected).max() > 100 * tolerance  # the check is not trivially met
        # The sum is not any one site's contribution.
        assert all(not np.allclose(summed["aggregate"][0], p["arrays"]["glm.weight"], atol=1e-3) for p in step)


def test_every_secure_stage_message_is_signed_and_each_site_records_both_epsilons(secure_run):
    grid, summary, run_dir = secure_run["grid"], secure_run["summary"], secure_run["run_dir"]
    stages = [m.content[RECORD_KEY_CONFIGS].get(Key.STAGE) for m in grid.sent if RECORD_KEY_CONFIGS in m.content]
    assert {Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK} <= set(stages)
    assert all(ENVELOPE in m.content for m in grid.sent)
    assert len({m.content[ENVELOPE]["nonce"] for m in grid.sent}) == len(grid.sent)
    for site in ("site-1", "site-2", "site-3"):
        ledger = PrivacyLedger.open(run_dir / "ledgers" / f"{site}.json")
        assert len(ledger.history) == 2
        for entry in ledger.history:
            assert entry["secagg-sites"] == SITES
            assert entry["share-noise"] == pytest.approx(entry["noise"] / math.sqrt(SITES))
        with_secagg, alone = ledger.spent(1e-5), ledger.spent_without_secagg(1e-5)
        assert with_secagg <= 8.0 * (1 + 1e-4) and alone > 1.5 * with_secagg
        assert alone == pytest.approx(epsilon_of([(ledger.history[0]["share-noise"], 1.0, 2)], 1e-5))
        privacy = summary["privacy"][site]
        assert privacy["secagg_sites"] == SITES and privacy["steps"] == 2
        assert privacy["epsilon"] == pytest.approx(with_secagg)
        assert privacy["epsilon_without_secagg"] == pytest.approx(alone)
    report = "\n".join(privacy_section(summary))  # edfed report's privacy table: both figures per site
    assert "| t | ε without secure aggregation |" in report
    assert f"| {summary['privacy']['site-1']['epsilon_without_secagg']:.3f} |" in report


def test_an_unsigned_secure_stage_message_is_refused(keys, tmp_path):
    nodes, _ = _nodes(keys)
    node = 100
    setup = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 3,
        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0})}),
        dst_node_id=node, message_type="train")
    setup.metadata.__dict__["_run_id"] = RUN
    context = Context(run_id=RUN, node_id=node, node_config=nodes[node], state=RecordDict(), run_config={})
    reply = client_app(setup, context)
    assert reply.has_error() and "signature" in reply.error.reason
    assert "secaggplus_state" not in context.state.config_records  # SecAgg+ never ran: no key was made


def _deployed(tmp_path: Path, cohort: Path, **extra) -> dict:
    return {"data-path": str(cohort / "site-1.parquet"), "epsilon": 8.0, "delta": 1e-5, "declared-patients": 60,
            "ledger-path": str(tmp_path / "ledger.json"), "unsigned-messages": True, **extra}


def test_a_deployed_site_refuses_secagg_setup_outside_its_policy(cohort, tmp_path):
    def setup(threshold: int, node_config: dict) -> Message:
        msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
            Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 6, Key.SHARE_NUMBER: 6, Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0})}),
            dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_run_id"] = RUN
        context = Context(run_id=RUN, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        return client_app(msg, context)

    PrivacyLedger.init(tmp_path / "ledger.json")
    declined = setup(6, _deployed(tmp_path, cohort))
    assert declined.has_error() and "does not take part in secure aggregation" in declined.error.reason
    policy = {"secure-aggregation": True, "min-secagg-sites": 4, "max-epsilon-without-secagg": 30.0}
    low = setup(3, _deployed(tmp_path, cohort, **policy))
    assert low.has_error() and "min-secagg-sites=4" in low.error.reason
    accepted = setup(4, _deployed(tmp_path, cohort, **policy))
    assert not accepted.has_error() and RECORD_KEY_CONFIGS in accepted.content  # its public keys
    incomplete = setup(6, _deployed(tmp_path, cohort, **{"secure-aggregation": True}))
    assert incomplete.has_error() and "min-secagg-sites" in incomplete.error.reason


def _secure_config(config: TrainConfig, sites: int, noise: float, steps: int = 4) -> dict:
    import json

    return {"train-config": json.dumps({k: v for k, v in config.to_dict().items() if k != "extra"}),
            "run-id": "run-x", "server-round": 1, "secure-aggregation": True, "secagg-sites": sites,
            "secagg-noise": noise, "num-rounds": steps}


@pytest.mark.parametrize("case, bounds, sites, threshold, match", [
    ("t below the site's minimum", {"min_secagg_sites": 4}, 3, 3, "fewer than this site's min-secagg-sites=4"),
    ("t above SecAgg+'s threshold", {"min_secagg_sites": 2}, 4, 3, "SecAgg\\+'s threshold is 3"),
    ("own shares over max-epsilon-without-secagg", {"min_secagg_sites": 2, "max_epsilon_without_secagg": 10.0}, 6, 6,
     "epsilon without secure aggregation would reach"),
    ("the sum's noise over the budget", {"min_secagg_sites": 2, "epsilon": 1.0}, 6, 6, "epsilon would reach"),
])
def test_a_site_refuses_a_secure_round_outside_its_bounds_and_spends_nothing(
        cohort, tmp_path, tiny_encoder, case, bounds, sites, threshold, match):
    config = TrainConfig(model=str(tiny_encoder), architecture="glm", modality="structured")
    settings = SiteSettings(**{"name": "site-1", "data_path": cohort / "site-1.parquet", "epsilon": 8.0,
                               "delta": 1e-5, "ledger_path": tmp_path / "ledger.json", "declared_patients": 60,
                               "create_ledger": True, "dp_seed": "s", "secure_aggregation": True, **bounds})
    noise = 1.3  # 4 steps: epsilon 7.3 from the sum's noise; 22.5 from one of six shares alone
    state = build_model(config).trainable_state()
    with pytest.raises(EdfedError, match=match):
        secure_contribution(settings, config, state, _secure_config(config, sites, noise), threshold)
    assert not (tmp_path / "ledger.json").exists() or not PrivacyLedger.open(tmp_path / "ledger.json").history
    # Within every bound the same site contributes, and its ledger records both figures.
    fine = SiteSettings(**{**settings.__dict__, "epsilon": 8.0, "min_secagg_sites": 2,
                           "max_epsilon_without_secagg": math.inf})
    arrays, units, metrics = secure_contribution(fine, config, state, _secure_config(config, 6, noise), 6)
    assert set(arrays) == {"glm.weight", "glm.bias"} and units == 42
    assert metrics["epsilon-without-secagg"] > metrics["epsilon"] > 0
    assert PrivacyLedger.open(tmp_path / "ledger.json").history[-1]["secagg-sites"] == 6


class DroppingGrid(StatefulGrid):
    """Node `dead` stops answering from SecAgg+ stage `stage` on (its message is delivered, no reply comes back)."""

    def __init__(self, *args, dead: int, stage: str) -> None:
        super().__init__(*args)
        self.dead, self.stage, self.gone = dead, stage, False

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        kept = []
        for msg, reply in zip(messages, replies, strict=True):
            config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if msg.metadata.dst_node_id == self.dead and config is not None and config.get(Key.STAGE) == self.stage:
                self.gone = True
            if not (self.gone and msg.metadata.dst_node_id == self.dead):
                kept.append(reply)
        return kept


@pytest.mark.parametrize("t, stage, completes", [
    (SITES, Stage.UNMASK, False),  # its masked vector is in, but its key shares never come: the step aborts
    (2, Stage.COLLECT_MASKED_VECTORS, True),  # t = 2 of 3: the two survivors' shares still hold the promised noise
])
def test_a_site_that_drops_mid_round_never_leaves_the_sum_with_less_noise(cohort, tmp_path, tiny_encoder, keys, t,
                                                                          stage, completes):
    grid = DroppingGrid(*_nodes(keys), dead=102, stage=stage)
    run_dir = tmp_path / "run"
    summary = run_federation(grid, _run_config(cohort, run_dir, tiny_encoder, keys, **{"secagg-sites": t,
                                                                                        "glm-steps": 1}),
                             pooled=False)
    before, after = (load_file(run_dir / "checkpoints" / f"round-{r}.safetensors") for r in (0, 1))
    changed = any(not torch.equal(before[n], after[n]) for n in before)
    aborted = [r for r in summary["rejected_updates"] if r.get("why") == "secure round aborted"]
    assert changed == completes and bool(aborted) != completes
    ledgers = {k: PrivacyLedger.open(run_dir / "ledgers" / f"site-{k}.json").history for k in (1, 2, 3)}
    assert len(ledgers[1]) == len(ledgers[2]) == 1 and ledgers[1][0]["secagg-sites"] == t
    # The site that dropped had recorded the step before its answer was lost: charged, whether or not it arrived.
    assert len(ledgers[3]) == 1
    # The summary shows what each site whose masked vector arrived spent, the aborted step included.
    released = {"site-1", "site-2", "site-3"} if stage == Stage.UNMASK else {"site-1", "site-2"}
    assert set(summary["privacy"]) == released
    assert all(summary["privacy"][s]["epsilon_without_secagg"] > summary["privacy"][s]["epsilon"] > 0
               for s in released)
