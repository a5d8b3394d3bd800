"""The deployed blend's public local-only weight, chosen on validation: each site's validation AUROC of the blend
at several weights, mean over the sites of one or more `edfed simulate --personalize` runs.

    python benchmarks/deploy_blend.py RUN_DIR [RUN_DIR ...] [--split val|test]

It reads each site's deployed/<site>/candidates.npz (every candidate's risks, written by the deployment) and
scores the blend exactly as `client.local_models.deploy_at_site` builds it. Choose on `val`; `test` is for the
report only, and with it each site's deployed model (at the public weight) against what it can build alone, with
the mean paired gains over sites and their 95% intervals (one line per run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edfed.client.local_models import (
    CANDIDATE_RISKS,
    LOCAL_ONLY_WEIGHT,
    _auroc,
    apply_recipes,
    deployment_recipes,
    fit_recipes,
)
from edfed.common.contract import OUTCOMES

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    args = parser.parse_args()
    files = sorted(f for run in args.runs for f in (run / "deployed").glob(f"*/{CANDIDATE_RISKS}"))
    if not files:
        raise SystemExit(f"no deployed/*/{CANDIDATE_RISKS} under {', '.join(map(str, args.runs))}")
    scores = {w: {o: [] for o in OUTCOMES} for w in WEIGHTS}
    for file in files:
        saved = np.load(file)
        val = {key.split("|", 1)[1]: saved[key] for key in saved.files if key.startswith("val|")}
        scored = {key.split("|", 1)[1]: saved[key] for key in saved.files if key.startswith(f"{args.split}|")}
        val_labels, labels = val.pop("labels"), scored.pop("labels")
        for w in WEIGHTS:
            risks = apply_recipes(fit_recipes(deployment_recipes(val_labels, val, w), val_labels, val), scored)
            for k, outcome in enumerate(OUTCOMES):
                scores[w][outcome].append(_auroc(labels[:, k], risks[:, k]))
    print(f"{len(files)} sites; mean {args.split} AUROC of the deployed blend by its local-only weight "
          f"(the public weight is {LOCAL_ONLY_WEIGHT})")
    print("weight  " + "  ".join(f"{o:>16}" for o in OUTCOMES) + "  mean of three")
    for w in WEIGHTS:
        means = [float(np.nanmean(scores[w][o])) for o in OUTCOMES]
        print(f"{w:6.2f}  " + "  ".join(f"{m:16.3f}" for m in means) + f"  {np.mean(means):13.3f}")
    if args.split == "test":
        for run in args.runs:
            gains_at_public_weight(run)


def gains_at_public_weight(run: Path) -> None:
    """Per site and outcome: deployed - local-only and deployed - own stacked regression on the site's test rows,
    then the means over sites with paired intervals (common.metrics.mean_paired_gain, as the summary computes)."""
    from edfed.client.local_models import OWN_REGRESSION
    from edfed.common.metrics import mean_paired_gain

    pairs: dict[str, dict] = {"local-only": {}, OWN_REGRESSION: {}}
    print(f"\n{run}: each site's test AUROC, deployed - local-only / deployed - {OWN_REGRESSION}")
    for file in sorted((run / "deployed").glob(f"*/{CANDIDATE_RISKS}")):
        saved = np.load(file)
        val = {key.split("|", 1)[1]: saved[key] for key in saved.files if key.startswith("val|")}
        test = {key.split("|", 1)[1]: saved[key] for key in saved.files if key.startswith("test|")}
        val_labels, labels = val.pop("labels"), test.pop("labels")
        deployed = apply_recipes(fit_recipes(deployment_recipes(val_labels, val), val_labels, val), test)
        cells = []
        for k in range(len(OUTCOMES)):
            ours = _auroc(labels[:, k], deployed[:, k])
            cells.append(" / ".join(f"{ours - _auroc(labels[:, k], test[alone][:, k]):+.3f}" for alone in pairs))
        site = file.parent.name
        for alone in pairs:
            pairs[alone][site] = (labels, deployed, test[alone])
        print(f"  {site}: " + "; ".join(f"{o} {c}" for o, c in zip(OUTCOMES, cells, strict=True)))
    for alone, by_site in pairs.items():
        gains = mean_paired_gain(by_site, 200, 0)
        print(f"  mean over sites, deployed - {alone}: " + "; ".join(
            f"{o} {g['mean_gain']:+.3f} ({g['mean_gain_ci'][0]:+.3f}, {g['mean_gain_ci'][1]:+.3f})"
            for o, g in gains.items()))


if __name__ == "__main__":
    main()
