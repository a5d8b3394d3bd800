"""What the coordinator runs: the strategy, update checks, checkpoints, resume and the run's summary.

The server never sees a row of data in deployment. In simulation (all sites' files on one
machine) it also scores the global model on the pooled held-out splits, exactly as central
training does, so the two are comparable.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from safetensors.torch import load_file, save_file

from common.config import RUN_DEFAULTS, train_config_from
from common.contract import OUTCOMES
from common.errors import EdfedError
from common.evaluation import PooledEvaluation, write_summary
from common.exchange import encoder_fingerprint, frozen_init_fingerprint, state_bytes, update_problem
from common.files import atomic_write, atomic_write_text, latest_checkpoint, private_dir
from common.model import OutcomeModel, build_model
from common.precision import machine_facts


class CheckedAggregation:
    """Strategy mixin: only well-formed, finite updates of the expected shapes are aggregated.

    A refused round (budget), a failed site or a bad update is logged with the site that sent it
    and left out; the others are aggregated as long as at least `min_sites` remain.
    """

    def setup_checks(self, expected: dict[str, tuple[int, ...]], min_sites: int) -> None:
        self.expected, self.min_sites = expected, min_sites
        self.reports: dict[int, dict[str, dict]] = {}
        self.rejected: list[dict] = []
        self.reply_bytes: list[int] = []
        self.asked: dict[int, set[int]] = {}
        self.round_offset = 0  # rounds done before a resume: reports are keyed by the run's round number
        self.site_names: dict[int, str] = {}  # node -> the unique site-name it joined with (check_sites)
        self.releasing: set[int] = set()  # nodes whose release policy answers evaluate messages

    def site_of(self, node: int) -> str:
        return self.site_names.get(node, f"node-{node}")

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.asked[server_round] = {msg.metadata.dst_node_id for msg in messages}
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        """No per-round evaluation at the sites: its AUROCs were only logged, it cost every site a process start
        each round, and each was a query of the site's data outside its DP budget. The final global model is
        scored once (`evaluate_at_sites`); simulation scores every round on the pooled split at the server."""
        return []

    def aggregate_train(self, strategy_round, replies):
        accepted = []
        server_round = strategy_round + self.round_offset
        reports = self.reports.setdefault(server_round, {})
        # The SuperLink answers in place of a node that stopped sending heartbeats (the error's source is the
        # SuperLink itself); that node is one of those that did not answer.
        replies = [msg for msg in replies if msg.metadata.src_node_id != SUPERLINK_NODE_ID]
        for node in sorted(self.asked.get(strategy_round, set()) - {msg.metadata.src_node_id for msg in replies}):
            log(WARNING, "round %d: node %s did not answer (offline, or not within round-timeout); going on "
                "without it", server_round, node)
            self.rejected.append({"round": server_round, "node": node, "why": "no answer"})
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "round %d: node %s failed: %s", server_round, node, msg.error.reason[:300])
                self.rejected.append({"round": server_round, "node": node, "why": "failed"})
                continue
            metrics = dict(msg.content["metrics"]) if "metrics" in msg.content else {}
            site = self.site_of(node)
            reports[site] = metrics
            if "arrays" not in msg.content:
                why = REFUSALS.get(int(metrics.get("refused", 0)), "sent no update")
                log(WARNING, "round %d: %s %s", server_round, site, why)
                self.rejected.append({"round": server_round, "site": site, "why": why})
                continue
            arrays = {k: v.numpy() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
            problem = update_problem(arrays, self.expected)
            if problem:
                log(WARNING, "round %d: rejected the update from %s (node %s): %s", server_round, site, node, problem)
                self.rejected.append({"round": server_round, "site": site, "why": problem})
                continue
            self.reply_bytes.append(state_bytes(arrays))
            accepted.append(msg)
        if len(accepted) < self.min_sites:
            log(WARNING, "round %d: %d usable updates, fewer than min-sites=%d; keeping the previous global model",
                server_round, len(accepted), self.min_sites)
            return None, None
        return super().aggregate_train(strategy_round, accepted)


REFUSALS = {1: "refused the round: privacy budget", 2: "refused the round: it had already trained this round"}


class CheckedFedAvg(CheckedAggregation, FedAvg):
    pass


class CheckedFedProx(CheckedAggregation, FedProx):
    pass


class CheckedFedAdam(CheckedAggregation, FedAdam):
    pass


def make_strategy(run_config: dict, expected: dict[str, tuple[int, ...]]) -> CheckedAggregation:
    """Every connected site trains each round; a round waits for no more than `min-sites` of them, so a
    site that died does not stall the run (its unanswered message ends with `round-timeout`)."""
    name = str(run_config["strategy"]).lower()
    min_sites = int(run_config["min-sites"])
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=min_sites, min_available_nodes=min_sites)
    if name == "fedavg":
        strategy = CheckedFedAvg(**common)
    elif name == "fedprox":
        strategy = CheckedFedProx(**common, proximal_mu=float(run_config["proximal-mu"]))
    elif name == "fedadam":
        strategy = CheckedFedAdam(**common, eta=float(run_config["server-lr"]), eta_l=float(run_config["lr"]))
    else:
        raise EdfedError(f"strategy must be fedavg, fedprox or fedadam, got {name!r}")
    strategy.setup_checks(expected, int(run_config["min-sites"]))
    return strategy


class JoinedSites:
    """The grid as the strategy sees it: connected nodes whose site passed the check before round 1.

    A site that restarts keeps its node id (it is bound to its registered key), so it rejoins.
    """

    def __init__(self, grid: Grid, joined: set[int]) -> None:
        self._grid, self.joined = grid, joined

    def get_node_ids(self):
        return [node for node in self._grid.get_node_ids() if node in self.joined]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def check_sites(grid: Grid, config: ConfigRecord, run_config: dict) -> tuple[set[int], dict[str, dict], list[dict]]:
    """Wait for `num-sites` sites (up to `join-timeout` s), then ask each to check itself.

    A site checks its encoder, its table against the data contract and its privacy ledger; one that
    fails answers with the reason and is left out of the run. A site is known by its `site-name`; a second
    node with a name already taken is left out too (its reports would overwrite the first's). Fewer than
    `min-sites` left: stop. Returns (joined nodes, site name -> check report, refusals).
    """
    expected, min_sites = int(run_config["num-sites"]), int(run_config["min-sites"])
    deadline = time.monotonic() + float(run_config["join-timeout"])
    while len(nodes := list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        log(INFO, "waiting for sites: %d of %d connected", len(nodes), expected)
        time.sleep(2)
    messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type="query.check")
                for node in nodes]
    joined, sites, refused = set(), {}, []
    for reply in grid.send_and_receive(messages, timeout=float(run_config["round-timeout"])):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %s does not join this run: %s", node, reply.error.reason[:500])
            refused.append({"node": node, "why": reply.error.reason[:500]})
            continue
        metrics = dict(reply.content["metrics"])
        site = str(dict(reply.content["site"])["site-name"]) if "site" in reply.content else ""
        if not site or site in sites:
            why = f"site-name {site!r} is already taken by node {sites[site]['node']}" if site else "no site-name"
            log(WARNING, "node %s does not join this run: %s", node, why)
            refused.append({"node": node, "why": why})
            continue
        sites[site] = {"node": node, **metrics}
        joined.add(node)
        log(INFO, "%s (node %s) joins: %d visits, epsilon budget %s", site, node, metrics["rows"],
            metrics["epsilon-budget"])
    silent = set(nodes) - joined - {r["node"] for r in refused}
    refused += [{"node": node, "why": "no answer to the check"} for node in silent]
    if len(joined) < min_sites:
        raise EdfedError(f"only {len(joined)} of {len(nodes)} connected sites passed the check before round 1 "
                         f"(min-sites is {min_sites}); see the warnings above for each site's reason")
    return joined, sites, refused


def evaluate_at_sites(grid: Grid, joined: set[int], state: dict[str, torch.Tensor], config: ConfigRecord,
                      timeout: float, names: dict[int, str]) -> dict[str, dict]:
    """Deployment: each site that releases metrics scores the final global model on its own test split; only
    AUROCs come back. An undefined AUROC (a site's test split with one class) stays NaN, never 0.5."""
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({**dict(config), "split": "test"})})
    messages = [Message(content, dst_node_id=node, message_type="evaluate")
                for node in grid.get_node_ids() if node in joined]
    per_site = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(WARNING, "node %s could not score the final model: %s", reply.metadata.src_node_id,
                reply.error.reason[:300])
            continue
        metrics = dict(reply.content["metrics"])
        node = reply.metadata.src_node_id
        per_site[names.get(node, f"node-{node}")] = {
            outcome: {"auroc": float(metrics.get(f"{outcome}-auroc", math.nan)), "n": int(metrics["num-examples"])}
            for outcome in OUTCOMES}
    return dict(sorted(per_site.items()))


