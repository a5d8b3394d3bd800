"""The `edfed` command: argument parsing and clean error reporting, nothing else.

Each subcommand hands its arguments to a plain function elsewhere; any `EdfedError` becomes a
one-paragraph message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from edfed.common.config import DEFAULT_DATA_DIR
from edfed.common.config import RUN_DEFAULTS as D  # every default has one home: pyproject.toml
from edfed.common.errors import EdfedError

DESCRIPTION = ("edfed trains one model for several hospital emergency departments without their patient data "
               "leaving any of them: each site trains at home on its own ED visits (vital signs, labs and "
               "clinical notes) and shares only a differentially private update. It predicts 30-day mortality, "
               "safe discharge and 30-day readmission.")
EPILOG = ("Try it: `edfed simulate` (a simulated six-site federation). Your own table: `edfed data check FILE "
          "--mapping MAP` (docs/data-contract.md). Every command: `edfed COMMAND --help`.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edfed")
    except PackageNotFoundError:  # run from a source folder that was never installed
        return "unknown (not installed)"


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default unless its help already says it (a None default means "decided later",
    and the help text says by what)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default is not None
                and not isinstance(action.default, bool) and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser shows defaults the same way."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


# Flag values are checked as they are parsed: before any cohort is generated or any file written.
def _number(text: str, kind: type = float, low: float = 0.0, inclusive: bool = False, inf: bool = False,
            what: str = "positive") -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {'whole ' if kind is int else ''}number: {text!r}") from None
    if value != value or (math.isinf(value) and not inf) or value < low or (value == low and not inclusive):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _float_or_inf(text: str) -> float:
    return _number(text, inf=True, what="positive (or inf)")


def _positive_int(text: str) -> int:
    return int(_number(text, int))


def _positive_float(text: str) -> float:
    return _number(text)


def _non_negative_int(text: str) -> int:
    return int(_number(text, int, inclusive=True, what="0 or more"))


def _non_negative_float(text: str) -> float:
    return _number(text, inclusive=True, what="0 or more")


def _delta(text: str) -> float:
    value = _number(text, what="between 0 and 1")
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR,
                   help="folder with site-K.parquet|csv files, or a site list (sites.toml: each site's file and "
                        "mapping, docs/data-contract.md); a folder that does not exist is an error, except this "
                        "default, where the simulated cohort is generated (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<kind>-<time>)")
    p.add_argument("--model", type=Path, default=None,
                   help="local Hugging Face encoder directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--modality", choices=["multimodal", "text", "structured"], default=None,
                   help=f"what the model reads: notes and structured data, or one of them (default {D['modality']})")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help=f"note token budget per visit (default {D['max-tokens']})")
    p.add_argument("--lora-layers", type=_non_negative_int, default=None,
                   help=f"LoRA in the top N encoder layers (0 = every layer; default {D['lora-layers']})")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"learning rate (default {D['central-lr']:g} central, {D['lr']:g} federated)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help=f"batch size (default {D['batch-size']})")
    p.add_argument("--seed", type=int, default=None, help=f"split and initialisation seed (default {D['seed']})")
    _add_precision_flag(p)


def _add_precision_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="float format of the frozen encoder layers on this machine (default auto: bf16 only where "
                        "the CPU has native bf16 instructions; also $EDFED_PRECISION)")


def _add_federation_flags(p: argparse.ArgumentParser) -> None:
    """Flags every simulated federation takes (`simulate`, and each point of `privacy-sweep`)."""
    p.add_argument("--rounds", dest="num_server_rounds", type=_positive_int, default=None,
                   help=f"federated rounds (default {D['num-server-rounds']})")
    p.add_argument("--local-epochs", type=_positive_int, default=None,
                   help=f"epochs per site per round (default {D['local-epochs']})")
    p.add_argument("--delta", type=_delta, default=None, help=f"per-site delta (default {D['delta']:g})")
    p.add_argument("--dp-lr", type=_positive_float, default=None,
                   help=f"learning rate of a site that trains with DP (default {D['dp-lr']:g})")
    p.add_argument("--dp-clipping", choices=["per-layer", "flat"], default=None,
                   help="DP-SGD clipping: per trainable tensor, same total norm (default), or of the whole gradient")
    p.add_argument("--privacy-unit", choices=["patient", "visit"], default=None,
                   help="what epsilon protects at each simulated site: a patient with all its visits (default) or one "
                        "visit (a patient with k visits then gets about k * epsilon)")
    p.add_argument("--strategy", choices=["fedavg", "fedprox", "fedadam"], default=None,
                   help=f"how the coordinator combines the sites' updates (default {D['strategy']})")
    p.add_argument("--proximal-mu", type=_non_negative_float, default=None,
                   help=f"FedProx proximal weight (default {D['proximal-mu']:g})")
    p.add_argument("--noise-draw", type=int, default=None,
                   help="simulated sites' DP noise: another value gives each site other noise (default 0)")
    p.add_argument("--architecture", choices=["auto", "full", "compact", "glm"], default=None,
                   help=f"what trains (default {D['architecture']}: the DP-GLM with DP, the full model without; "
                        "compact: the LoRA model under DP-SGD)")
    p.add_argument("--glm-steps", type=_positive_int, default=None,
                   help=f"the GLM's full-batch steps per site and round (default {D['glm-steps']})")
    p.add_argument("--glm-lr", type=_positive_float, default=None,
                   help=f"the GLM's step size (default {D['glm-lr']:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edfed", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"edfed {_version()}",
                        help="print the installed edfed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cohort = sub.add_parser("cohort", help="simulated cohort").add_subparsers(dest="action", required=True)
    gen = cohort.add_parser("generate", help="write the simulated six-ED cohort")
    gen.add_argument("--out", type=Path, required=True, help="folder to write site-K.parquet, cohort.json, oracle/")
    gen.add_argument("--sites", type=int, default=6, help="number of emergency departments")
    gen.add_argument("--visits-per-site", type=int, default=None,
                     help="visits at every site (default: realistic, unequal site sizes)")
    gen.add_argument("--seed", type=int, default=0, help="generator seed: the same seed writes the same cohort")
    gen.add_argument("--harder", action="store_true",
                     help="add calendar waves of COVID-19 mortality, copied-forward text and typos in the notes, and a "
                          "site that writes Swedish (docs/cohort.md, 'Harder cohort')")

    data = sub.add_parser("data", help="site data").add_subparsers(dest="action", required=True)
    check = data.add_parser("check", help="validate a site file against the data contract")
    check.add_argument("file", type=Path, help="the site's table: .parquet, .pq or .csv")
    check.add_argument("--mapping", type=Path, default=None,
                       help="the site's mapping file (.toml, .json or .csv): column names, value recodings, date "
                            "format, encoding (docs/data-contract.md; default: none, the contract's names)")
    check.add_argument("--encoding", default=None,
                       help="the CSV's text encoding, e.g. utf-8, cp1252, utf-16 (default: detected; a file that "
                            "does not decode is refused)")

    ledger_help = ("a deployed site's privacy ledger: every DP round it trained, and so its spent budget; a site "
                   "refuses to train without one, and never starts a fresh one by itself")
    ledger = sub.add_parser("ledger", help=ledger_help, description=ledger_help).add_subparsers(dest="action",
                                                                                               required=True)
    linit = ledger.add_parser("init", help="create an empty ledger (a new budget: once per site, on purpose)")
    linit.add_argument("path", type=Path, help="the ledger file the site's node config names as ledger-path")
    lshow = ledger.add_parser("show", help="what a ledger has recorded and the epsilon spent")
    lshow.add_argument("path", type=Path, help="the ledger file")
    lshow.add_argument("--delta", type=_delta, default=D["delta"], help="the site's delta (default %(default)g)")

    train = sub.add_parser("train", help="training").add_subparsers(dest="action", required=True)
    central = train.add_parser("central", help="pooled (non-federated) training: the baseline")
    _add_training_flags(central)
    central.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {D['central-epochs']})")

    sim = sub.add_parser("simulate", help="a simulated federation of the sites in --data (Flower simulation)")
    _add_training_flags(sim)
    _add_federation_flags(sim)
    sim.add_argument("--epsilon", type=_float_or_inf, default=None,
                     help=f"per-site privacy budget (default {D['epsilon']:g}; inf turns DP off)")
    sim.add_argument("--ledger-dir", type=Path, default=None,
                     help="keep the sites' privacy ledgers here (default: inside the run folder)")
    sim.add_argument("--secure-aggregation", action="store_true", default=None,
                     help="sum the sites' DP-GLM gradients with Flower's SecAgg+: the coordinator sees only the sum, "
                          "and each site adds 1/sqrt(t) of the noise (docs/secure-aggregation.md)")
    sim.add_argument("--secagg-sites", type=_positive_int, default=None,
                     help="t: the sites whose noise shares every secure sum must hold (default: every site)")
    sim.add_argument("--max-epsilon-without-secagg", type=_float_or_inf, default=None,
                     help="each simulated site's bound on its epsilon from its own noise shares alone (default inf)")
    sim.add_argument("--local-baselines", action="store_true",
                     help="also train each site's local-only model as a baseline")
    sim.add_argument("--personalize", action="store_true",
                     help="also build each site's deployed model at the site (the global model stacked with the "
                          "site's regressions, blended with its local-only model; no DP: it stays there) and score "
                          "it against what the site builds alone")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's full logs")
    sim.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint (default: a new run)")
    pers_help = ("a site builds the model it deploys from a finished run's global model: stacked with the site's "
                 "own regressions and blended with its local-only model, recalibrated on its validation split (no "
                 "DP: all of it stays at the site); it is scored on the site's test split against what the site "
                 "builds alone, and saved as a model folder for edfed predict")
    pers = sub.add_parser("personalize", help=pers_help, description=pers_help)
    pers.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                      help="a copy of the coordinator's run folder: run.json and checkpoints/ (no patient data)")
    pers.add_argument("--data", type=Path, required=True, help="this site's table (docs/data-contract.md)")
    pers.add_argument("--mapping", type=Path, default=None,
                      help="the site's mapping file (docs/data-contract.md; default: none, the contract's names)")
    pers.add_argument("--model", type=Path, default=None,
                      help="this site's copy of the run's encoder (default: the packaged all-MiniLM-L6-v2)")
    pers.add_argument("--encoding", default=None,
                      help="the CSV's text encoding (default: detected; a file that would lose text is refused)")
    pers.add_argument("--site-name", default=None, help="the site's name in outputs (default: the file's stem)")
    pers.add_argument("--out", type=Path, default=None, help="output folder (default: runs/personalized-<site>-<time>)")
    _add_precision_flag(pers)
    pred_help = ("each visit's three risks (30-day mortality, safe discharge, 30-day readmission) from the model a "
                 "site deployed, or a run's global model; the same numbers as edfed.load_model(...).predict_proba")
    pred = sub.add_parser("predict", help=pred_help, description=pred_help)
    pred.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                      help="a deployed model's folder (config.json, model.safetensors) or a run folder (run.json, "
                           "checkpoints/)")
    pred.add_argument("--data", type=Path, required=True,
                      help="the visits to score: a site table (docs/data-contract.md; outcome columns not needed)")
    pred.add_argument("--mapping", type=Path, default=None,
                      help="the site's mapping file (docs/data-contract.md; default: none, the contract's names)")
    pred.add_argument("--encoding", default=None, help="the CSV's text encoding (default: detected)")
    pred.add_argument("--model", type=Path, default=None,
                      help="this site's copy of the run's encoder (default: the packaged all-MiniLM-L6-v2)")
    pred.add_argument("--out", type=Path, required=True,
                      help="the CSV to write: visit_id and one risk column per outcome (owner-only)")
    pred.add_argument("--device", default=None,
                      help="auto, cpu or cuda: where the model runs (default: pyproject's device setting; auto: a "
                           "CUDA GPU where torch sees one)")
    track_help = "log a finished run (settings, per-round and final metrics, privacy spent, figures) to MLflow"
    track = sub.add_parser("track", help=track_help, description=track_help + " (pip install 'edfed[mlflow]')")
    track.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run's folder (with summary.json)")
    track.add_argument("--uri", default="file:./mlruns",
                       help="MLflow tracking URI (default: a local file store in ./mlruns; `mlflow ui` reads it)")
    track.add_argument("--experiment", default="edfed", help="MLflow experiment name (default: edfed)")
    sweep_help = ("one simulated federation per privacy budget and seed, each audited with a membership-inference "
                  "attack: results.csv/.md, privacy_utility.png")
    sweep = sub.add_parser("privacy-sweep", help=sweep_help, description=sweep_help)
    _add_training_flags(sweep)
    _add_federation_flags(sweep)
    sweep.add_argument("--epsilons", default="0.5,1,2,4,8,inf",
                       help="per-site budgets, comma-separated; inf turns DP off (default 0.5,1,2,4,8,inf)")
    sweep.add_argument("--seeds", type=int, default=3,
                       help="runs per budget, with seeds --seed, --seed+1, ... (default 3)")
    sweep.add_argument("--audit-site", default="site-1",
                       help="the site whose train vs test visits the membership attack tries to tell apart")
    sweep.add_argument("--verbose", action="store_true", help="show Flower's and Ray's full logs")
    sweep.epilog = "Rerun the same command (same --out) to resume: finished points are kept."
    report_help = "render a run, sweep or experiment folder as RUN_DIR/report.md (tables, linked figures)"
    report = sub.add_parser("report", help=report_help, description=report_help)
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a folder with summary.json, results.md/.csv, or run subfolders")
    from edfed.simulations.experiments import add_experiment_parser  # light: no torch/pandas at import

    add_experiment_parser(sub)
    deploy = sub.add_parser("deploy", help="credentials for a real deployment").add_subparsers(dest="action",
                                                                                           required=True)
    init = deploy.add_parser("init", help="coordinator: a CA and the SuperLink's TLS certificate")
    init.add_argument("--out", type=Path, default=Path("credentials"), help="folder for ca.crt, server.pem, server.key")
    init.add_argument("--host", action="append", default=None,
                      help="a public name or IP the hospitals reach the coordinator at (repeat); localhost and "
                           "127.0.0.1, where nginx and the operator reach the SuperLink, are always added "
                           "(default: only those)")
    key = deploy.add_parser("site-key", help="site: an EC P-384 key pair for SuperNode authentication")
    key.add_argument("name", help="the site's name, e.g. ed-site-1")
    key.add_argument("--out", type=Path, default=Path("credentials"), help="folder for the site's key pair")
    ckey = deploy.add_parser("consortium-key", help="consortium: the Ed25519 key that signs edfed releases")
    ckey.add_argument("--out", type=Path, default=Path("credentials"),
                      help="folder for consortium.key (owner-only) and consortium.pub")
    coord = deploy.add_parser("coordinator-key", help="coordinator: the Ed25519 key that signs every message to "
                              "the sites (coordinator.key, owner-only; coordinator.pub for the sites)")
    coord.add_argument("--out", type=Path, required=True, help="folder for coordinator.key and coordinator.pub")
    secret = deploy.add_parser("superexec-secret",
                               help="a shared secret for --superexec-auth-secret-file (owner-only file)")
    secret.add_argument("file", type=Path, help="the secret file to write (owner-only)")
    runner = deploy.add_parser("site-runner", help="site: trust file and the shims that make this site's "
                               "SuperExec run only signed edfed releases")
    runner.add_argument("--consortium-key", type=Path, action="append", required=True,
                        help="the consortium's consortium.pub (repeat for several keys)")
    runner.add_argument("--min-version", default="0.0.0", help="the oldest release this site runs (default any)")
    runner.add_argument("--coordinator-key", type=Path, action="append", default=None,
                        help="the coordinator's coordinator.pub: this site obeys only messages it signed (repeat "
                             "for several; or node config coordinator-key; default: none here)")
    runner.add_argument("--out", type=Path, required=True, help="folder for trust.toml and the shims")
    proxy = deploy.add_parser("proxy-config", help="coordinator: nginx config that forwards only the Fleet API")
    proxy.add_argument("--out", type=Path, required=True, help="folder for the nginx configuration")
    proxy.add_argument("--listen", default="443", help="public port (or address:port) nginx listens on")
    proxy.add_argument("--superlink", default="127.0.0.1:9091", help="the SuperLink's loopback address")
    proxy.add_argument("--credentials", type=Path, required=True,
                       help="the folder `edfed deploy init` wrote (ca.crt, server.pem, server.key)")
    proxy.add_argument("--upstream-name", default="localhost",
                       help="name checked in the SuperLink's certificate (one of init's --host)")
    units = deploy.add_parser("units", help="systemd units for `edfed site start` / `edfed coordinator start`")
    units.add_argument("--out", type=Path, required=True,
                       help="folder for edfed-site.service / edfed-coordinator.service")
    units.add_argument("--site-config", type=Path, default=None,
                       help="the site.toml the site's unit starts (default: no site unit)")
    units.add_argument("--coordinator-config", type=Path, default=None,
                       help="the coordinator.toml the coordinator's unit starts (default: no coordinator unit)")
    units.add_argument("--user", default="edfed", help="the user each service runs as")
    for party, what in (("site", "a hospital: its SuperNode and SuperExec (the runner in place)"),
                        ("coordinator", "the coordinator: SuperLink on loopback, its SuperExec, nginx")):
        sp = sub.add_parser(party, help=f"{what}, from one TOML file (docs/deployment.md)")
        actions = sp.add_subparsers(dest="action", required=True)
        for action, text in (("check", "check the whole configuration, start nothing (exit 2 naming every problem)"),
                             ("start", "check, then start and supervise the processes until SIGTERM"),
                             ("status", "what runs, whether the other side answers, certificate expiry")):
            ap = actions.add_parser(action, help=text)
            ap.add_argument("--config", type=Path, required=True, help=f"the {party}.toml")
        if party == "coordinator":
            add = actions.add_parser("add-site", help="register a hospital's SuperNode key and keep its .pub")
            add.add_argument("--config", type=Path, required=True, help="the coordinator.toml")
            add.add_argument("name", help="the site's name, e.g. ed-site-3")
            add.add_argument("public_key", type=Path, help="the site's ed-site-K.pub")
            rm = actions.add_parser("remove-site", help="unregister a hospital's node and drop its .pub")
            rm.add_argument("--config", type=Path, required=True, help="the coordinator.toml")
            rm.add_argument("name", help="the site's name, as given to add-site")
            rm.add_argument("node_id", help="its node id (`edfed coordinator status` lists them)")
    release = sub.add_parser("release", help="signed edfed releases").add_subparsers(dest="action", required=True)
    rbuild = release.add_parser("build", help="flwr build the app into OUT: the FAB and its .sha256")
    rbuild.add_argument("--app", type=Path, default=Path("."), help="edfed source folder (default .)")
    rbuild.add_argument("--out", type=Path, default=Path("release"), help="folder for the FAB and its .sha256")
    rsign = release.add_parser("sign", help="sign a FAB's sha256 and version with the consortium key: FAB.sig")
    rsign.add_argument("fab", type=Path, help="the FAB that `release build` wrote")
    rsign.add_argument("--key", type=Path, required=True, help="consortium.key")
    rkey = release.add_parser("key-id", help="the key id of a consortium.pub (what a site checks by phone and "
                              "names as consortium-key-id)")
    rkey.add_argument("public_key", type=Path, help="the consortium's consortium.pub")
    rverify = release.add_parser("verify", help="check a FAB against its signature and a site's trust file")
    rverify.add_argument("fab", type=Path, help="the FAB to check")
    rverify.add_argument("--trust", type=Path, required=True, help="the site's trust.toml")
    rverify.add_argument("--signature", type=Path, default=None, help="signature file (default FAB.sig)")
    return parser


def _check_run_flags(args: argparse.Namespace) -> None:
    """Build the settings a training command will build, now: a bad value stops it before any cohort is
    generated or any file written."""
    if args.command == "train":
        from edfed.simulations.central import config_from_args

        config_from_args(args)
    else:
        from edfed.common.config import run_config_from_args, train_config_from

        train_config_from(run_config_from_args(args))


def _dispatch(args: argparse.Namespace) -> None:
    if args.command in ("train", "simulate", "privacy-sweep"):
        _check_run_flags(args)
    if args.command == "cohort":
        from edfed.simulations.cohort import generate_cohort

        out = generate_cohort(args.out, n_sites=args.sites, visits_per_site=args.visits_per_site,
                              seed=args.seed, harder=args.harder)
        print(f"wrote {args.sites} sites to {out}")
    elif args.command == "data":
        from edfed.common.contract import load_site, print_profile

        table = load_site(args.file, mapping=args.mapping, encoding=args.encoding)
        print_profile(table, args.file)
    elif args.command == "train":
        from edfed.simulations.central import run_central
        from edfed.simulations.cohort import ensure_cohort

        args.data = ensure_cohort(args.data)
        run_central(args)
    elif args.command == "ledger":
        from edfed.common.privacy import PrivacyLedger

        if args.action == "init":
            made = PrivacyLedger.init(args.path)
            print(f"created privacy ledger {args.path} (id {made.id[:8]}..., owner-only); name it as this site's "
                  "ledger-path. It only ever accumulates: keep it, back it up, never delete it.")
        else:
            shown = PrivacyLedger.open(args.path)
            runs = sorted({str(h["run"]) for h in shown.history})
            print(f"{args.path}: {len(shown.history)} DP rounds over {len(runs)} runs, epsilon spent "
                  f"{shown.spent(args.delta):.4f} at delta {args.delta:g}; {sum(shown.queries.values())} evaluations")
    elif args.command == "deploy":
        _deploy(args)
    elif args.command == "release":
        _release(args)
    elif args.command in ("site", "coordinator"):
        _party(args)
    elif args.command == "simulate":
        from edfed.simulations.federated import run_simulate

        run_simulate(args)
    elif args.command == "personalize":
        from edfed.client.local_models import run_personalize

        run_personalize(args)
    elif args.command == "track":
        from edfed.simulations.tracking import track_run

        run_id = track_run(args.run_dir, args.uri, args.experiment)
        print(f"logged {args.run_dir} to MLflow ({args.uri}), run id {run_id}")
    elif args.command == "predict":
        from edfed.client.predict import run_predict

        run_predict(args)
    elif args.command == "privacy-sweep":
        from edfed.simulations.sweep import run_sweep

        run_sweep(args)
    elif args.command == "report":
        from edfed.server.report import write_report

        print(f"wrote {write_report(args.run_dir)}")
    elif args.command == "experiment":
        from edfed.simulations.experiments import run_experiment_command

        run_experiment_command(args)


def _deploy(args: argparse.Namespace) -> None:
    from edfed.common.credentials import init_coordinator, site_key, superexec_secret

    if args.action == "init":
        written = init_coordinator(args.out, args.host or [])
    elif args.action == "site-key":
        written = site_key(args.name, args.out)
    elif args.action == "consortium-key":
        from edfed.client.release import consortium_key, public_key_id

        written = consortium_key(args.out)
        print(f"consortium key id {public_key_id(written[1])} (sites check it in their trust file)")
    elif args.action == "coordinator-key":
        from edfed.common.signing import coordinator_key, coordinator_public_key, key_id

        written = coordinator_key(args.out)
        public = coordinator_public_key(written[1].read_text(), str(written[1]))
        print(f"coordinator key id {key_id(public)} (each site checks it by phone before it lists coordinator.pub)")
    elif args.action == "superexec-secret":
        written = [superexec_secret(args.file)]
    elif args.action == "units":
        from edfed.common.supervisor import write_units

        written = write_units(args.out, args.site_config, args.coordinator_config, args.user)
    elif args.action == "site-runner":
        from edfed.client.release import write_site_runner
        from edfed.client.runner import TOKEN_WARNING, proc_hides_processes

        written = write_site_runner(args.out, args.consortium_key, args.min_version, args.coordinator_key)
        print(f"wrote {written[0]} and {written[1].parent}/: name the trust file as `trust` in site.toml (`edfed "
              "site start` writes the shims into its state-dir and puts them first on its SuperExec's PATH)")
        if not proc_hides_processes():
            print(TOKEN_WARNING.replace("this ClientApp's", "each ClientApp's"), file=sys.stderr)
        return
    else:
        from edfed.server.proxy import write_proxy_config

        creds = args.credentials
        written = write_proxy_config(args.out, args.listen, creds / "server.pem", creds / "server.key",
                                     creds / "ca.crt", args.superlink, args.upstream_name)
    private = " (private keys and secrets owner-only)" if args.action not in ("proxy-config", "units") else ""
    print("wrote " + ", ".join(str(p) for p in written) + private)


def _party(args: argparse.Namespace) -> None:
    if args.command == "site":
        from edfed.client import service as party

        check, start, status = party.site_check, party.site_start, party.site_status
    else:
        from edfed.server import service as party

        check, start, status = party.coordinator_check, party.coordinator_start, party.coordinator_status
    if args.action == "check":
        check(args.config)
        print(f"{args.config}: every check passed")
    elif args.action == "start":
        start(args.config)
    elif args.action == "status":
        lines, healthy = status(args.config)
        print("\n".join(lines))
        if not healthy:
            raise SystemExit(1)
    elif args.action == "add-site":
        print(party.add_site(args.config, args.name, args.public_key))
    else:
        print(party.remove_site(args.config, args.node_id, args.name))


def _release(args: argparse.Namespace) -> None:
    from edfed.client import release

    if args.action == "build":
        fab, digest = release.build_release(args.app, args.out)
        print(f"wrote {fab} (sha256 {digest.read_text().split()[0]}, edfed {release.fab_version(fab.read_bytes())})")
    elif args.action == "sign":
        print(f"wrote {release.sign_release(args.fab, args.key)}")
    elif args.action == "key-id":
        print(release.public_key_id(args.public_key))
    else:
        found = release.verify_file(args.fab, args.trust, args.signature)
        print(f"{args.fab}: the signed release edfed {found.version} (sha256 {found.sha256}, key {found.key_id})")


def main(argv: list[str] | None = None) -> int:
    # Before flwr is imported: Flower's telemetry would otherwise report every run (set it to 1 to opt in).
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    if getattr(args, "precision", None):  # a property of this machine: every model this process (and Ray) builds
        os.environ["EDFED_PRECISION"] = args.precision
    try:
        _dispatch(args)
    except EdfedError as exc:
        print(f"edfed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edfed: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
