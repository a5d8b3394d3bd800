"""Secure rounds (run config `secure-aggregation`): Flower's SecAgg+ sums the sites' noisy DP-GLM gradients, and
the coordinator sees that sum only (docs/secure-aggregation.md).

Each round of the run's `glm-steps` is one step here: Flower's `SecAggPlusWorkflow` (its four stages, every message
signed through `SignedGrid`) runs with a legacy strategy that only names the joined sites and keeps the sum. Every
site sends its noisy gradient sum over its declared training units, weighted by those units, so the sum SecAgg+
unmasks is sum(gradient sums) / sum(units): one full-batch step of the pooled data, applied here
(`common.train.glm_apply`). A round whose contributors fall below t aborts: the global model stays as it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from edfed.common.data import SPLIT_SHARES
from edfed.common.errors import EdfedError
from edfed.common.model import OutcomeModel
from edfed.common.privacy import central_noise
from edfed.common.train import glm_apply

# A site's gradient sum is at most its units in any coordinate (residuals in [-1, 1], feature coordinates in
# [-1, 1]); its declared units may undercount them, hence the headroom. A value clipped to the range after the
# noise was added is post-processing: it costs accuracy, never privacy.
SIGNAL_HEADROOM = 2.0
NOISE_WIDTHS = 8.0  # standard deviations of a site's noise share the range also holds (a tail of ~1e-15)


@dataclass
class SecureSettings:
    """The public figures of a secure run: t, the sum's noise multiplier, and SecAgg+'s quantisation."""

    sites: int
    noise: float
    total_steps: int
    units: dict[int, int] = field(default_factory=dict)  # node -> declared training units (from its check)

    def clipping_range(self, sensitivity: float) -> float:
        """The range SecAgg+ clips each weighted coordinate to: SecAgg+ quantises gradient sum / max_weight."""
        share = self.noise / math.sqrt(self.sites) * sensitivity
        return (SIGNAL_HEADROOM * max(self.units.values()) + NOISE_WIDTHS * share) / self.max_weight

    @property
    def max_weight(self) -> float:
        return float(sum(self.units.values()))


def secure_settings(run_config: dict, total_steps: int) -> SecureSettings:
    """t (`secagg-sites`, 0 = every joined site) and the noise of the sum: the smallest at which the run's steps cost
    the run's `epsilon` (each site checks it against its own budget and bounds at the check, and every round)."""
    epsilon, delta = float(run_config["epsilon"]), float(run_config["delta"])
    if not math.isfinite(epsilon):
        raise EdfedError("secure-aggregation sums DP updates: set a finite epsilon")
    sites = int(run_config.get("secagg-sites", 0)) or int(run_config["num-sites"])
    if sites < 2:
        raise EdfedError(f"secagg-sites must be at least 2 (SecAgg+ needs two sites to hide one), got {sites}")
    noise = central_noise(epsilon, delta, total_steps)
    if not math.isfinite(noise):
        raise EdfedError(f"no noise multiplier up to the planner's limit fits {total_steps} steps in epsilon {epsilon}")
    return SecureSettings(sites, noise, total_steps)


def declared_units(joined_sites: dict[str, dict]) -> dict[int, int]:
    """Each joined site's declared training units (public, from its check; as client.site.declared_train_units)."""
    return {int(info["node"]): max(1, round(SPLIT_SHARES["train"] * float(info["declared-patients"])))
            for info in joined_sites.values()}


def secure_message_config(site_config: ConfigRecord, settings: SecureSettings) -> dict:
    """The settings every secure message carries: the run's, with t, the sum's noise and the run's step count
    (each secure message is one step; its `server-round` is the step's number in the run)."""
    return {**dict(site_config), "secure-aggregation": True, "secagg-sites": settings.sites,
            "secagg-noise": settings.noise, "num-rounds": settings.total_steps, "round-offset": 0}


