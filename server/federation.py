"""What the coordinator runs: the sites join, the rounds run, the final global model is scored.

The server never sees a row of data in deployment. In simulation (all sites' files on one
machine) it also scores the global model on the pooled held-out splits, exactly as central
training does, so the two are comparable. The strategy and its update checks are in server/strategy.py,
the run folder (checkpoints, resume) in server/run_folder.py, the summary in server/summary.py.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid

from edfed.common.config import TrainConfig, train_config_from
from edfed.common.contract import OUTCOMES
from edfed.common.errors import EdfedError
from edfed.common.evaluation import PooledEvaluation, write_summary
from edfed.common.exchange import encoder_fingerprint, frozen_init_fingerprint
from edfed.common.model import OutcomeModel, build_model
from edfed.server.run_folder import RunFolder
from edfed.server.secure import declared_units, run_secure_rounds, secure_message_config, secure_settings
from edfed.server.signed_grid import SignedGrid
from edfed.server.strategy import CheckedAggregation, make_strategy
from edfed.server.summary import build_summary, site_data_seconds

OnRound = Callable[[int, int, dict[str, float], float], None]


def run_federation(grid: Grid, run_config: dict, pooled: bool = False, on_round: OnRound | None = None) -> dict:
    """Run (or resume) a federation to the end and return its summary (also written to RUN_DIR).

    `pooled`: the server can read every site's file (simulation), so it scores the global model on
    the pooled validation split after every round and on the pooled test split at the end.
    `on_round(round, total, aurocs, seconds)` is called after every round (progress display).
    """
    started = time.perf_counter()
    # The keys are the coordinator's deployment, not the run's settings: read from this call's run config (a
    # resumed run keeps its settings from run.json, and signs with the keys it is given now).
    grid = SignedGrid.from_run_config(grid, run_config, deployed=not pooled)
    folder, meta, run_config = RunFolder.open(run_config)
    config = train_config_from(run_config)
    model = build_model(config)
    done, state = folder.last_round()
    state = state or model.trainable_state()
    strategy = make_strategy(run_config, {k: tuple(v.shape) for k, v in model.trainable_state().items()}, done)
    # Kept with the run, so whoever builds on its global model later (`edfed personalize`) checks the same things.
    folder.record(meta, {"encoder-fingerprint": encoder_fingerprint(config.encoder_dir) if config.uses_text else "",
                         "frozen-fingerprint": frozen_init_fingerprint(model)})
    site_config = site_message_config(run_config, config, meta, folder.path, done)
    evaluation = PooledEvaluation(Path(str(run_config["data-dir"])), config) if pooled else None
    loop = RoundLoop(folder, strategy, model, evaluation, done, int(run_config["num-server-rounds"]), on_round)
    folder.load_history(strategy, loop.rounds, upto=done)

    sites, refused, final_state = {}, [], state
    secure = _flag(run_config.get("secure-aggregation", False))
    if done < loop.total:  # else a resumed run whose rounds had all been checkpointed: only its summary is left
        if secure:  # the sites check the whole secure run against their bounds before they join
            if not config.glm:
                raise EdfedError("secure-aggregation sums the DP-GLM's gradients: set architecture glm (or auto with "
                                 "a finite epsilon)")
            settings = secure_settings(run_config, (loop.total - done) * config.glm_steps)
            check_config = ConfigRecord(secure_message_config(site_config, settings))
        joined, sites, refused = join(grid, strategy, check_config if secure else site_config, run_config,
                                      loop.timings)
        if secure:
            settings.units = declared_units(sites)
            if len(joined) < settings.sites:
                raise EdfedError(f"only {len(joined)} sites joined, fewer than secagg-sites={settings.sites}: no "
                                 "secure round could hold t sites' noise")
            final_state = run_secure_rounds(loop, grid, joined, state, site_config, settings, config.glm_steps,
                                            float(run_config["round-timeout"]))
        else:
            final_state = loop.run(grid, joined, state, site_config, float(run_config["round-timeout"]))

    model.load_trainable_state(final_state)
    scoring = time.perf_counter()
    summary = build_summary(run_config, meta, folder.path, model, strategy, loop.rounds, evaluation)
    summary["sites"], summary["refused_sites"] = sites, refused
    if evaluation is None and strategy.releasing:
        summary["per_site"] = evaluate_at_sites(grid, strategy.releasing, final_state, site_config,
                                                float(run_config["round-timeout"]), strategy.site_names)
    loop.timings["final_evaluation_seconds"] = time.perf_counter() - scoring
    summary["forged_replies"] = grid.forged
    summary["timings"] = {**loop.timings, "site_data_seconds": site_data_seconds(strategy.reports)}
    summary["wall_seconds"] = time.perf_counter() - started
    write_summary(folder.path, summary)
    return summary


def _flag(value: object) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def site_message_config(run_config: dict, config: TrainConfig, meta: dict, run_dir: Path, done: int) -> ConfigRecord:
    """The settings every message to a site carries: its training settings, the run's identity and fingerprints,
    and, for a simulated site (a deployed site ignores them), its budget and where its files are."""
    total_rounds = int(run_config["num-server-rounds"])
    return ConfigRecord({
        "train-config": json.dumps({k: v for k, v in config.to_dict().items() if k != "extra"}),
        # A resumed run is a new attempt at the sites: a site that trained a round before the coordinator crashed
        # refuses that (run, round) again (its noise would repeat), so each attempt has its own id and plans its
        # noise over the rounds it has left, from what each site's ledger has left.
        "run-id": meta["run-id"] + (f"-resume{meta['resumed']}" if meta.get("resumed") else ""),
        "num-rounds": total_rounds - done if meta.get("resumed") else total_rounds, "round-offset": done,
        "local-epochs": int(run_config["local-epochs"]), "max-grad-norm": float(run_config["max-grad-norm"]),
        "dp-clipping": str(run_config["dp-clipping"]), "site-privacy-unit": str(run_config["privacy-unit"]),
        "encoder-fingerprint": meta["encoder-fingerprint"], "frozen-fingerprint": meta["frozen-fingerprint"],
        "site-epsilon": float(run_config["epsilon"]), "noise-draw": int(run_config["noise-draw"]),
        "site-delta": float(run_config["delta"]), "data-dir": str(run_config["data-dir"]),
        "run-dir": str(run_dir), "ledger-dir": str(run_config["ledger-dir"]), "model": str(config.model),
        # A simulated site's bound on its epsilon from its own noise shares (a deployed site's node config sets it).
        "max-epsilon-without-secagg": float(run_config.get("max-epsilon-without-secagg", math.inf)),
    })


class RoundLoop:
    """The rounds left in a run. After each (round 0: the initial model) the new global model is timed, scored on
    the pooled validation split (simulation only), checkpointed and reported to `on_round`."""

    def __init__(self, folder: RunFolder, strategy: CheckedAggregation, model: OutcomeModel,
                 evaluation: PooledEvaluation | None, done: int, total: int, on_round: OnRound | None) -> None:
        self.folder, self.strategy, self.model, self.evaluation = folder, strategy, model, evaluation
        self.done, self.total, self.on_round = done, total, on_round
        self.rounds: dict[int, dict[str, float]] = {}  # run round -> pooled validation AUROC per outcome
        # Wall seconds per phase; a round is its train messages and aggregation, then the pooled validation.
        self.timings: dict = {"rounds": {}}
        self.round_started = time.perf_counter()

    def run(self, grid: Grid, joined: set[int], state: dict[str, torch.Tensor], site_config: ConfigRecord,
            timeout: float) -> dict[str, torch.Tensor]:
        """Train the rounds left with the joined sites; the last global state (`state` if none aggregated)."""
        self.round_started = time.perf_counter()  # round 0 is timed from here, not from before the join
        result = self.strategy.start(grid=JoinedSites(grid, joined), initial_arrays=ArrayRecord(state),
                                     num_rounds=self.total - self.done, timeout=timeout, train_config=site_config,
                                     evaluate_config=ConfigRecord(dict(site_config)), evaluate_fn=self.after_round)
        final = result.arrays.to_torch_state_dict() if result.arrays is not None else {}
        return final or state  # no round of this attempt aggregated: the last checkpoint stands

    def after_round(self, strategy_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn: called with the global model after each round of this attempt."""
        server_round = strategy_round + self.done
        round_seconds = time.perf_counter() - self.round_started
        round_state = arrays.to_torch_state_dict()
        aurocs: dict[str, float] = {}
        validated = time.perf_counter()
        if self.evaluation is not None:
            self.model.load_trainable_state(round_state)
            validation = self.evaluation.validation(self.model)
            aurocs = self.rounds[server_round] = {o: m["auroc"] for o, m in validation.items()}
            log(INFO, "round %d: pooled validation AUROC %s", server_round, {k: round(v, 3) for k, v in aurocs.items()})
        self.timings["rounds"][str(server_round)] = {"seconds": round_seconds,
                                                     "validation_seconds": time.perf_counter() - validated}
        if strategy_round > 0 or self.done == 0:  # a resume's round 0 is the checkpoint it started from
            self.folder.save_history(self.strategy, self.rounds)  # first: a resume reads history up to its checkpoint
            self.folder.save_round(server_round, self.model, round_state)
        if self.on_round:
            self.on_round(server_round, self.total, aurocs, round_seconds)
        self.round_started = time.perf_counter()
        return MetricRecord({f"{o}-auroc": v for o, v in aurocs.items()}) if aurocs else None


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


