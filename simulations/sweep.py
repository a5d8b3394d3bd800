"""`edfed privacy-sweep`: one simulated federation per (privacy budget, seed), the privacy-utility curve, and
next to each budget the leakage a membership-inference attack actually measures on the final model.

    SWEEP_DIR/sweep.json             the settings every point shares (a rerun with other settings is refused)
    SWEEP_DIR/eps-<e>/seed-<s>/      one `edfed simulate` run folder, its own ledgers/ and audit.json
    SWEEP_DIR/local-only/seed-<s>/   each site's model trained on its data alone (no DP), scored pooled
    SWEEP_DIR/results.csv, results.md, privacy_utility.png, summary.json

Each point is an independent consortium: a fresh budget (its own ledger folder) and its own run id. The sites'
frozen-layer caches live in their own data folders (client.site), shared by every point. A seed
sets everything random in a point: initialisation, shuffling, DP noise and the patient-level split, so the
spread over seeds includes which patients land in the test split (all budgets of a seed share one split).
Rerunning the same command resumes: a point with summary.json is kept, a point without one is restarted
from scratch (see `run_point` for why not resumed), and the tables and plot are rebuilt from what is on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from edfed.common.contract import OUTCOMES
from edfed.common.data import load_cohort, site_files
from edfed.common.display import make_console
from edfed.common.errors import EdfedError
from edfed.common.evaluation import write_summary
from edfed.common.files import atomic_write, atomic_write_text
from edfed.common.markdown import markdown_table
from edfed.simulations.audit import audit_run

METRICS = ("auroc", "auprc")
# Settings that differ between points (or only name a folder), so they are not part of sweep.json.
_PER_POINT = {"epsilon", "seed", "run-dir", "ledger-dir", "resume"}


def parse_epsilons(text: str) -> list[float]:
    """'0.5,1,inf' -> [0.5, 1.0, inf]: positive, distinct, sorted, inf (DP off) last."""
    values = []
    for part in str(text).split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise EdfedError(f"--epsilons: {part.strip()!r} is not a number (give e.g. 0.5,1,2,4,8,inf)") from None
        if not value > 0:  # also catches nan
            raise EdfedError(f"--epsilons: every budget must be positive (or inf for no DP), got {part.strip()}")
        values.append(value)
    return sorted(set(values))


def epsilon_label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def point_dir(sweep_dir: Path, epsilon: float, seed: int) -> Path:
    return sweep_dir / f"eps-{epsilon_label(epsilon)}" / f"seed-{seed}"


def _restart_clean(folder: Path) -> None:
    """Empty a half-finished point."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def run_point(args: argparse.Namespace, sweep_dir: Path, epsilon: float, seed: int) -> bool:
    """Run one federation unless its summary.json exists; returns whether it ran.

    A point without summary.json is restarted from scratch, not resumed. Resume is right for a real
    consortium (its budget is real), but here it would measure something else than the point stands for:
    a crash after a site's DP step and before the server's checkpoint leaves that step in the site's
    ledger, so the resumed run's last round no longer fits the budget and is refused; and the summary of
    a resumed run counts only the rounds after the resume (steps, timings, validation curve). A fresh
    folder and a fresh ledger give the same point an uninterrupted run gives. Resetting that ledger hides
    no spend: everything trained under it (checkpoints, adapter) is deleted with it.
    """
    from edfed.simulations.federated import run_simulate

    folder = point_dir(sweep_dir, epsilon, seed)
    if (folder / "summary.json").exists():
        return False
    _restart_clean(folder)
    point_args = argparse.Namespace(**{**vars(args), "epsilon": epsilon, "seed": seed, "out": folder,
                                       "ledger_dir": folder / "ledgers", "local_baselines": False, "resume": None,
                                       # each site's deployed model against its local-only one, per budget
                                       "personalize": True})
    run_simulate(point_args)
    return True


def local_only_reference(run_config: dict, data_dir: Path, out_dir: Path) -> dict:
    """Each site's local-only model (client.local_models: full model, no DP, the federation's epochs), every
    site's test visits scored by its own model and pooled: the level a federation must beat to be worth joining.

    Computed once per seed, not per budget: it involves no DP, so it does not depend on epsilon.
    """
    from edfed.client.local_models import local_only_config, local_only_models
    from edfed.common.evaluation import score_saved_predictions

    started = time.perf_counter()
    config = local_only_config(run_config)
    per_site = local_only_models(run_config, data_dir, out_dir)
    final = score_saved_predictions([out_dir / site / "predictions.parquet" for site in per_site], data_dir,
                                    config.bootstrap, config.seed)
    summary = {"kind": "local-only", "config": {**run_config, "train": config.to_dict()}, "final": final,
               "per_site": per_site, "wall_seconds": time.perf_counter() - started}
    write_summary(out_dir, summary)
    return summary


