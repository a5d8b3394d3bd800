"""Wall time of the README's first command, phase by phase, on a fresh cohort and a fresh run folder.

Runs exactly `edfed simulate` (the main job, embedded defaults) in a new empty folder, so the default
cohort is generated there and nothing is reused, then prints the CPU, its bf16 support, the precision the
sites chose and the time of every phase from the run's summary.json. `--central` also times
`edfed train central` on the same cohort the same way.

    python benchmarks/main_job.py [--workdir DIR] [--central] [-- extra edfed simulate flags]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edfed.common.precision import machine_facts

EDFED = Path(sys.executable).parent / "edfed"


def _run(command: list[str], cwd: Path) -> float:
    print("$ " + " ".join(command[1:] if command[0] == str(EDFED) else command), f"(in {cwd})", flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True)
    return time.perf_counter() - started


def _summary(folder: Path) -> dict:
    found = sorted(folder.glob("*/summary.json"))
    if not found:
        raise SystemExit(f"no summary.json under {folder}")
    return json.loads(found[-1].read_text())


def _print_phases(title: str, wall: float, summary: dict) -> None:
    timings = summary.get("timings", {})
    print(f"\n{title}: {wall:.1f} s wall in all")
    for name, value in timings.items():
        if name == "rounds":
            for k, r in value.items():
                print(f"  round {k}: {r['seconds']:.1f} s training and aggregation, "
                      f"{r['validation_seconds']:.1f} s pooled validation")
        elif name in ("site_data_seconds", "epochs"):
            shown = ", ".join(f"{k} {v:.1f}" for k, v in value.items())
            print(f"  {name.replace('_seconds', '')} (s): {shown}")
        else:
            print(f"  {name.replace('_seconds', '').replace('_', ' ')}: {value:.1f} s")
    final = summary.get("final", {})
    if final:
        print("  pooled test AUROC: " + " / ".join(f"{o} {m['auroc']:.3f}" for o, m in final.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="an empty folder to run in (default: a temp one)")
    parser.add_argument("--central", action="store_true", help="also time `edfed train central`")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edfed-main-job-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"--workdir {work} is not empty: the benchmark needs a fresh cohort and run folder")
    machine = machine_facts()
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, native bf16 (avx512_bf16/amx_bf16 and oneDNN): "
          f"{machine['native_bf16']}", flush=True)
    try:
        wall = _run([str(EDFED), "simulate", *extra], work)
        summary = _summary(work / "runs")
        _print_phases("edfed simulate", wall, summary)
        print(f"  precision: sites {sorted(set(summary.get('precision', {}).values()))}, coordinator "
              f"{summary.get('coordinator', {}).get('precision')}")
        if args.central:
            central = work / "runs-central"
            wall = _run([str(EDFED), "train", "central", "--out", str(central / "run")], work)
            _print_phases("edfed train central", wall, _summary(central))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