def join(grid: Grid, strategy: CheckedAggregation, site_config: ConfigRecord, run_config: dict,
         timings: dict) -> tuple[set[int], dict[str, dict], list[dict]]:
    """The sites that take part (`check_sites`), named in the strategy's reports by the site-name they joined with."""
    joining = time.perf_counter()
    joined, sites, refused = check_sites(grid, site_config, run_config)
    timings["join_seconds"] = time.perf_counter() - joining
    strategy.site_names = {info["node"]: site for site, info in sites.items()}
    strategy.releasing = {info["node"] for info in sites.values() if info.get("releases-metrics")}
    return joined, sites, refused


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
    replies = list(grid.send_and_receive(messages, timeout=float(run_config["round-timeout"])))
    addressed = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}  # ids set when pushed
    for reply in replies:
        node, by_superlink = reply.metadata.src_node_id, reply.metadata.src_node_id == SUPERLINK_NODE_ID
        if by_superlink:  # the SuperLink's own error for a node it found offline: name that node, not node 1
            node = addressed.get(reply.metadata.reply_to_message_id, node)
        if reply.has_error():
            why = ("the SuperLink answered for it: " if by_superlink else "") + reply.error.reason[:500]
            log(WARNING, "node %s does not join this run: %s", node, why)
            refused.append({"node": node, "why": why})
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
        log(INFO, "%s (node %s) joins: declares %d patients, epsilon budget %s", site, node,
            metrics["declared-patients"], metrics["epsilon-budget"])
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
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    addressed = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
    for reply in replies:
        if reply.has_error():
            node = reply.metadata.src_node_id
            if node == SUPERLINK_NODE_ID:  # the SuperLink answers for a node it found offline: name that node
                node = addressed.get(reply.metadata.reply_to_message_id, node)
            log(WARNING, "node %s could not score the final model: %s", node, reply.error.reason[:300])
            continue
        metrics = dict(reply.content["metrics"])
        node = reply.metadata.src_node_id
        per_site[names.get(node, f"node-{node}")] = {
            outcome: {"auroc": float(metrics.get(f"{outcome}-auroc", math.nan)), "n": int(metrics["num-examples"])}
            for outcome in OUTCOMES}
    return dict(sorted(per_site.items()))