def point_row(folder: Path) -> dict:
    """One CSV row from a finished point's summary.json and audit.json."""
    summary = json.loads((folder / "summary.json").read_text())
    audit = json.loads((folder / "audit.json").read_text()) if (folder / "audit.json").exists() else {}
    spent = [p.get("epsilon", math.nan) for p in summary.get("privacy", {}).values()]
    row = {"epsilon": float(summary["config"]["epsilon"]), "seed": int(summary["config"]["seed"])}
    for outcome in OUTCOMES:
        for metric in METRICS:
            row[f"{outcome}_{metric}"] = summary["final"].get(outcome, {}).get(metric, math.nan)
    # Mean over sites of deployed - each of the two a site builds alone, each site on its own test visits.
    for key, suffix in (("gain_over_local_only", "deployed_gain"), ("gain_over_own_regression", "regression_gain")):
        gains = summary.get("deployment", {}).get(key, {})
        for outcome in OUTCOMES:
            gain = gains.get(outcome, {})
            low, high = gain.get("mean_gain_ci", [math.nan, math.nan])
            row.update({f"{outcome}_{suffix}": gain.get("mean_gain", math.nan),
                        f"{outcome}_{suffix}_low": low, f"{outcome}_{suffix}_high": high})
    row.update({
        "epsilon_spent_max": max(spent) if spent else math.nan,
        "attack_auroc": audit.get("auroc", math.nan),
        "attack_tpr_at_fpr_1pct": audit.get("tpr_at_fpr_1pct", math.nan),
        "attack_tpr_at_fpr_10pct": audit.get("tpr_at_fpr_10pct", math.nan),
        "wall_seconds": summary.get("wall_seconds_total", summary.get("wall_seconds", math.nan)),
        "oracle": {o: summary["final"].get(o, {}).get("oracle_auroc", math.nan) for o in OUTCOMES},
        "folder": folder.relative_to(folder.parents[1]).as_posix(),
    })
    return row


def _fmt(mean: float, sd: float, n: int, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "inf" if mean == math.inf else "n/a"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 and np.isfinite(sd) else "")


def write_results(sweep_dir: Path, settings: dict, started: float) -> dict:
    """results.csv, results.md, privacy_utility.png and summary.json from every finished point on disk."""
    from edfed.common.plots import plot_privacy_utility

    rows = [point_row(p.parent) for p in sorted(sweep_dir.glob("eps-*/seed-*/summary.json"))]
    if not rows:
        raise EdfedError(f"{sweep_dir}: no finished point to tabulate")
    points = pd.DataFrame(rows).sort_values(["epsilon", "seed"], ignore_index=True)
    columns = [c for c in points.columns if c not in ("oracle", "folder")]
    atomic_write(sweep_dir / "results.csv", lambda tmp: points[columns].to_csv(tmp, index=False))

    value_cols = [c for c in columns if c not in ("epsilon", "seed")]
    grouped = points.groupby("epsilon")[value_cols]
    mean, sd, count = grouped.mean(), grouped.std(), points.groupby("epsilon")["seed"].count()
    local = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("local-only/seed-*/summary.json"))]
    references = {}
    if local:
        references["local-only (each site alone, no DP)"] = {
            f"{o}_{m}": float(np.mean([s["final"][o][m] for s in local])) for o in OUTCOMES for m in METRICS}
    oracle = {f"{o}_auroc": float(np.nanmean([r["oracle"][o] for r in rows])) for o in OUTCOMES}
    if all(np.isfinite(v) for v in oracle.values()):
        references["oracle (true risk)"] = oracle
    plot_privacy_utility(points, references, sweep_dir / "privacy_utility.png",
                         f"privacy-utility: {settings.get('modality')}, {settings.get('num-server-rounds')} rounds, "
                         f"pooled test, {points['seed'].nunique()} seed(s)")

    aggregate = {epsilon_label(e): {"seeds": int(count[e]), **{c: float(mean.loc[e, c]) for c in value_cols},
                                    **{f"{c}_sd": float(sd.loc[e, c]) for c in value_cols}} for e in mean.index}
    summary = {
        "kind": "privacy-sweep",
        "config": settings,
        "epsilons": [epsilon_label(e) for e in mean.index],
        "seeds": sorted(int(s) for s in points["seed"].unique()),
        "points": json.loads(points.drop(columns=["oracle"]).to_json(orient="records")),
        "aggregate": aggregate,
        # The formal budget next to what the attack measured: a reader compares the two at a glance.
        "budget_vs_leakage": [{"epsilon": epsilon_label(e),
                               **{c: float(mean.loc[e, c]) for c in ("epsilon_spent_max", "attack_auroc",
                                                                     "attack_tpr_at_fpr_1pct")},
                               "attack_auroc_sd": float(sd.loc[e, "attack_auroc"])} for e in mean.index],
        "references": references,
        "local_only": {f"seed-{s['config']['seed']}": s["final"] for s in local},
        # compute behind the sweep (every point and reference, across invocations), and this invocation's time
        "wall_seconds": float(points["wall_seconds"].sum() + sum(s["wall_seconds"] for s in local)),
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }
    write_summary(sweep_dir, summary)
    _write_markdown(sweep_dir, settings, points, mean, sd, count, references, value_cols)
    return summary


