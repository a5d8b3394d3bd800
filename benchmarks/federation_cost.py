"""What a federation costs: bytes each site sends per round against the full model, and time overhead.

Runs one simulated federation (Flower's simulation engine, the pretrained encoder by default) and
prints, from its summary:
  * bytes sent per client per round (the trainable arrays) next to the full model's bytes;
  * the federation overhead: simulation wall time / summed client time, where client time is
    each site's whole train handler (data, model, frozen-layer cache, DP training). On 2 cores two
    sites train at once, so summed client time can exceed wall time.

    python benchmarks/federation_cost.py [--data data/cohort] [--rounds 2] [--epsilon 8]
    python benchmarks/federation_cost.py --run RUN_DIR     # the same figures for a finished edfed simulate run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from edfed.common.config import RUN_DEFAULTS
from edfed.common.data import site_files
from edfed.simulations.federated import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/cohort"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--model", default="")
    parser.add_argument("--run", type=Path, default=None, help="report a finished run instead of running one")
    args = parser.parse_args()
    if args.run is not None:
        summary = json.loads((args.run / "summary.json").read_text())
        args.rounds, args.epsilon = summary["num_rounds"], float(summary["config"]["epsilon"])
    else:
        if not args.data.exists():
            from edfed.simulations.cohort import generate_cohort

            generate_cohort(args.data)
        with tempfile.TemporaryDirectory() as tmp:
            run_config = {**RUN_DEFAULTS, "data-dir": str(args.data.resolve()), "run-dir": tmp,
                          "num-server-rounds": args.rounds, "epsilon": args.epsilon, "model": args.model}
            summary = simulate(run_config, len(site_files(args.data)))
    comm = summary["communication"]
    sent, full = comm["bytes_sent_per_client_round"], comm["full_model_bytes"]
    print(f"sites: {len(summary['privacy'])}, rounds: {args.rounds}, epsilon per site: "
          f"{'off' if math.isinf(args.epsilon) else args.epsilon}")
    print(f"bytes sent per client per round: {sent:,} ({sent / 2**20:.2f} MiB)")
    print(f"full model bytes:                {full:,} ({full / 2**20:.2f} MiB)")
    print(f"share of the full model:         {100 * sent / full:.2f}%")
    wall, client, steps = summary["wall_seconds"], summary["client_train_seconds"], summary["client_step_seconds"]
    print(f"simulation wall time:            {wall:.1f} s")
    print(f"summed client time:              {client:.1f} s (of which training steps {steps:.1f} s)")
    print(f"federation overhead:             {wall / client:.2f} (wall / summed client time)")


if __name__ == "__main__":
    main()
