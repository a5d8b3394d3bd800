"""`edfed simulate`: the six sites as virtual SuperNodes in Flower's simulation engine, on one machine.

The ServerApp and ClientApp are the deployed ones; only the transport differs. After the
federation, each site's local-only model (same code, its own data alone) is trained as a baseline, and
the global model can be fine-tuned at each site (`--personalize`).
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

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from common.config import RUN_DEFAULTS, TrainConfig, run_config_from_args, train_config_from
from common.contract import OUTCOMES
from common.data import load_cohort, load_site_splits, site_files
from common.display import Phases, make_console, progress_bar
from common.errors import EdfedError
from common.evaluation import evaluate_on_test, print_peers, write_summary
from common.features import load_tokenizer
from common.peers import federation_peers


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

    from client.client_app import app as client_app
    from server.federation import run_federation

    outcome: dict = {}
    server_app = ServerApp()
    progress = progress_bar(not quiet)
    task = progress.add_task("federated rounds", total=int(run_config["num-server-rounds"]), status="")

    def on_round(server_round: int, total: int, aurocs: dict, seconds: float) -> None:
        status = " ".join(f"{o.split('_')[0]} {v:.3f}" for o, v in aurocs.items())
        progress.update(task, completed=server_round, total=total, status=f"val AUROC {status}" if status else "")
        # A line per round too, so a log file (CI, nohup) shows progress where the bar cannot.
        progress.console.print(f"round {server_round}/{total}: {seconds:.0f} s" + (f", val AUROC {status}"
                                                                                  if status else ""))

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
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


def local_only_baselines(run_config: dict, data_dir: Path, out_dir: Path) -> dict:
    """Each site's model trained on its own data alone (same code and epochs), on its own test split."""
    # Trained without DP, so `compact: auto` resolves as for a run without DP.
    config = train_config_from({**run_config, "epsilon": math.inf})
    return _fit_at_each_site(config, run_config, load_cohort(data_dir, config.seed), data_dir, out_dir / "local-only",
                             "local-only")


def personalized_models(run_config: dict, data_dir: Path, run_dir: Path) -> dict:
    """The final global model fine-tuned at each site on its own data, scored on that site's test split."""
    config, start = personalization_start(run_config, run_dir)
    return _fit_at_each_site(config, run_config, load_cohort(data_dir, config.seed), data_dir,
                             run_dir / "personalized", "personalized", initial_state=start)


