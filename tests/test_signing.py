"""Only the coordinator can instruct a site, and only a site can answer for itself (issue 27).

Fast and in-process: the ClientApp's handlers called directly with a Message and explicit Metadata, as a
SuperNode delivers it; the coordinator's SignedGrid around a grid that answers as given. The real-process
attacks (another hospital's Fleet API pushes) are in tests/test_perimeter.py.
"""

from __future__ import annotations

import json
import math
import stat
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from edfed.cli.main import main as edfed
from edfed.client.client_app import app as client_app
from edfed.client.instructions import guard_for
from edfed.client.runner import proc_hides_processes
from edfed.common.config import TrainConfig
from edfed.common.credentials import site_key
from edfed.common.errors import EdfedError
from edfed.common.signing import (
    ENVELOPE,
    coordinator_key,
    key_id,
    load_coordinator_key,
    load_site_key,
    load_site_public_keys,
    reply_problem,
    sign_instruction,
    sign_reply,
    verify_instruction,
)
from edfed.server.federation import run_federation
from edfed.simulations.cohort import generate_cohort

NODE, OTHER, RUN = 7, 8, 5


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    coordinator_key(root / "coordinator")
    coordinator_key(root / "impostor")  # an Ed25519 key the sites do not list
    for name in ("ed-site-1", "ed-site-2"):
        site_key(name, root / "sites")
    return root


def _message(kind: str, dst: int = NODE, run: int = RUN, **config) -> Message:
    """A message as the SuperLink delivers it: NaN arrays, so a handler that read them would say so."""
    train_config = json.dumps({k: v for k, v in TrainConfig().to_dict().items() if k != "extra"})
    content = RecordDict({"config": ConfigRecord({"train-config": train_config, "run-id": "run-1", "server-round": 1,
                                                  **config})})
    if kind != "query.check":
        content["arrays"] = ArrayRecord({"w": torch.full((2, 3), float("nan"))})
    return Message(content=content, metadata=Metadata(
        run_id=run, message_id=f"msg-{time.monotonic_ns()}", src_node_id=1, dst_node_id=dst, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600, message_type=kind))


def _signed(msg: Message, keys: Path, who: str = "coordinator", **overrides) -> Message:
    args = {"run_id": msg.metadata.run_id, "valid_for": 600.0, **overrides}
    return sign_instruction(msg, key=load_coordinator_key(keys / who / "coordinator.key"), **args)


def _deployed(keys: Path, tmp_path: Path, **extra) -> dict:
    return {"data-path": str(tmp_path / "site-1.parquet"), "epsilon": 8.0, "delta": 1e-5,
            "ledger-path": str(tmp_path / "ledger.json"),
            "coordinator-key": str(keys / "coordinator" / "coordinator.pub"),
            "site-key": str(keys / "sites" / "ed-site-1.key"), **extra}


def _ask(node_config: dict, msg: Message, node: int = NODE) -> Message:
    return client_app(msg, Context(run_id=msg.metadata.run_id, node_id=node, node_config=node_config,
                                   state=RecordDict(), run_config={}))


def _refused(reply: Message, why: str) -> None:
    assert reply.has_error(), "the site obeyed"
    assert why in reply.error.reason, reply.error.reason
    assert "NaN" not in reply.error.reason  # refused before the arrays were read


def test_a_site_refuses_unsigned_forged_misaddressed_tampered_stale_and_replayed_instructions(keys, tmp_path):
    node = _deployed(keys, tmp_path)
    ledger = tmp_path / "ledger.json"
    _refused(_ask(node, _message("train")), "carries no signature")
    _refused(_ask(node, _signed(_message("train"), keys, "impostor")), "not this site's coordinator key")
    # Another site's genuine instruction, re-addressed to this node (a registered node can push it).
    stolen = _signed(_message("train", dst=OTHER), keys)
    stolen.metadata.__dict__["_dst_node_id"] = NODE
    _refused(_ask(node, stolen), "signed it for node '8'")
    _refused(_ask(node, _signed(_message("train"), keys), node=OTHER), "delivered for node 7, this is node 8")
    other_run = _signed(_message("train"), keys)
    other_run.metadata.__dict__["_run_id"] = RUN + 1  # a genuine instruction replayed into another run
    _refused(_ask(node, other_run), "for run '5', not '6'")
    tampered = _signed(_message("train"), keys)
    tampered.content["config"]["server-round"] = 2
    _refused(_ask(node, tampered), "for round '1', not '2'")
    tampered = _signed(_message("train"), keys)
    tampered.content["arrays"] = ArrayRecord({"w": torch.zeros(2, 3)})
    _refused(_ask(node, tampered), "does not verify")
    _refused(_ask(node, _signed(_message("train"), keys, now=time.time() - 7200, valid_for=600.0)),
             "a delayed or replayed instruction")
    assert not ledger.exists() and not Path(f"{ledger}.lock").exists()  # no refusal reached the ledger

    # A genuine instruction runs once: the same signed message again is a replay, refused before the handler.
    once = _signed(_message("evaluate", split="val"), keys)
    first = _ask(node, once)  # passes the check; the site's own settings then decline it (no release-metrics)
    assert first.has_error() and "signature" not in first.error.reason and "instruction" not in first.error.reason
    _refused(_ask(node, once), "already run")
    assert not ledger.exists()