def _write_markdown(sweep_dir, settings, points, mean, sd, count, references, value_cols) -> None:
    short = {"mortality_30d": "mortality", "safe_discharge": "discharge", "readmission_30d": "readmission"}
    metric_cols = [f"{o}_{m}" for o in OUTCOMES for m in METRICS]
    heads = [f"{short.get(o, o)} {m.upper()}" for o in OUTCOMES for m in METRICS]
    figures = ["max ε spent", "attack AUROC", "TPR @ 1% FPR", "wall s"]
    by_budget = []
    for e in mean.index:
        n = int(count[e])
        by_budget.append([epsilon_label(e), str(n), *(_fmt(mean.loc[e, c], sd.loc[e, c], n) for c in metric_cols),
                          _fmt(mean.loc[e, "epsilon_spent_max"], math.nan, 1, 2),
                          _fmt(mean.loc[e, "attack_auroc"], sd.loc[e, "attack_auroc"], n),
                          _fmt(mean.loc[e, "attack_tpr_at_fpr_1pct"], math.nan, 1),
                          _fmt(mean.loc[e, "wall_seconds"], math.nan, 1, 0)])
    for name, ref in references.items():
        by_budget.append([name, "", *(_fmt(ref.get(c, math.nan), math.nan, 1) for c in metric_cols), "", "", "", ""])
    every = []
    for row in points.itertuples(index=False):
        r = row._asdict()
        every.append([epsilon_label(r["epsilon"]), str(r["seed"]), *(_fmt(r[c], math.nan, 1) for c in metric_cols),
                      _fmt(r["epsilon_spent_max"], math.nan, 1, 2), _fmt(r["attack_auroc"], math.nan, 1),
                      _fmt(r["attack_tpr_at_fpr_1pct"], math.nan, 1), _fmt(r["wall_seconds"], math.nan, 1, 0),
                      f"[{r['folder']}]({r['folder']})"])
    def gain(r: dict, o: str, suffix: str) -> str:
        if not np.isfinite(r.get(f"{o}_{suffix}", math.nan)):
            return "n/a"
        return f"{r[f'{o}_{suffix}']:+.3f} ({r[f'{o}_{suffix}_low']:+.3f}, {r[f'{o}_{suffix}_high']:+.3f})"

    deployed = [[epsilon_label(r["epsilon"]), str(r["seed"]), label, *(gain(r, o, suffix) for o in OUTCOMES)]
                for r in (row._asdict() for row in points.itertuples(index=False))
                for label, suffix in (("local-only", "deployed_gain"), ("own stacked regression", "regression_gain"))]
    lines = [f"# Privacy sweep: {sweep_dir.name}", "",
             f"{settings.get('modality')} model, {settings.get('num-server-rounds')} rounds of "
             f"{settings.get('strategy')}, {settings.get('local-epochs')} local epoch(s), "
             f"delta {settings.get('delta')}, lr {settings.get('lr')} (with DP {settings.get('dp-lr')}), "
             f"batch {settings.get('batch-size')}; "
             f"data {settings.get('data-dir')}. "
             "Metrics on the pooled held-out test split; epsilon is per site and privacy unit (patient by default), "
             "as each site's ledger accounts it. The attack is "
             f"a loss-threshold membership inference on {settings.get('audit-site')} (train vs test visits, "
             "balanced): AUROC 0.5 = no measurable leakage.", "",
             "![privacy-utility](privacy_utility.png)", "",
             "## Mean ± sd over seeds", "", *markdown_table(["ε (budget)", "seeds", *heads, *figures], by_budget),
             "## Every point", "", *markdown_table(["ε", "seed", *heads, *figures, "folder"], every),
             "## Each site's deployed model against what it can build alone", "",
             "Mean over sites of (deployed - local-only model) and of (deployed - the site's own stacked regression) "
             "test AUROC, each site on its own test visits, with the paired 95% bootstrap interval "
             "(client.local_models).", "",
             *markdown_table(["ε", "seed", "deployed against", *(short.get(o, o) for o in OUTCOMES)], deployed)]
    atomic_write_text(sweep_dir / "results.md", "\n".join(lines))