class _ReportingWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, unchanged, but for the sites' scalar reports of the collect stage, kept for the
    strategy even when the step then aborts: a site that released its masked vector has spent, and says so."""

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        carry_on = super().collect_masked_vectors_stage(grid, context, state)
        context.strategy.collected = list(state.legacy_results)
        return carry_on


class _SumOnly(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: it names the joined sites and keeps the unmasked sum."""

    def __init__(self, grid: Grid, nodes: list[int], config: dict) -> None:
        self.grid, self.nodes, self.config = grid, nodes, config
        self.aggregate: list[np.ndarray] | None = None
        self.results: list[tuple[GridClientProxy, FitRes]] = []
        self.collected: list[tuple[GridClientProxy, FitRes]] = []  # the sites' reports, also of an aborted step
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = getattr(getattr(self.grid, "run", None), "run_id", 0)
        return [(GridClientProxy(node, self.grid, run_id), FitIns(parameters, dict(self.config)))
                for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # SecAggPlusWorkflow sets every result's parameters to the unmasked weighted mean: there is nothing else.
        self.results, self.failures = results, failures
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_sum(grid: Grid, nodes: list[int], state: dict[str, torch.Tensor], config: dict,
               settings: SecureSettings, sensitivity: float, timeout: float | None
               ) -> tuple[list[np.ndarray] | None, _SumOnly]:
    """One SecAgg+ round over `nodes` at the global `state`: the unmasked sum of the sites' weighted contributions
    (their noisy gradient sums over sum of units, in `state`'s order), or None when the round aborted."""
    names = list(state)
    strategy = _SumOnly(grid, nodes, {**config, "array-names": json.dumps(names)})
    workflow = _ReportingWorkflow(
        num_shares=1.0,  # every site a neighbour of every other: a round with fewer than t contributors aborts
        reconstruction_threshold=settings.sites, max_weight=settings.max_weight,
        clipping_range=settings.clipping_range(sensitivity), timeout=timeout)
    run_id = getattr(getattr(grid, "run", None), "run_id", 0)
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: int(config["server-round"])})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        [state[n].detach().cpu().numpy() for n in names])
    workflow(grid, context)
    return strategy.aggregate, strategy


def secure_step(model: OutcomeModel, aggregate: list[np.ndarray]) -> None:
    """The pooled full-batch step from the unmasked mean gradient (sum of gradient sums / sum of units)."""
    weight, bias = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in aggregate)
    glm_apply(model, weight, bias, 1.0)


def run_secure_rounds(loop, grid: Grid, joined: set[int], state: dict[str, torch.Tensor], site_config: ConfigRecord,
                      settings: SecureSettings, glm_steps: int, timeout: float) -> dict[str, torch.Tensor]:
    """The run's rounds left, `glm_steps` secure steps each; `loop` (server.federation.RoundLoop) validates and
    checkpoints after each round, and its strategy keeps the sites' reports (both of their epsilons)."""
    model, strategy = loop.model, loop.strategy
    model.load_trainable_state(state)
    loop.after_round(0, ArrayRecord(model.trainable_state()))
    nodes = sorted(node for node in grid.get_node_ids() if node in joined)
    for strategy_round in range(1, loop.total - loop.done + 1):
        server_round = strategy_round + loop.done
        reports = strategy.reports.setdefault(server_round, {})
        for k in range(glm_steps):
            step = (server_round - 1) * glm_steps + k + 1
            config = {**secure_message_config(site_config, settings), "server-round": step}
            aggregate, outcome = secure_sum(grid, nodes, model.trainable_state(), config, settings,
                                            model.glm_sensitivity, timeout)
            for proxy, fitres in outcome.collected:
                site = strategy.site_of(proxy.node_id)
                steps = int(reports.get(site, {}).get("steps", 0)) + 1
                reports[site] = {**{k: float(v) for k, v in fitres.metrics.items()}, "steps": steps}
            for failure in outcome.failures:
                strategy.rejected.append({"round": server_round, "step": step, "why": str(failure)[:300]})
            if aggregate is None:
                log(WARNING, "round %d, step %d: the secure round aborted (fewer than t=%d sites' shares, or a "
                    "site refused); the global model stays as it was", server_round, step, settings.sites)
                strategy.rejected.append({"round": server_round, "step": step, "why": "secure round aborted"})
                continue
            secure_step(model, aggregate)
        log(INFO, "round %d: %d secure steps", server_round, glm_steps)
        loop.after_round(strategy_round, ArrayRecord(model.trainable_state()))
    return model.trainable_state()
