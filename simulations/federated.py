"""`edfed simulate`: the six sites as virtual SuperNodes in Flower's simulation engine, on one machine.

The ServerApp and ClientApp are the deployed ones; only the transport differs. After the
federation, each site's local-only model (client.local_models) can be trained as a baseline
(`--local-baselines`), and each site's deployed model chosen at home (`--personalize`, client.local_models).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edfed.client.local_models import deployed_models, local_only_models
from edfed.common.config import run_config_from_args
from edfed.common.contract import OUTCOMES
from edfed.common.data import load_cohort, site_files
from edfed.common.display import Phases, make_console, progress_bar
from edfed.common.errors import EdfedError
from edfed.common.evaluation import POOLED_PREDICTIONS, plot_with_references, print_peers, write_summary
from edfed.common.peers import federation_peers


class _NotRunSimulationDeprecation(logging.Filter):
    """Flower 1.42 deprecates `run_simulation` for `flwr run`, which needs the app as a project folder and a
    SuperLink process of its own; an installed edfed has neither. `run_simulation` runs the same ServerApp and
    ClientApp in Flower's simulation engine in this process (flwr is pinned, see pyproject)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def simulate(run_config: dict, n_sites: int, quiet: bool = False, verbose: bool = False) -> dict:
    """Run one federation through Flower's simulation engine and return its summary."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from edfed.client.client_app import app as client_app
    from edfed.server.federation import run_federation

    outcome: dict = {}
    server_app = ServerApp()
    progress = progress_bar(not quiet)
    task = progress.add_task("federated rounds", total=int(run_config["num-server-rounds"]), status="")

    started, round_seconds = time.perf_counter(), {}

    def on_round(server_round: int, total: int, aurocs: dict, seconds: float) -> None:
        status = " ".join(f"{o.split('_')[0]} {v:.3f}" for o, v in aurocs.items())
        progress.update(task, completed=server_round, total=total, status=f"val AUROC {status}" if status else "")
        round_seconds[server_round] = seconds
        # A line per round too, so a log file (CI, nohup) shows progress where the bar cannot.
        progress.console.print(f"round {server_round}/{total}: {seconds:.0f} s" + (f", val AUROC {status}"
                                                                                  if status else "")
                               + _time_left(round_seconds, server_round, total, time.perf_counter() - started))

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        _follow_first_round(grid, progress.console)
        try:
            outcome["summary"] = run_federation(grid, {**run_config, "num-sites": n_sites}, pooled=True,
                                                on_round=on_round)
        except Exception as exc:  # re-raised below, outside Flower's thread
            outcome["error"] = exc

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here: opt in to Ray's future default
    # Ray starts its workers 15 nice levels below the driver: any other load on the machine (the coordinator's
    # own pooled evaluation, another service) then starves the six sites' training. They are the job here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Flower logs every record at INFO; keep its warnings (failed or rejected sites) and our progress bar.
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("flwr").addFilter(_NotRunSimulationDeprecation())
    # One CPU per virtual site: on 2 cores, two sites train at a time, each on one thread.
    with progress:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False,
                                                     "logging_level": "error", "log_to_driver": verbose}},
                       verbose_logging=verbose)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise EdfedError("the simulation ended without a result; see the log above")
    return outcome["summary"]


def _time_left(round_seconds: dict[int, float], done: int, total: int, elapsed: float) -> str:
    """", 3 min elapsed, about 5 min left for the rounds": from the later rounds' mean once there is one; after round
    1 at its pace, an upper bound (it also cached every visit's frozen layers, which later rounds reuse)."""
    later = [s for r, s in round_seconds.items() if r >= 2]
    if done < 1 or done >= total:
        return f", {elapsed / 60:.1f} min elapsed" if done >= 1 else ""
    pace = sum(later) / len(later) if later else round_seconds.get(1, 0.0)
    left = pace * (total - done)
    return (f", {elapsed / 60:.1f} min elapsed, {'at most' if not later else 'about'} {left / 60:.1f} min left for "
            f"rounds {done + 1}-{total}")


def _follow_first_round(grid, console: Console) -> None:
    """A line per site as its round-1 update arrives, with the time since the round began: a log file shows the
    first round's progress (the longest: each site caches its visits' frozen layers), not minutes of silence.
    Flower's in-memory grid collects replies with `pull_messages`: this wraps that method on this grid alone."""
    pull, names, state = grid.pull_messages, {}, {"round": 0, "started": 0.0, "seen": set()}

    def pull_messages(message_ids):
        replies = list(pull(message_ids))
        for reply in replies:
            kind, node = reply.metadata.message_type, reply.metadata.src_node_id
            if kind == "query.check" and not reply.has_error() and "site" in reply.content:
                names[node] = str(dict(reply.content["site"]).get("site-name", node))
            elif kind == "train" and state["round"] == 1 and node not in state["seen"]:
                state["seen"].add(node)
                console.print(f"round 1: {names.get(node, f'node {node}')} sent its update "
                              f"({len(state['seen'])}/{len(names) or '?'} sites), "
                              f"{time.perf_counter() - state['started']:.0f} s into the round")
        return replies

    def push_messages(messages):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):  # a round's instructions: 1, then 2, ...
            state["round"] += 1
            state["started"] = state["started"] or time.perf_counter()
        return push(messages)

    push = grid.push_messages
    grid.pull_messages, grid.push_messages = pull_messages, push_messages