def test_a_deployed_site_without_a_coordinator_key_refuses_everything_and_says_how_to_configure_it(keys, tmp_path):
    for missing in ("coordinator-key", "site-key"):
        node = {k: v for k, v in _deployed(keys, tmp_path).items() if k != missing}
        reply = _ask(node, _signed(_message("train"), keys))
        _refused(reply, f"add {missing}=")
    with pytest.raises(EdfedError, match="no coordinator key"):
        guard_for({"data-path": "x.parquet"})
    # Explicitly unsigned (tests and trials only), or simulated: no keys needed.
    assert not guard_for({"data-path": "x.parquet", "unsigned-messages": "true"}).keys
    assert not guard_for({"partition-id": 0}).keys


def test_the_trust_file_of_the_site_runner_can_hold_the_coordinator_key(keys, tmp_path, monkeypatch):
    pub = (keys / "coordinator" / "coordinator.pub").read_text().strip()
    trust = tmp_path / "trust.toml"
    trust.write_text(f'min-version = "0.1.0"\nkeys = []\ncoordinator-keys = ["{pub}"]\n')
    monkeypatch.setenv("EDFED_TRUST_FILE", str(trust))
    node = {k: v for k, v in _deployed(keys, tmp_path).items() if k != "coordinator-key"}
    guard = guard_for(node)
    guard.accept(_signed(_message("train"), keys), NODE)
    with pytest.raises(EdfedError, match="carries no signature"):
        guard.accept(_message("train"), NODE)


def _reply_for(instruction: Message, node: int, key_file: Path, arrays: float = 0.5) -> Message:
    reply = Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((2, 3), arrays)}),
                                "metrics": MetricRecord({"num-examples": 10})}), reply_to=instruction)
    return sign_reply(reply, instruction, node_id=node, key=load_site_key(key_file))


def test_a_reply_counts_only_when_signed_by_the_addressed_sites_registered_key(keys):
    sites = load_site_public_keys(keys / "sites")
    instruction = _message("train", dst=OTHER)
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    genuine = _reply_for(instruction, OTHER, keys / "sites" / "ed-site-2.key")
    assert reply_problem(genuine, instruction, sites["ed-site-2"]) is None
    forged = _reply_for(instruction, OTHER, keys / "sites" / "ed-site-1.key")  # site-1 answers in site-2's name
    assert "not by the key registered" in reply_problem(forged, instruction, sites["ed-site-2"])
    genuine.content["arrays"] = ArrayRecord({"w": torch.full((2, 3), 1e6)})  # changed on the way
    assert "not by the key registered" in reply_problem(genuine, instruction, sites["ed-site-2"])
    unsigned = Message(RecordDict({"metrics": MetricRecord({"num-examples": 10})}), reply_to=instruction)
    assert "carries no signature" in reply_problem(unsigned, instruction, sites["ed-site-2"])


class AnsweringGrid:
    """A grid (as the SuperLink's) that delivers each message to the in-process ClientApp, or to `forge`."""

    def __init__(self, node_configs: dict[int, dict], public_keys: dict[int, Path], forge=None) -> None:
        self.node_configs, self.public_keys, self.forge = node_configs, public_keys, forge
        self.run = type("Run", (), {"run_id": RUN})()
        self.sent: list[Message] = []

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
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as HttpGrid.push_messages does
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            forged = self.forge(msg) if self.forge else None
            replies.append(forged if forged is not None else client_app(msg, Context(
                run_id=RUN, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={})))
        return replies


