"""`edfed experiment NAME`: the seed paper's comparisons as named, resumable experiments.

Henriksson et al. 2023 (Artif Intell Med 146:102695) found that notes fused with structured data beat
either alone, and that the impression and assessment/plan sections carry most of the notes' signal.
Each experiment is a list of arms. An arm is one ordinary run in its own subfolder of the experiment
folder, with its own summary.json: central training (simulations/central.py), a simulated federation
(simulations/federated.py) or a non-neural baseline on the structured features. An arm whose
summary.json exists is not run again, so an interrupted experiment resumes where it stopped. The arms'
held-out metrics are then gathered into results.json, results.md and auroc.png.

Heavy libraries are imported inside the functions that use them, so `edfed --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edfed.common.config import DEFAULT_DATA_DIR, NOTE_SECTIONS, TrainConfig
from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write_text
from edfed.common.markdown import markdown_table

# The two sections Henriksson et al. found most predictive, and the rest.
KEY_SECTIONS = ("impression", "assessment_plan")
OTHER_SECTIONS = tuple(s for s in NOTE_SECTIONS if s not in KEY_SECTIONS)
DEFAULT_ROUNDS = 4


@dataclass(frozen=True)
class Arm:
    """One run of an experiment, in the subfolder `name`."""

    name: str
    label: str  # its row in the tables
    kind: str = "central"  # central | federated | baseline
    changes: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields that differ from the base
    held_out: str = ""  # central: a site left out of training and tested on (every one of its visits)
    estimator: str = ""  # baseline: "logistic" or "gradient_boosting"


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str  # one line, for --list
    mirrors: str  # the finding of the paper it mirrors
    cost: str  # rough wall time with the pretrained encoder on 2 cores, at the defaults
    federated: bool = False  # has a federated arm: --rounds and --epsilon apply


EXPERIMENTS = {e.name: e for e in (
    Experiment("modality", "central multimodal vs text-only vs structured-only, plus logistic regression and "
               "gradient boosting on the same structured features",
               "fused notes + structured data beat either modality alone",
               "~14 min at 4 epochs: multimodal ~6.5, text ~7, structured <1, the two baselines <1 "
               "(~3.3 min per epoch)"),
    Experiment("settings", "centralized vs federated (--epsilon, default inf) vs each site's local-only model, "
               "pooled and mean per-site AUROC",
               "(edfed's own question) does federation recover pooled training where sites cannot share data?",
               "~25-30 min at 4 epochs/rounds: central ~6.5, federation ~8-13, six local-only models ~7",
               federated=True),
    Experiment("notes", "note-section ablation (multimodal, central): all sections, each removed at training and "
               "test, impression + assessment/plan only, triage + history only",
               "impression and assessment/plan notes carry the most signal",
               "~45 min at 4 epochs: 7 multimodal arms of ~6.5 min (~11 min per epoch); fewer sections, "
               "shorter notes, a little faster"),
    Experiment("subgroups", "one central multimodal model scored by age band, sex, site and one vs several visits",
               "(not in the paper) does the fused model hold up across patient groups and sites?",
               "~7 min at 4 epochs: one multimodal arm"),
    Experiment("loso", "leave-one-site-out: train on five sites, test on every visit of the sixth; plus the "
               "in-distribution central model on each site's test split",
               "(not in the paper) does a pooled model transfer to an emergency department it never saw?",
               "~40 min at 4 epochs: 6 held-out-site arms training on 5/6 of the data (~5.5 min each) "
               "and one central arm (~6.5)"),
)}


def experiment_arms(name: str, sites: list[str]) -> list[Arm]:
    """The arms of experiment `name` on a cohort with these sites, in table order."""
    if name == "modality":
        return [Arm("multimodal", "multimodal (notes + structured)", changes={"modality": "multimodal"}),
                Arm("text", "text only", changes={"modality": "text"}),
                Arm("structured", "structured only", changes={"modality": "structured"}),
                Arm("logistic-regression", "logistic regression (structured)", "baseline", estimator="logistic"),
                Arm("gradient-boosting", "gradient boosting (structured)", "baseline",
                    estimator="gradient_boosting")]
    if name == "settings":
        return [Arm("central", "centralized (pooled data)"), Arm("federated", "federated", "federated")]
    if name == "notes":
        arms = [Arm("all-sections", "all sections", changes={"note_sections": NOTE_SECTIONS})]
        arms += [Arm(f"without-{s}", f"without {s}",
                     changes={"note_sections": tuple(x for x in NOTE_SECTIONS if x != s)}) for s in NOTE_SECTIONS]
        for kept in (KEY_SECTIONS, OTHER_SECTIONS):
            arms.append(Arm("only-" + "-".join(kept), " + ".join(kept) + " only", changes={"note_sections": kept}))
        return arms
    if name == "subgroups":
        return [Arm("multimodal", "multimodal (notes + structured)")]
    if name == "loso":
        return [Arm("central", "central, all sites (in-distribution)")] + [
            Arm(f"holdout-{site}", f"{site} held out", held_out=site) for site in sites]
    raise EdfedError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")


def arm_parts(arm: Arm, cohort):
    """(train, val, test) tables of a central arm or baseline: the cohort's patient-level splits pooled,
    or, with a held-out site, the other sites' train/val splits and every visit of the held-out site."""
    split = cohort["split"]
    if not arm.held_out:
        return tuple(cohort[split == s] for s in ("train", "val", "test"))
    inside = cohort["site"] != arm.held_out
    if inside.all():
        raise EdfedError(f"site {arm.held_out} is not in the cohort")
    return cohort[inside & (split == "train")], cohort[inside & (split == "val")], cohort[~inside]