def next_steps(run_dir: Path, summary: dict) -> list[str]:
    """What to run next, printed at the end of `edfed simulate`: the report, and a site's deployed model."""
    steps = [f"figures: {run_dir / 'roc.png'}, {run_dir / 'calibration.png'}",
             f"next: edfed report {run_dir}   (report.md with every table and figure, and each site's)"]
    if not summary.get("deployment"):
        steps.append(f"      edfed personalize {run_dir} --data SITE_FILE   (a site chooses the model it deploys)")
    steps.append(f"      edfed predict {run_dir} --data SITE_FILE --out predictions.csv   (the global model's risks)")
    return steps


def run_simulate(args: argparse.Namespace) -> dict:
    console = make_console()
    started = time.perf_counter()
    phases = Phases(console)
    if args.resume:
        meta = json.loads((args.resume / "run.json").read_text()) if (args.resume / "run.json").exists() else None
        if meta is None:
            raise EdfedError(f"--resume {args.resume}: no run.json there, nothing to resume")
        run_config = {**meta["config"], "resume": True, "run-dir": str(args.resume.resolve())}
        data_dir = Path(str(run_config["data-dir"]))
    else:
        from edfed.simulations.cohort import ensure_cohort

        data_dir = args.data
        if not data_dir.is_dir():  # the default cohort generated, or a site list's tables checked
            with phases("cohort" if not data_dir.exists() else "site list"):
                data_dir = ensure_cohort(data_dir, seed=args.seed or 0)
        run_config = run_config_from_args(args)
        out = args.out or Path("runs") / f"federated-{datetime.now():%Y%m%d-%H%M%S}"
        run_config.update({"data-dir": str(data_dir.resolve()), "run-dir": str(out.resolve())})
    with phases("contract check"):
        load_cohort(data_dir, int(run_config["seed"]))  # every site passes the contract before anything runs
    n_sites = len(site_files(data_dir))
    epsilon = float(run_config["epsilon"])
    console.print(f"simulating {n_sites} sites, {run_config['num-server-rounds']} rounds of "
                  f"{run_config['strategy']}, per-site epsilon {'off' if math.isinf(epsilon) else epsilon}"
                  + (", secure aggregation (SecAgg+)" if run_config.get("secure-aggregation") else ""))
    with phases("federation"):
        summary = simulate(run_config, n_sites, verbose=getattr(args, "verbose", False))
    run_dir = Path(str(run_config["run-dir"]))
    with phases("regression peers"):  # the regressions a statistician fits first, on the same rows
        curves: dict = {}
        summary["peers"] = federation_peers(data_dir, int(run_config["seed"]), console=console, curves=curves)
        if (run_dir / POOLED_PREDICTIONS).exists():  # the ROC figure with the peers' curves on the same rows
            plot_with_references(run_dir, summary["final"], data_dir, "federated model and its regression peers, "
                                 "held-out test (pooled)", curves)
    if getattr(args, "local_baselines", False):
        with phases("local baselines"):
            summary["local_only"] = local_only_models(run_config, data_dir, run_dir / "local-only")
    if getattr(args, "personalize", False):
        with phases("deployed models"):
            summary["deployment"] = deployed_models(run_config, data_dir, run_dir)
    summary["timings"] = {**phases.seconds, **summary.get("timings", {})}
    summary["wall_seconds_total"] = time.perf_counter() - started
    summary["federation_overhead"] = summary["wall_seconds"] / max(summary["client_train_seconds"], 1e-9)
    write_summary(run_dir, summary)
    print_federated(summary, console)
    console.print(f"wrote {run_dir / 'summary.json'} ({summary['wall_seconds_total']:.0f} s)")
    for line in next_steps(run_dir, summary):
        console.print(line)
    return summary