def test_signed_federation_runs_and_a_forged_reply_is_dropped_and_reported(keys, tmp_path, tiny_encoder):
    cohort = generate_cohort(tmp_path / "cohort", n_sites=3, visits_per_site=60, seed=3)
    nodes = {100 + k: {"partition-id": k, "num-partitions": 3,
                       "coordinator-key": str(keys / "coordinator" / "coordinator.pub"),
                       "site-key": str(keys / "sites" / f"ed-site-{k + 1}.key")} for k in range(2)}
    public = {100 + k: keys / "sites" / f"ed-site-{k + 1}.pub" for k in range(2)}

    def forge(msg: Message) -> Message | None:  # site-1 (node 100) answers node 101's first train message
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 101 and not forged_once:
            forged_once.append(msg)
            return _reply_for(msg, 101, keys / "sites" / "ed-site-1.key", arrays=1e3)
        return None

    forged_once: list[Message] = []
    grid = AnsweringGrid(nodes, public, forge)
    summary = run_federation(grid, {
        "data-dir": str(cohort), "run-dir": str(tmp_path / "run"), "model": str(tiny_encoder), "epsilon": math.inf,
        "lr": 0.01, "lora-layers": 1, "num-sites": 2, "min-sites": 1, "num-server-rounds": 1,
        "coordinator-key": str(keys / "coordinator" / "coordinator.key"), "site-keys": str(keys / "sites")},
        pooled=False)
    assert all(ENVELOPE in msg.content for msg in grid.sent)  # every message signed, each with its own envelope
    assert len({msg.content[ENVELOPE]["nonce"] for msg in grid.sent}) == len(grid.sent)
    assert set(summary["sites"]) == {"site-1", "site-2"}  # the sites accepted the signed check
    assert [(f["node"], f["site-key"], f["message_type"]) for f in summary["forged_replies"]] == [
        (101, "ed-site-2", "train")]
    assert set(summary["site_reports"]["1"]) == {"site-1"}  # the forged update was not aggregated
    state = load_file(tmp_path / "run" / "checkpoints" / "round-1.safetensors")
    assert max(float(v.abs().max()) for v in state.values()) < 100  # nothing of the forged 1e3 arrays


def test_instruction_fields_are_checked_by_the_signature_not_only_by_the_clear_copy(keys):
    msg = _signed(_message("train"), keys)
    pub = serialization.load_ssh_public_key((keys / "coordinator" / "coordinator.pub").read_bytes())
    envelope = msg.content[ENVELOPE]
    envelope["nonce"] = "0" * 32  # a replay under a fresh nonce
    with pytest.raises(EdfedError, match="does not verify"):
        verify_instruction(msg, NODE, {key_id(pub): pub})


def test_the_coordinator_key_is_written_owner_only_and_never_printed(tmp_path, capsys):
    assert edfed(["deploy", "coordinator-key", "--out", str(tmp_path / "coordinator")]) == 0
    key = tmp_path / "coordinator" / "coordinator.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    printed = capsys.readouterr()
    assert "coordinator key id" in printed.out
    assert key.read_text().splitlines()[1] not in printed.out + printed.err
    assert edfed(["deploy", "coordinator-key", "--out", str(tmp_path / "coordinator")]) == 2  # never overwritten


def test_the_site_runner_lists_the_coordinator_key_and_checks_that_proc_hides_the_task_token(tmp_path, monkeypatch):
    assert edfed(["deploy", "consortium-key", "--out", str(tmp_path / "consortium")]) == 0
    assert edfed(["deploy", "coordinator-key", "--out", str(tmp_path / "coordinator")]) == 0
    assert edfed(["deploy", "site-runner", "--consortium-key", str(tmp_path / "consortium" / "consortium.pub"),
                  "--coordinator-key", str(tmp_path / "coordinator" / "coordinator.pub"),
                  "--out", str(tmp_path / "runner")]) == 0
    monkeypatch.setenv("EDFED_TRUST_FILE", str(tmp_path / "runner" / "trust.toml"))
    assert len(guard_for({"partition-id": 0}).keys) == 1
    mounts = "22 28 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw{}\n"
    assert proc_hides_processes(mounts.format(",hidepid=2"))
    assert proc_hides_processes(mounts.format(",hidepid=invisible"))
    assert not proc_hides_processes(mounts.format("")) and not proc_hides_processes("")


def test_a_refusal_the_superlink_makes_for_an_offline_node_names_that_node_not_node_1(keys, tmp_path):
    from flwr.app import Error

    from edfed.server.federation import check_sites

    class OfflineGrid(AnsweringGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = msg.object_id
                reply = Message(Error(code=0, reason="node went offline"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers in the node's place
                replies.append(reply)
            return replies

    settings = {"num-sites": 1, "min-sites": 0, "join-timeout": 0, "round-timeout": 1}
    _, _, refused = check_sites(OfflineGrid({42: {}}, {}), ConfigRecord({}), settings)
    assert refused == [{"node": 42, "why": "the SuperLink answered for it: node went offline"}]