# --- running --------------------------------------------------------------------------------------

def run_experiment(name: str, data_dir: Path, out: Path | None = None, model: Path | None = None,
                   epochs: int | None = None, rounds: int | None = None, seed: int = 0,
                   epsilon: float | None = None, bootstrap: int = 200) -> dict:
    """Run every unfinished arm of experiment `name`, then write results.json, results.md, auroc.png."""
    from edfed.common.data import load_cohort
    from edfed.common.display import make_console

    started = time.perf_counter()
    experiment = EXPERIMENTS.get(name)
    if experiment is None:
        raise EdfedError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    if not experiment.federated and (rounds is not None or epsilon is not None):
        raise EdfedError(f"--rounds and --epsilon apply only to experiments with a federated arm (settings), "
                         f"not to {name!r}")
    if bootstrap < 0 or (rounds is not None and rounds < 1):
        raise EdfedError("--bootstrap must be 0 or more and --rounds at least 1")
    out = out or Path("runs") / f"experiment-{name}"
    settings = {"experiment": name, "data": str(data_dir.resolve()), "model": str(model.resolve()) if model else "",
                "epochs": epochs or TrainConfig.epochs, "seed": seed, "bootstrap": bootstrap,
                "rounds": (rounds or DEFAULT_ROUNDS) if experiment.federated else None,
                "epsilon": (math.inf if epsilon is None else epsilon) if experiment.federated else None}
    base = TrainConfig(model=settings["model"], seed=seed, epochs=settings["epochs"], bootstrap=bootstrap)
    cohort = load_cohort(data_dir, seed)  # every site passes the contract before anything is written
    arms = experiment_arms(name, sorted(cohort["site"].unique(), key=_site_order))
    _claim_folder(out, settings)
    console = make_console()
    console.print(f"experiment {name}: {len(arms)} arms in {out}")
    for k, arm in enumerate(arms, 1):
        arm_dir = out / arm.name
        if arm_finished(arm, arm_dir):
            console.print(f"[{k}/{len(arms)}] {arm.name}: finished earlier, not re-run")
            continue
        console.print(f"[{k}/{len(arms)}] {arm.name}: {arm.label}")
        if arm.kind == "central":
            _run_central_arm(name, arm, base, cohort, data_dir, arm_dir)
        elif arm.kind == "baseline":
            fit_structured_baseline(arm, base, cohort, data_dir, arm_dir)
        else:
            _run_federated_arm(settings, data_dir, arm_dir)
    summaries = {arm.name: json.loads((out / arm.name / "summary.json").read_text()) for arm in arms}
    results = collect_results(experiment, arms, summaries, settings, cohort, data_dir, out)
    results["wall_seconds"] = time.perf_counter() - started
    _write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    _write_plot(results, out / "auroc.png")
    print(arms_table(results))
    console.print(f"wrote {out / 'results.md'}, results.json and auroc.png ({results['wall_seconds']:.0f} s)")
    return results


