"""The `edfed` command: argument parsing and clean error reporting, nothing else.

Each subcommand hands its arguments to a plain function elsewhere; any `EdfedError` becomes a
one-paragraph message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import EdfedError


def _float_or_inf(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="folder with site-K.parquet files")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<kind>-<time>)")
    p.add_argument("--model", type=Path, default=None,
                   help="local Hugging Face encoder directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--modality", choices=["multimodal", "text", "structured"], default="multimodal")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: config)")
    p.add_argument("--max-tokens", type=int, default=None, help="note token budget per visit")
    p.add_argument("--lora-layers", type=int, default=None,
                   help="LoRA in the top N encoder layers (0 = every layer)")
    p.add_argument("--no-bf16", action="store_true", help="run the frozen encoder in fp32")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the frozen lower layers every step instead of caching them")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edfed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cohort = sub.add_parser("cohort", help="simulated cohort").add_subparsers(dest="action", required=True)
    gen = cohort.add_parser("generate", help="write the simulated six-ED cohort")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--sites", type=int, default=6)
    gen.add_argument("--visits-per-site", type=int, default=None,
                     help="visits at every site (default: realistic, unequal site sizes)")
    gen.add_argument("--seed", type=int, default=0)

    data = sub.add_parser("data", help="site data").add_subparsers(dest="action", required=True)
    check = data.add_parser("check", help="validate a site file against the data contract")
    check.add_argument("file", type=Path)
    check.add_argument("--mapping", type=Path, default=None,
                       help="file mapping the site's column names to the contract's")

    train = sub.add_parser("train", help="training").add_subparsers(dest="action", required=True)
    central = train.add_parser("central", help="pooled (non-federated) training: the baseline")
    _add_training_flags(central)
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "cohort":
        from simulations.cohort import generate_cohort

        out = generate_cohort(args.out, n_sites=args.sites, visits_per_site=args.visits_per_site,
                              seed=args.seed)
        print(f"wrote {args.sites} sites to {out}")
    elif args.command == "data":
        from common.contract import load_site, print_profile

        table = load_site(args.file, mapping=args.mapping)
        print_profile(table, args.file)
    elif args.command == "train":
        from simulations.central import run_central

        run_central(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