def _check_settings(sweep_dir: Path, settings: dict) -> None:
    """A sweep folder holds one experiment: refuse to mix points made with other settings into it."""
    path = sweep_dir / "sweep.json"
    if path.exists():
        earlier = json.loads(path.read_text())["settings"]
        changed = sorted(k for k in set(earlier) & set(settings) if earlier[k] != settings[k])
        if changed:
            diffs = ", ".join(f"{k}: {earlier[k]!r} there, {settings[k]!r} now" for k in changed[:4])
            raise EdfedError(f"--out {sweep_dir} holds a sweep made with other settings ({diffs}); rerun with the "
                             "same settings to resume or extend it, or choose another --out")
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise EdfedError(f"--out {sweep_dir} is not empty and holds no sweep (no sweep.json); choose another folder")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"settings": settings}, indent=1))


def run_sweep(args: argparse.Namespace) -> dict:
    """Every (epsilon, seed) point not yet on disk, its audit, the local-only reference per seed, the tables."""
    from edfed.common.config import RUN_DEFAULTS, run_config_from_args

    started = time.perf_counter()
    console = make_console()
    epsilons = parse_epsilons(args.epsilons)
    if args.seeds < 1:
        raise EdfedError(f"--seeds must be at least 1, got {args.seeds}")
    first_seed = RUN_DEFAULTS["seed"] if args.seed is None else args.seed
    seeds = [first_seed + k for k in range(args.seeds)]
    from edfed.simulations.cohort import ensure_cohort

    data_dir = ensure_cohort(args.data, seed=first_seed).resolve()
    load_cohort(data_dir, first_seed)  # every site passes the contract before anything runs
    if args.audit_site not in site_files(data_dir):
        raise EdfedError(f"--audit-site {args.audit_site}: no such site in {data_dir} "
                         f"(sites: {', '.join(site_files(data_dir))})")
    sweep_dir = (args.out or Path("runs") / f"privacy-sweep-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    settings = {k: v for k, v in sorted(run_config_from_args(args).items()) if k not in _PER_POINT}
    settings.update({"data-dir": str(data_dir), "audit-site": args.audit_site})
    _check_settings(sweep_dir, settings)

    plan = [(e, s) for s in seeds for e in epsilons]  # seed-major: after the first seed a whole curve exists
    console.print(f"privacy sweep: {len(epsilons)} budget(s) x {len(seeds)} seed(s) = {len(plan)} federations "
                  f"into {sweep_dir} (rerun the same command to resume)")
    ran = 0
    for k, (epsilon, seed) in enumerate(plan, start=1):
        folder = point_dir(sweep_dir, epsilon, seed)
        label = f"[{k}/{len(plan)}] epsilon {epsilon_label(epsilon)}, seed {seed}"
        if (folder / "summary.json").exists():
            console.print(f"{label}: done earlier, kept")
        else:
            console.rule(label)
            ran += run_point(args, sweep_dir, epsilon, seed)
        if not (folder / "audit.json").exists():  # written after summary.json: a crash can leave it missing
            audit = audit_run(folder, args.audit_site)
            console.print(f"{label}: membership attack on {args.audit_site}: AUROC {audit['auroc']:.3f}, "
                          f"TPR {audit['tpr_at_fpr_1pct']:.3f} at 1% FPR")
            write_results(sweep_dir, settings, started)  # partial tables while the sweep goes on
    for seed in seeds:
        local = sweep_dir / "local-only" / f"seed-{seed}"
        if not (local / "summary.json").exists():
            console.rule(f"local-only reference, seed {seed}")
            shutil.rmtree(local, ignore_errors=True)  # a half-written one: start over
            local.mkdir(parents=True)
            run_config = {**RUN_DEFAULTS, **run_config_from_args(args), "seed": seed, "data-dir": str(data_dir)}
            local_only_reference(run_config, data_dir, local)
    summary = write_results(sweep_dir, settings, started)
    console.print(f"wrote {sweep_dir / 'results.md'}, results.csv and privacy_utility.png "
                  f"({ran} federation(s) run now, {len(plan) - ran} kept)")
    return summary
