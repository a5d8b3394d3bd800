"""A federation's summary.json: what the sites reported, what each spent of its budget, what was sent, and
(in simulation) the final global model's pooled test metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edfed.common.config import train_config_from
from edfed.common.evaluation import PooledEvaluation
from edfed.common.model import OutcomeModel
from edfed.common.precision import machine_facts
from edfed.server.strategy import CheckedAggregation


def build_summary(run_config: dict, meta: dict, run_dir: Path, model: OutcomeModel, strategy: CheckedAggregation,
                  rounds: dict[int, dict], evaluation: PooledEvaluation | None) -> dict:
    """The summary of the run in `model`'s final state; `evaluation` (simulation) scores it on the pooled test."""
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
                         # The site's ledger composes full-batch steps exactly (one Gaussian mechanism), and
                         # subsampled ones by PLD (common.privacy.epsilon_of).
                         "accountant": ("exact Gaussian" if m.get("sample-rate") == 1.0 else "PLD")
                         if "noise-multiplier" in m else "none",
                         "budget": m.get("epsilon-budget", math.inf),
                         # Secure aggregation: t, and the epsilon from the site's own noise shares alone.
                         **({"secagg_sites": int(m["secagg-sites"]),
                             "epsilon_without_secagg": m["epsilon-without-secagg"],
                             "max_epsilon_without_secagg": m.get("max-epsilon-without-secagg", math.inf)}
                            if "secagg-sites" in m else {}),
                         "refused_rounds": int(sum(
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
        "num_rounds": int(run_config["num-server-rounds"]),
        # Each site's frozen-pass float format, from its own round metrics (each machine picks its own).
        "precision": {site: "bf16" if m["bf16"] else "fp32" for site, m in sorted(last_report.items()) if "bf16" in m},
        "coordinator": {**machine_facts(), "precision": model.precision},
    }
    if evaluation is not None:
        title = f"federated ({run_config['strategy']}, epsilon {run_config['epsilon']})"
        summary["final"], summary["per_site"] = evaluation.test(model, run_dir, title)
    return summary


def site_data_seconds(reports: dict[int, dict[str, dict]]) -> dict[str, float]:
    """Each site's first round in this run read, checked, tokenized and cached its data: its time for that, from
    its own report where its release policy shares timing (simulated sites do)."""
    first = {site: m["data-seconds"] for r in sorted(reports, reverse=True)
             for site, m in reports[r].items() if "data-seconds" in m}
    return dict(sorted(first.items()))
