"""The coordinator's strategy: Flower's FedAvg, FedProx or FedAdam, aggregating only updates that pass its checks."""

from __future__ import annotations

from logging import WARNING

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from edfed.common.errors import EdfedError
from edfed.common.exchange import REFUSED_BUDGET, REFUSED_REPEAT, state_bytes, update_problem

REFUSALS = {REFUSED_BUDGET: "refused the round: privacy budget",
            REFUSED_REPEAT: "refused the round: it had already trained this round"}


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


class CheckedFedAvg(CheckedAggregation, FedAvg):
    pass


class CheckedFedProx(CheckedAggregation, FedProx):
    pass


class CheckedFedAdam(CheckedAggregation, FedAdam):
    pass


def make_strategy(run_config: dict, expected: dict[str, tuple[int, ...]], round_offset: int = 0) -> CheckedAggregation:
    """Every connected site trains each round; a round waits for no more than `min-sites` of them, so a
    site that died does not stall the run (its unanswered message ends with `round-timeout`).
    `round_offset`: the rounds a resumed run had done, so its reports carry the run's round numbers."""
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
    strategy.setup_checks(expected, min_sites)
    strategy.round_offset = round_offset
    return strategy