def personalization_start(run_config: dict, run_dir: Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The whole model to fine-tune at a site, and its start: the run's last global model.

    No DP: the fine-tuned model never leaves the site, and neither does anything computed from it. So the whole
    model trains, even where the federation kept parts frozen for DP (`compact`): those parts are the seeded
    init, which the full model shares; as a training site does, this checks the encoder and those seeded
    matrices against the ones the run recorded. Validation then picks among the epochs and the untouched global
    model, so a site keeps the federation's model when its own data cannot improve it.
    """
    from safetensors.torch import load_file

    from client.site import build_model, check_encoder
    from common.exchange import frozen_init_fingerprint

    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"), key=lambda p: int(p.stem[6:]))
    if not checkpoints:
        raise EdfedError(f"{run_dir}: no global model checkpoint (checkpoints/round-K.safetensors) to personalize")
    recorded = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    global_config = train_config_from(run_config)
    check_encoder(global_config, recorded.get("encoder-fingerprint", ""))
    if recorded.get("frozen-fingerprint", "") not in ("", frozen_init_fingerprint(build_model(global_config, None))):
        raise EdfedError(f"{run_dir}: the run's seeded frozen matrices differ from the ones built here "
                         "(another torch version?); refusing to fine-tune its global model")
    config = train_config_from({**run_config, "compact": False})
    return config, {**build_model(config, None).trainable_state(), **load_file(checkpoints[-1])}


def run_personalize(args: argparse.Namespace) -> dict:
    """`edfed personalize RUN_DIR --data SITE_FILE`: a deployed site fine-tunes a finished run's global model.

    RUN_DIR is a copy of the coordinator's run folder (run.json and checkpoints/: settings and arrays, no
    patient data). Everything written goes to --out, at the site.
    """
    if not (args.run_dir / "run.json").exists():
        raise EdfedError(f"{args.run_dir}: no run.json; pass a copy of the coordinator's run folder "
                         "(run.json and checkpoints/)")
    run_config = {**RUN_DEFAULTS, **json.loads((args.run_dir / "run.json").read_text())["config"],
                  "model": str(args.model or "")}  # the coordinator's encoder path means nothing here
    name = args.site_name or args.data.stem
    config, start = personalization_start(run_config, args.run_dir)
    rows = load_site_splits(name, args.data, config.seed, args.mapping).table
    out = args.out or Path("runs") / f"personalized-{name}-{datetime.now():%Y%m%d-%H%M%S}"
    final = _fit_at_each_site(config, run_config, rows, args.data.parent, out, "personalized", start)[name]
    summary = {"kind": "personalized", "config": {**run_config, "train": config.to_dict(),
                                                  "global-run": str(args.run_dir.resolve())},
               "final": final, "per_site": {name: final}}
    write_summary(out, summary)
    make_console().print(f"wrote {out / 'summary.json'}; the fine-tuned model is {out / name / 'model.safetensors'}")
    return summary


def _fit_at_each_site(config: TrainConfig, run_config: dict, cohort: pd.DataFrame, data_dir: Path, out_dir: Path,
                      label: str, initial_state: dict | None = None) -> dict:
    """Train `config` at every site of `cohort` on its own rows; OUT_DIR/<site>/ gets model, plots, predictions."""
    from simulations.central import fit_central, save_trainable_state

    # As many epochs over its data as the site gave the federation.
    run_config = {**RUN_DEFAULTS, **run_config}
    config = config.replace(epochs=int(run_config["num-server-rounds"]) * int(run_config["local-epochs"]))
    tokenizer = load_tokenizer(config)
    results = {}
    sites = cohort.groupby("site", sort=False)
    with progress_bar() as progress:
        task = progress.add_task(f"{label} models", total=len(sites), status="")
        for site, rows in sites:
            progress.update(task, status=site)
            model, _ = fit_central(config, rows[rows["split"] == "train"], rows[rows["split"] == "val"],
                                   tokenizer, show_progress=False, initial_state=initial_state)
            site_dir = out_dir / site
            final, _ = evaluate_on_test(model, rows[rows["split"] == "test"], tokenizer, data_dir, site_dir,
                                        f"{label}, {site}", site_dir / "predictions.parquet")
            save_trainable_state(model, site_dir / "model.safetensors")
            results[site] = final
            progress.advance(task)
    return results


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
        data_dir = args.data
        if not data_dir.exists():
            from simulations.cohort import generate_cohort

            console.print(f"{data_dir} does not exist: generating the default simulated cohort there")
            with phases("cohort"):
                generate_cohort(data_dir, seed=args.seed or 0)
        run_config = run_config_from_args(args)
        out = args.out or Path("runs") / f"federated-{datetime.now():%Y%m%d-%H%M%S}"
        run_config.update({"data-dir": str(data_dir.resolve()), "run-dir": str(out.resolve())})
    with phases("contract check"):
        load_cohort(data_dir, int(run_config["seed"]))  # every site passes the contract before anything runs
    n_sites = len(site_files(data_dir))
    epsilon = float(run_config["epsilon"])
    console.print(f"simulating {n_sites} sites, {run_config['num-server-rounds']} rounds of "
                  f"{run_config['strategy']}, per-site epsilon {'off' if math.isinf(epsilon) else epsilon}")
    with phases("federation"):
        summary = simulate(run_config, n_sites, verbose=getattr(args, "verbose", False))
    run_dir = Path(str(run_config["run-dir"]))
    with phases("regression peers"):  # the regressions a statistician fits first, on the same rows
        summary["peers"] = federation_peers(data_dir, int(run_config["seed"]), console=console)
    if getattr(args, "local_baselines", False):
        with phases("local baselines"):
            summary["local_only"] = local_only_baselines(run_config, data_dir, run_dir)
    if getattr(args, "personalize", False):
        with phases("personalization"):
            summary["personalized"] = personalized_models(run_config, data_dir, run_dir)
    summary["timings"] = {**phases.seconds, **summary.get("timings", {})}
    summary["wall_seconds_total"] = time.perf_counter() - started
    summary["federation_overhead"] = summary["wall_seconds"] / max(summary["client_train_seconds"], 1e-9)
    write_summary(run_dir, summary)
    print_federated(summary, console)
    console.print(f"wrote {run_dir / 'summary.json'} ({summary['wall_seconds_total']:.0f} s)")
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
    privacy = Table(title="per-site privacy (example-level, RDP accountant)")
    for col in ("site", "epsilon spent", "budget", "delta", "noise", "sample rate", "steps", "refused rounds"):
        privacy.add_column(col)
    for site, p in summary["privacy"].items():
        privacy.add_row(site, f"{p['epsilon']:.3f}", f"{p['budget']}", f"{p['delta']:g}",
                        f"{p['noise_multiplier']:.3f}", f"{(p['sample_rate'] or 0):.4f}", str(p["steps"]),
                        str(p["refused_rounds"]))
    console.print(privacy)
    comm = summary["communication"]
    console.print(f"sent per site per round: {comm['bytes_sent_per_client_round']:,} bytes "
                  f"({100 * comm['share_of_full_model']:.2f}% of the full model's {comm['full_model_bytes']:,})")