def arm_finished(arm: Arm, arm_dir: Path) -> bool:
    """An arm is finished once its summary.json exists (a federated one: with its local-only baselines)."""
    path = arm_dir / "summary.json"
    if not path.exists():
        return False
    return arm.kind != "federated" or "local_only" in json.loads(path.read_text())


def _claim_folder(out: Path, settings: dict) -> None:
    """Record the experiment's settings; refuse a folder that holds the same arms under other settings."""
    path = out / "experiment.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != json.loads(json.dumps(settings)):
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise EdfedError(f"--out {out} holds an experiment run with other settings ({diff}: before, now); "
                             f"use the same settings to resume it, or another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


def _run_central_arm(name: str, arm: Arm, base: TrainConfig, cohort, data_dir: Path, arm_dir: Path) -> None:
    from edfed.simulations.central import train_central

    extra = {"experiment": name, "arm": arm.name}
    if arm.held_out:
        extra.update(held_out_site=arm.held_out, test_rows="every visit of the held-out site")
    config = base.replace(**arm.changes, extra=extra)
    train_central(config, data_dir, arm_dir, cohort=cohort, parts=arm_parts(arm, cohort),
                  title=f"{name}: {arm.label}", predictions=True)


def _run_federated_arm(settings: dict, data_dir: Path, arm_dir: Path) -> None:
    """`edfed simulate --local-baselines` into the arm's folder; an interrupted one is resumed."""
    from edfed.client.local_models import local_only_models
    from edfed.common.evaluation import write_summary
    from edfed.simulations.federated import run_simulate

    if (arm_dir / "summary.json").exists():  # the federation finished, its local-only baselines did not
        summary = json.loads((arm_dir / "summary.json").read_text())
        summary["local_only"] = local_only_models(summary["config"], data_dir, arm_dir / "local-only")
        write_summary(arm_dir, summary)
        return
    args = argparse.Namespace(
        data=data_dir, out=arm_dir, model=Path(settings["model"]) if settings["model"] else None,
        resume=arm_dir if (arm_dir / "run.json").exists() else None, rounds=settings["rounds"],
        epsilon=settings["epsilon"], seed=settings["seed"], modality="multimodal", local_baselines=True,
        verbose=False)
    run_simulate(args)


def fit_structured_baseline(arm: Arm, base: TrainConfig, cohort, data_dir: Path, out: Path) -> dict:
    """A non-neural model per outcome on the structured features (fixed transforms + missing flags).

    Same patient-level split as the neural arms: fitted on the training visits (rows without a label
    for an outcome are skipped for it), scored on the same test visits by the same code and bootstrap.
    """
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from edfed.common.contract import OUTCOMES
    from edfed.common.evaluation import score_test, write_summary
    from edfed.common.features import structured_feature_names, structured_features

    started = time.perf_counter()
    train, _, test = arm_parts(arm, cohort)
    x_train, x_test = structured_features(train), structured_features(test)
    y_train = train[list(OUTCOMES)].to_numpy(float)
    probs = np.zeros((len(test), len(OUTCOMES)))
    params = {}
    for k in range(len(OUTCOMES)):
        known = ~np.isnan(y_train[:, k])
        y = y_train[known, k].astype(int)
        if len(np.unique(y)) < 2:  # nothing to separate: predict the training prevalence
            probs[:, k] = y.mean() if len(y) else 0.5
            continue
        if arm.estimator == "logistic":
            model = LogisticRegression(max_iter=2000)
        elif arm.estimator == "gradient_boosting":
            model = HistGradientBoostingClassifier(random_state=base.seed)
        else:
            raise EdfedError(f"unknown baseline estimator {arm.estimator!r}")
        with threadpool_limits(1):  # a small model: OpenMP threads only contend with each other (10x slower)
            model.fit(x_train[known], y)
        probs[:, k] = model.predict_proba(x_test)[:, 1]
        params = {key: v if isinstance(v, int | float | str | bool | type(None)) else repr(v)
                  for key, v in model.get_params().items()}
    out.mkdir(parents=True, exist_ok=True)
    labels = test[list(OUTCOMES)].to_numpy(np.float32)
    final, per_site = score_test(test, labels, probs, data_dir, out, arm.label, base.bootstrap, base.seed,
                                 out / "predictions.parquet")
    summary = {
        "kind": "baseline",
        "config": {"estimator": arm.estimator, "params": params, "features": structured_feature_names(),
                   "seed": base.seed, "bootstrap": base.bootstrap, "data": str(data_dir),
                   "fitted_on": "training split (validation split unused: no model selection)"},
        "final": final, "per_site": per_site, "privacy": {}, "communication": {},
        "splits": {"train": len(train), "test": len(test)},
        "wall_seconds": time.perf_counter() - started,
    }
    write_summary(out, summary)
    return summary


# --- results ----------------------------------------------------------------------------------------

def collect_results(experiment: Experiment, arms: list[Arm], summaries: dict[str, dict], settings: dict,
                    cohort, data_dir: Path, out: Path) -> dict:
    """results.json: settings, every arm's pooled held-out metrics, and what the experiment adds."""
    results: dict[str, Any] = {
        "experiment": experiment.name, "description": experiment.summary, "mirrors": experiment.mirrors,
        "settings": settings, "command": _command(settings, out), "arms": {},
    }
    for arm in arms:
        s = summaries[arm.name]
        results["arms"][arm.name] = {
            "label": arm.label, "kind": arm.kind, "folder": arm.name,
            "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in arm.changes.items()},
            **({"held_out": arm.held_out} if arm.held_out else {}),
            **({"estimator": arm.estimator} if arm.estimator else {}),
            "final": s["final"], "mean_per_site_auroc": mean_per_site_auroc(s.get("per_site", {})),
            "wall_seconds": s.get("wall_seconds_total", s.get("wall_seconds")),
        }
    if experiment.name == "settings":
        results["local_only"] = _local_only(summaries["federated"], out / "federated", data_dir, settings)
        fed = summaries["federated"]
        eps = settings["epsilon"]
        results["arms"]["federated"]["label"] = (f"federated, {fed['config'].get('strategy', 'fedavg')}, "
                                                 + ("no DP" if math.isinf(eps) else f"DP epsilon {eps:g} per site"))
        results["arms"]["federated"]["wall_seconds"] = fed.get("wall_seconds")
    elif experiment.name == "notes":
        reference = results["arms"]["all-sections"]["final"]
        results["delta_auroc_vs_all_sections"] = {
            name: {o: m["final"][o]["auroc"] - reference[o]["auroc"] for o in reference}
            for name, m in results["arms"].items() if name != "all-sections"}
    elif experiment.name == "subgroups":
        table, labels, probs = _test_predictions(out / "multimodal", cohort[cohort["split"] == "test"])
        results["subgroups"] = subgroup_metrics(table, labels, probs, settings["bootstrap"], settings["seed"])
    elif experiment.name == "loso":
        results["loso"] = _loso(arms, summaries, cohort, out, settings)
    return results


def mean_per_site_auroc(per_site: dict[str, dict]) -> dict[str, float]:
    """Each outcome's AUROC averaged over sites (sites where it is undefined are skipped)."""
    outcomes = {o for site in per_site.values() for o in site}
    return {o: _nanmean([m[o]["auroc"] for m in per_site.values() if o in m]) for o in sorted(outcomes)}


def _local_only(summary: dict, fed_dir: Path, data_dir: Path, settings: dict) -> dict:
    """Each site's local-only model: its own test split (from the federated arm) and all of them pooled."""
    from edfed.common.evaluation import score_saved_predictions

    per_site = summary["local_only"]
    pooled = score_saved_predictions([fed_dir / "local-only" / site / "predictions.parquet" for site in per_site],
                                     data_dir, settings["bootstrap"], settings["seed"])
    wall = summary.get("wall_seconds_total", math.nan) - summary.get("wall_seconds", 0.0)
    return {"label": "local-only (each site its own data, no DP)", "final": pooled or {}, "per_site": per_site,
            "mean_per_site_auroc": mean_per_site_auroc(per_site),
            "wall_seconds": None if math.isnan(wall) else wall, "pooled_available": pooled is not None,
            "epochs": int(summary["config"]["num-server-rounds"]) * int(summary["config"]["local-epochs"])}


def _test_predictions(arm_dir: Path, test):
    """A central arm's test visits (cohort columns) with their labels and predicted risks, aligned."""
    import pandas as pd

    from edfed.common.contract import OUTCOMES

    predictions = pd.read_parquet(arm_dir / "predictions.parquet")
    risk_cols = [f"p_{o}" for o in OUTCOMES]
    table = test.drop(columns=[c for c in risk_cols if c in test]).merge(
        predictions[["site", "visit_id", *risk_cols]], on=["site", "visit_id"], how="inner", validate="one_to_one")
    if len(table) != len(test):
        raise EdfedError(f"{arm_dir}/predictions.parquet does not match the cohort's test visits "
                         f"({len(table)} of {len(test)} found); delete that arm's folder to re-run it")
    return table, table[list(OUTCOMES)].to_numpy(float), table[risk_cols].to_numpy(float)


AGE_BANDS = ("<50", "50-69", ">=70")


def subgroup_levels(table) -> dict[str, Any]:
    """Each row's level in every subgroup: age band, sex, site, and one vs several visits of its patient.

    Visits are counted per (site, patient_id) within `table`; splits are by patient, so a test table
    holds every visit of its patients.
    """
    import numpy as np
    import pandas as pd

    age = pd.cut(table["age"].astype(float), [-np.inf, 50, 70, np.inf], right=False, labels=list(AGE_BANDS))
    visits = table.groupby(["site", "patient_id"])["visit_id"].transform("size").to_numpy()
    return {"age": age.astype(str).to_numpy(), "sex": table["sex"].astype(str).to_numpy(),
            "site": table["site"].astype(str).to_numpy(),
            "visits": np.where(visits > 1, "several visits", "one visit")}


def subgroup_metrics(table, labels, probs, bootstrap: int = 200, seed: int = 0) -> dict:
    """{group: {level: {outcome: metrics incl. n and events}}}; each group's levels partition the rows."""
    from edfed.common.metrics import evaluate

    order = {"age": list(AGE_BANDS), "visits": ["one visit", "several visits"]}
    result = {}
    for group, level in subgroup_levels(table).items():
        present = set(level.tolist())
        levels = [v for v in order.get(group, []) if v in present] or sorted(present, key=_site_order)
        result[group] = {v: evaluate(labels[level == v], probs[level == v], bootstrap, seed) for v in levels}
    return result


def _loso(arms: list[Arm], summaries: dict, cohort, out: Path, settings: dict) -> dict:
    """Per held-out site: AUROC on all its visits, on its test split only, and the in-distribution
    central model's on that same test split (the fair comparison)."""
    from edfed.common.evaluation import oracle_risks
    from edfed.common.metrics import evaluate

    result = {}
    central = summaries["central"]["per_site"]
    for arm in arms:
        if not arm.held_out:
            continue
        rows = cohort[(cohort["site"] == arm.held_out) & (cohort["split"] == "test")]
        table, labels, probs = _test_predictions(out / arm.name, rows)
        result[arm.held_out] = {
            "all_visits": summaries[arm.name]["final"],
            "test_split": evaluate(labels, probs, settings["bootstrap"], settings["seed"],
                                   oracle_risks(Path(settings["data"]), table)),
            "in_distribution_test_split": central.get(arm.held_out, {}),
        }
    return result


# --- writing -----------------------------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_delta(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.3f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."


def _auroc_cell(m: dict | None) -> str:
    if not m:
        return "–"
    lo, hi = m.get("auroc_ci", [math.nan, math.nan])
    ci = "" if math.isnan(lo) else f" ({lo:.3f}-{hi:.3f})"
    return _fmt(m["auroc"]) + ci


def _table_rows(results: dict) -> list[dict]:
    """The main table's rows: every arm, plus the local-only row of `settings`."""
    rows = [{"name": name, **arm} for name, arm in results["arms"].items()]
    if "local_only" in results:
        rows.append({"name": "local-only", "kind": "local-only", **results["local_only"]})
    return rows


def arms_table(results: dict) -> str:
    """Markdown: arm, per outcome pooled AUROC (95% CI) and AUPRC (+ mean per-site AUROC for settings)."""
    from edfed.common.contract import OUTCOMES

    per_site = results["experiment"] == "settings"
    notes = results["experiment"] == "notes"
    header = ["arm"] + (["note sections"] if notes else [])
    for o in OUTCOMES:
        header += [f"{o} AUROC (95% CI)", f"{o} AUPRC"]
    if per_site:
        header += [f"{o} mean per-site AUROC" for o in OUTCOMES]
    header.append("wall time (s)")
    body = []
    for row in _table_rows(results):
        cells = [row["label"]]
        if notes:
            cells.append(", ".join(row.get("changes", {}).get("note_sections", [])))
        for o in OUTCOMES:
            m = row["final"].get(o)
            cells += [_auroc_cell(m), _fmt(m["auprc"]) if m else "–"]
        if per_site:
            cells += [_fmt(row["mean_per_site_auroc"].get(o)) for o in OUTCOMES]
        cells.append(_fmt(row.get("wall_seconds"), 0))
        body.append(cells)
    oracle = _shared_oracle(results)
    if oracle:
        body.append(["oracle (true risk), same rows"] + ([""] if notes else [])
                    + sum(([_fmt(oracle[o]), ""] for o in OUTCOMES), [])
                    + ([""] * len(OUTCOMES) if per_site else []) + [""])
    return "\n".join(markdown_table(header, body))


def _shared_oracle(results: dict) -> dict | None:
    """The oracle AUROC per outcome when every row was scored on the same visits (it is then identical)."""
    from edfed.common.contract import OUTCOMES

    finals = [r["final"] for r in _table_rows(results) if r["final"]]
    oracle = {}
    for o in OUTCOMES:
        values = {(m[o].get("oracle_auroc"), m[o]["n"]) for m in finals if o in m}
        if len(values) != 1 or next(iter(values))[0] is None:
            return None
        oracle[o] = next(iter(values))[0]
    return oracle


def results_markdown(results: dict) -> str:
    from edfed.common.contract import OUTCOMES

    s = results["settings"]
    federation = f", {_plural(s['rounds'], 'round')} (federated), epsilon {s['epsilon']:g}" if s["rounds"] else ""
    heading = ("## Per arm: the held-out site's every visit (central: the pooled test split)"
               if results["experiment"] == "loso" else "## Held-out test, pooled")
    lines = [f"# Experiment `{results['experiment']}`", "", _sentence(results["description"]), "",
             f"Mirrors: {_sentence(results['mirrors'])}", "", f"    {results['command']}", "",
             f"Data `{s['data']}`, encoder `{s['model'] or 'packaged default (all-MiniLM-L6-v2)'}`, "
             f"{_plural(s['epochs'], 'epoch')} (central){federation}, seed {s['seed']}, "
             f"{s['bootstrap']} bootstrap resamples for the 95% CIs. Total wall time of this invocation "
             f"{results['wall_seconds']:.0f} s (finished arms are not re-run).", "", heading, "", arms_table(results)]
    if results["experiment"] == "settings":
        lo = results["local_only"]
        lines.append(f"Per-site AUROC: each site's own test split, averaged over sites. Local-only: each site's "
                     f"model trained on its own data alone for {_plural(lo['epochs'], 'epoch')} (never DP); its pooled "
                     f"row scores every site's test visits with that site's own model. Its wall time is the "
                     f"federated arm's total minus the federation.\n")
    if "delta_auroc_vs_all_sections" in results:
        body = [[results["arms"][name]["label"]] + [_fmt_delta(d[o]) for o in OUTCOMES]
                for name, d in results["delta_auroc_vs_all_sections"].items()]
        lines += ["## AUROC difference from all sections", "", *markdown_table(["arm"] + list(OUTCOMES), body)]
    if "subgroups" in results:
        body = []
        for group, levels in results["subgroups"].items():
            for level, metrics in levels.items():
                n = max(m["n"] for m in metrics.values())
                body.append([group, level, str(n)] + [f"{_auroc_cell(metrics[o])} [{metrics[o]['events']}/"
                                                      f"{metrics[o]['n']}]" for o in OUTCOMES])
        lines += ["## Subgroups of the test split", "",
                  "AUROC (95% CI) [events/visits with a label]; each group's levels partition the test visits.", "",
                  *markdown_table(["group", "level", "visits"] + list(OUTCOMES), body)]
    if "loso" in results:
        lines += ["## Leave one site out", "",
                  "External: the model trained without the site, on every visit of it (all its visits are unseen, "
                  "so all are a fair external test). Test split: the same model on the site's test split only, "
                  "the rows the in-distribution central model (trained with the site's training split) is "
                  "scored on.", ""]
        for o in OUTCOMES:
            body, columns = [], []
            for site, r in results["loso"].items():
                ext, ind = r["test_split"].get(o, {}), r["in_distribution_test_split"].get(o, {})
                values = [r["all_visits"][o]["auroc"], ext.get("auroc", math.nan), ind.get("auroc", math.nan)]
                columns.append([*values, values[1] - values[2]])
                body.append([site, str(r["all_visits"][o]["n"]), _auroc_cell(r["all_visits"][o]),
                             _auroc_cell(ext), _auroc_cell(ind), _fmt_delta(columns[-1][3])])
            means = [_nanmean(c) for c in zip(*columns, strict=True)]
            body.append(["mean over sites", ""] + [_fmt(m) for m in means[:3]] + [_fmt_delta(means[3])])
            lines += [f"### {o}", "", *markdown_table(["held-out site", "visits", "external, all visits",
                                                       "external, test split", "in-distribution, test split",
                                                       "external - in-distribution (test split)"], body)]
    lines += ["![AUROC with 95% CI](auroc.png)", ""]
    return "\n".join(lines)


def _write_plot(results: dict, path: Path) -> None:
    from edfed.common.plots import plot_auroc_bars

    if "subgroups" in results:
        rows = {f"{g}: {level}": m for g, levels in results["subgroups"].items() for level, m in levels.items()}
    else:
        rows = {r["label"]: r["final"] for r in _table_rows(results) if r["final"]}
    plot_auroc_bars(rows, path, f"experiment {results['experiment']}: held-out AUROC")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=float))