def print_federated(summary: dict, console: Console) -> None:
    table = Table(title="federated model, held-out test (pooled)")
    for col in ("outcome", "AUROC", "oracle AUROC", "AUPRC", "Brier", "ECE"):
        table.add_column(col)
    for outcome in OUTCOMES:
        m = summary["final"].get(outcome)
        if m:
            table.add_row(outcome, f"{m['auroc']:.3f}", f"{m.get('oracle_auroc', float('nan')):.3f}",
                          f"{m['auprc']:.3f}", f"{m['brier']:.3f}", f"{m['ece']:.3f}")
    console.print(table)
    if summary.get("peers"):
        print_peers(summary["final"], summary["peers"], console, "federated model", summary.get("per_site"))
    privacy = Table(title="per-site privacy (at each site's privacy unit)")
    for col in ("site", "epsilon spent", "budget", "delta", "noise", "sample rate", "steps", "accountant",
                "refused rounds"):
        privacy.add_column(col)
    secure = any("secagg_sites" in p for p in summary["privacy"].values())
    if secure:  # the sum's noise held t sites' shares; what each site's own shares alone would give
        privacy.add_column("t")
        privacy.add_column("epsilon without secagg")
    for site, p in summary["privacy"].items():
        privacy.add_row(site, f"{p['epsilon']:.3f}", f"{p['budget']}", f"{p['delta']:g}",
                        f"{p['noise_multiplier']:.3f}", f"{(p['sample_rate'] or 0):.4f}", str(p["steps"]),
                        str(p.get("accountant", "")), str(p["refused_rounds"]),
                        *([str(p.get("secagg_sites", "")), f"{p.get('epsilon_without_secagg', math.nan):.3f}"]
                          if secure else []))
    console.print(privacy)
    deployment = summary.get("deployment")
    if deployment:
        gains = Table(title="each site's deployed model against what it can build alone "
                            "(mean over sites of the AUROC gain on its own test visits, paired 95% interval)")
        for col in ("outcome", "deployed - local-only", "deployed - own stacked regression"):
            gains.add_column(col)
        for outcome in OUTCOMES:
            cells = [deployment[key].get(outcome) for key in ("gain_over_local_only", "gain_over_own_regression")]
            gains.add_row(outcome, *(f"{g['mean_gain']:+.3f} ({g['mean_gain_ci'][0]:+.3f}, {g['mean_gain_ci'][1]:+.3f})"
                                     if g else "" for g in cells))
        console.print(gains)
    comm = summary["communication"]
    console.print(f"sent per site per round: {comm['bytes_sent_per_client_round']:,} bytes "
                  f"({100 * comm['share_of_full_model']:.2f}% of the full model's {comm['full_model_bytes']:,})")