class RunFolder:
    """RUN_DIR: run.json (id + config), checkpoints/round-K.safetensors, adapter/ (PEFT), summary.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"

    def start(self, run_config: dict) -> dict:
        meta_path = self.path / "run.json"
        if run_config.get("resume"):
            if not meta_path.exists():
                raise EdfedError(f"--resume {self.path}: no run.json there, nothing to resume")
            meta = json.loads(meta_path.read_text())
            meta["resumed"] = meta.get("resumed", 0) + 1
        else:
            if (self.path / "summary.json").exists() or self.checkpoints.exists():
                raise EdfedError(f"{self.path} already holds a run; use --resume {self.path} or another --out")
            meta = {"run-id": uuid.uuid4().hex[:12], "config": run_config, "started": datetime.now().isoformat()}
        private_dir(self.path)  # the coordinator's: arrays the sites' budgets paid for
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        return meta

    def record(self, meta: dict, facts: dict) -> None:
        meta.update(facts)
        atomic_write_text(self.path / "run.json", json.dumps(meta, indent=1))

    def save_history(self, strategy: CheckedAggregation, rounds: dict[int, dict]) -> None:
        """What the summary reports about past rounds, kept so that a resumed run's summary covers them."""
        history = {"reports": {str(k): v for k, v in strategy.reports.items()}, "rejected": strategy.rejected,
                   "rounds": {str(k): v for k, v in rounds.items()}}
        atomic_write_text(self.path / "history.json", json.dumps(history, indent=1))

    def load_history(self, strategy: CheckedAggregation, rounds: dict[int, dict], upto: int) -> None:
        path = self.path / "history.json"
        if not path.exists():
            return
        history = json.loads(path.read_text())
        strategy.reports.update({int(k): v for k, v in history["reports"].items() if int(k) <= upto})
        strategy.rejected.extend(r for r in history["rejected"] if r["round"] <= upto)
        rounds.update({int(k): v for k, v in history["rounds"].items() if int(k) <= upto})

    def last_round(self) -> tuple[int, dict[str, torch.Tensor] | None]:
        checkpoint = latest_checkpoint(self.path)
        if checkpoint is None:
            return 0, None
        return int(checkpoint.stem.split("-")[1]), load_file(checkpoint)

    def save_round(self, server_round: int, model: OutcomeModel, state: dict[str, torch.Tensor]) -> None:
        """The round's global state (for resume) and, as the latest, a plain PEFT adapter folder."""
        private_dir(self.checkpoints)
        atomic_write(self.checkpoints / f"round-{server_round}.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))
        model.load_trainable_state(state)
        if model.encoder is not None:
            model.encoder.save_pretrained(self.path / "adapter")
        # Everything outside the encoder, frozen parts too (compact's frozen projection and fusion are the seeded
        # ones, but the adapter folder should not depend on torch reproducing that seed).
        heads = {n: p.detach().contiguous() for n, p in model.named_parameters() if not n.startswith("encoder.")}
        private_dir(self.path / "adapter")
        atomic_write(self.path / "adapter" / "edfed_heads.safetensors", lambda tmp: save_file(heads, tmp))


def run_federation(grid: Grid, run_config: dict, pooled: bool = False, on_round=None) -> dict:
    """Run (or resume) a federation to the end and return its summary (also written to RUN_DIR).

    `pooled`: the server can read every site's file (simulation), so it scores the global model on
    the pooled validation split after every round and on the pooled test split at the end.
    `on_round(round, total, aurocs, seconds)` is called after every round (progress display).
    """
    started = time.perf_counter()
    run_config = {**RUN_DEFAULTS, **run_config}
    folder = RunFolder(Path(str(run_config["run-dir"]) or f"runs/federated-{datetime.now():%Y%m%d-%H%M%S}"))
    meta = folder.start(run_config)
    if run_config.get("resume"):
        run_config = {**RUN_DEFAULTS, **meta["config"], "resume": True}
    config = train_config_from(run_config)
    model = build_model(config)
    done, state = folder.last_round()
    state = state or model.trainable_state()
    expected = {k: tuple(v.shape) for k, v in model.trainable_state().items()}
    strategy = make_strategy(run_config, expected)
    total_rounds = int(run_config["num-server-rounds"])
    fingerprint = encoder_fingerprint(config.encoder_dir) if config.uses_text else ""
    # Kept with the run, so whoever builds on its global model later (`edfed personalize`) checks the same things.
    folder.record(meta, {"encoder-fingerprint": fingerprint, "frozen-fingerprint": frozen_init_fingerprint(model)})
    train_config = ConfigRecord({
        "train-config": json.dumps({k: v for k, v in config.to_dict().items() if k != "extra"}),
        # A resumed run is a new attempt at the sites: a site that trained a round before the coordinator crashed
        # refuses that (run, round) again (its noise would repeat), so each attempt has its own id and plans its
        # noise over the rounds it has left, from what each site's ledger has left.
        "run-id": meta["run-id"] + (f"-resume{meta['resumed']}" if meta.get("resumed") else ""),
        "num-rounds": total_rounds - done if meta.get("resumed") else total_rounds, "round-offset": done,
        "local-epochs": int(run_config["local-epochs"]), "max-grad-norm": float(run_config["max-grad-norm"]),
        "dp-clipping": str(run_config["dp-clipping"]), "site-privacy-unit": str(run_config["privacy-unit"]),
        "encoder-fingerprint": fingerprint, "frozen-fingerprint": meta["frozen-fingerprint"],
        "site-epsilon": float(run_config["epsilon"]), "noise-draw": int(run_config["noise-draw"]),
        "site-delta": float(run_config["delta"]), "data-dir": str(run_config["data-dir"]),
        "run-dir": str(folder.path), "ledger-dir": str(run_config["ledger-dir"]), "model": str(config.model),
    })
    rounds: dict[int, dict] = {}
    evaluation = PooledEvaluation(Path(str(run_config["data-dir"])), config) if pooled else None

    strategy.round_offset = done
    folder.load_history(strategy, rounds, upto=done)
    # Wall seconds per phase; a round is its train messages and aggregation (round 0: the initial model), then
    # the server's pooled validation of the new global model (simulation only).
    timings: dict = {"rounds": {}}
    round_started = [time.perf_counter()]

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        real_round = server_round + done
        round_seconds = time.perf_counter() - round_started[0]
        round_state = arrays.to_torch_state_dict()
        aurocs: dict[str, float] = {}
        validated = time.perf_counter()
        if evaluation is not None:
            model.load_trainable_state(round_state)
            aurocs = rounds[real_round] = {o: m["auroc"] for o, m in evaluation.validation(model).items()}
            log(INFO, "round %d: pooled validation AUROC %s", real_round, {k: round(v, 3) for k, v in aurocs.items()})
        timings["rounds"][str(real_round)] = {"seconds": round_seconds,
                                              "validation_seconds": time.perf_counter() - validated}
        if server_round > 0 or done == 0:
            folder.save_history(strategy, rounds)  # first: a resume reads history up to its last checkpoint
            folder.save_round(real_round, model, round_state)
        if on_round:
            on_round(real_round, total_rounds, aurocs, round_seconds)
        round_started[0] = time.perf_counter()
        return MetricRecord({f"{o}-auroc": v for o, v in aurocs.items()}) if aurocs else None

    sites, refused, joined = {}, [], set()
    if done < total_rounds:
        joining = time.perf_counter()
        joined, sites, refused = check_sites(grid, train_config, run_config)
        timings["join_seconds"] = time.perf_counter() - joining
        round_started[0] = time.perf_counter()
        strategy.site_names = {info["node"]: site for site, info in sites.items()}
        strategy.releasing = {info["node"] for info in sites.values() if info.get("releases-metrics")}
        result = strategy.start(grid=JoinedSites(grid, joined), initial_arrays=ArrayRecord(state),
                                num_rounds=total_rounds - done, timeout=float(run_config["round-timeout"]),
                                train_config=train_config,
                                evaluate_config=ConfigRecord(dict(train_config)), evaluate_fn=after_round)
        final = result.arrays.to_torch_state_dict() if result.arrays is not None else {}
        final_state = final or state  # no round of this attempt aggregated: the last checkpoint stands
    else:
        final_state = state
    model.load_trainable_state(final_state)
    scoring = time.perf_counter()
    summary = build_summary(run_config, meta, folder, model, strategy, rounds, evaluation, total_rounds)
    summary["sites"], summary["refused_sites"] = sites, refused
    if evaluation is None and strategy.releasing:
        summary["per_site"] = evaluate_at_sites(grid, strategy.releasing, final_state, train_config,
                                                float(run_config["round-timeout"]), strategy.site_names)
    timings["final_evaluation_seconds"] = time.perf_counter() - scoring
    # Each site's first round in this run read, checked, tokenized and cached its data (its own report, where
    # its release policy shares timing: simulated sites do).
    first = {site: m["data-seconds"] for r in sorted(strategy.reports, reverse=True)
             for site, m in strategy.reports[r].items() if "data-seconds" in m}
    timings["site_data_seconds"] = dict(sorted(first.items()))
    summary["timings"] = timings
    summary["wall_seconds"] = time.perf_counter() - started
    write_summary(folder.path, summary)
    return summary


def build_summary(run_config, meta, folder, model, strategy, rounds, evaluation, total_rounds) -> dict:
    reports = strategy.reports
    last_report = {}
    for server_round in sorted(reports):
        for site, metrics in reports[server_round].items():
            last_report[site] = metrics
    privacy = {}
    for site, m in sorted(last_report.items()):
        privacy[site] = {"epsilon": m.get("epsilon", math.inf), "delta": m.get("delta", float(run_config["delta"])),
                         "noise_multiplier": m.get("noise-multiplier", 0.0), "sample_rate": m.get("sample-rate"),
                         "steps": int(sum(r.get(site, {}).get("steps", 0) for r in reports.values())),
                         "unit": {1.0: "patient", 0.0: "visit"}.get(m.get("patient-level"), "none"),
                         "budget": m.get("epsilon-budget", math.inf), "refused_rounds": int(sum(
                             bool(r.get(site, {}).get("refused", 0)) for r in reports.values()))}
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sent = strategy.reply_bytes
    summary = {
        "kind": "federated",
        "run_id": meta["run-id"],
        "config": {**run_config, "train": train_config_from(run_config).to_dict()},
        "final": {}, "per_site": {},
        "privacy": privacy,
        "communication": {"bytes_sent_per_client_round": int(np.mean(sent)) if sent else 0,
                          "full_model_bytes": int(full_bytes),
                          "share_of_full_model": (float(np.mean(sent)) / full_bytes) if sent else 0.0},
        "rounds": {str(k): v for k, v in sorted(rounds.items())},
        "site_reports": {str(k): v for k, v in sorted(reports.items())},
        "rejected_updates": strategy.rejected,
        "client_train_seconds": float(sum(m.get("round-seconds", 0.0) for r in reports.values() for m in r.values())),
        "client_step_seconds": float(sum(m.get("train-seconds", 0.0) for r in reports.values() for m in r.values())),
        "num_rounds": total_rounds,
        # Each site's frozen-pass float format, from its own round metrics (each machine picks its own).
        "precision": {site: "bf16" if m["bf16"] else "fp32" for site, m in sorted(last_report.items()) if "bf16" in m},
        "coordinator": {**machine_facts(), "precision": model.precision},
    }
    if evaluation is not None:
        title = f"federated ({run_config['strategy']}, epsilon {run_config['epsilon']})"
        summary["final"], summary["per_site"] = evaluation.test(model, folder.path, title)
    return summary