def _command(settings: dict, out: Path) -> str:
    parts = ["edfed experiment", settings["experiment"], "--data", settings["data"], "--out", str(out)]
    if settings["model"]:
        parts += ["--model", settings["model"]]
    parts += ["--epochs", str(settings["epochs"]), "--seed", str(settings["seed"])]
    if settings["rounds"]:
        parts += ["--rounds", str(settings["rounds"]), "--epsilon", f"{settings['epsilon']:g}"]
    if settings["bootstrap"] != 200:
        parts += ["--bootstrap", str(settings["bootstrap"])]
    return " ".join(parts)


def _site_order(site: str):
    tail = site.rsplit("-", 1)[-1]
    return (0, int(tail), site) if tail.isdigit() else (1, 0, site)


# --- command line ------------------------------------------------------------------------------------

def experiments_listing() -> str:
    width = max(len(n) for n in EXPERIMENTS)
    lines = []
    for e in EXPERIMENTS.values():
        lines.append(f"  {e.name:<{width}}  {e.summary}")
        lines.append(f"  {'':<{width}}  cost (pretrained encoder, 2 cores): {e.cost}")
    return "\n".join(lines)


def add_experiment_parser(sub) -> None:
    """`edfed experiment NAME ...` on the `edfed` command's subparsers."""
    p = sub.add_parser(
        "experiment", help="the seed paper's comparisons as named experiments (--list names them)",
        description="Run a named experiment: one run per arm in OUT/ARM/ (an arm with a summary.json is not "
                    "re-run, so an interrupted experiment resumes), then OUT/results.json, results.md and "
                    "auroc.png. Use --model with a small encoder to try an experiment quickly.",
        epilog="experiments:\n" + experiments_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=list(EXPERIMENTS), metavar="NAME",
                   help="one of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--list", action="store_true", help="name the experiments, one line each, and exit")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR,
                   help="folder with site-K.parquet|csv files; only the default folder is generated (the simulated "
                        "cohort) when missing (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="experiment folder (default: runs/experiment-NAME)")
    p.add_argument("--model", type=Path, default=None,
                   help="local Hugging Face encoder directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every central arm (default 4)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"settings only: federated rounds of one local epoch (default {DEFAULT_ROUNDS})")
    p.add_argument("--epsilon", type=float, default=None,
                   help="settings only: per-site privacy budget of the federated arm (default inf: no DP)")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="bootstrap resamples for the 95%% CIs of central and baseline arms (default 200)")


def run_experiment_command(args: argparse.Namespace) -> None:
    if args.list:
        print(experiments_listing())
        return
    if not args.name:
        raise EdfedError(f"name an experiment: one of {', '.join(EXPERIMENTS)} (`edfed experiment --list` "
                         f"describes them)")
    from edfed.simulations.cohort import ensure_cohort

    run_experiment(args.name, ensure_cohort(args.data), args.out, args.model, args.epochs, args.rounds, args.seed,
                   args.epsilon, args.bootstrap)
