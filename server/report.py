"""`edfed report RUN_DIR`: a finished run's numbers as one Markdown page, readable without opening any JSON.

It renders whatever the folder holds: a central or federated run (summary.json with `final`), a privacy
sweep (kind `privacy-sweep`), or any experiment folder (subfolders with summary.json, results.md, CSVs).
Figures the run wrote are linked relatively, so the page works wherever the folder is copied.

Small cells are suppressed: in per-site, per-subgroup and local-only tables, an outcome with fewer than
`MIN_CELL` events or non-events shows no numbers (no metric, no count), as in a published table. Pooled
results are shown whole. Only aggregates are ever read: no row, note or identifier reaches the page.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from edfed.common.contract import OUTCOMES
from edfed.common.errors import EdfedError
from edfed.common.files import SHARED_FILE_MODE, atomic_write_text
from edfed.common.markdown import markdown_table
from edfed.common.metrics import MIN_CELL, SUPPRESSED, small_cell  # noqa: F401  (one rule for the log and the report)

_KNOWN_KEYS = {"kind", "run_id", "config", "final", "per_site", "privacy", "communication", "rounds",
               "site_reports", "rejected_updates", "client_train_seconds", "client_step_seconds", "num_rounds",
               "wall_seconds", "wall_seconds_total", "federation_overhead", "history", "splits", "local_only",
               "deployment", "subgroups", "sites", "refused_sites", "peers"}
_SKIP_DIRS = {"cache", "checkpoints", "adapter", "ledgers", "oracle"}


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"


def _with_ci(m: dict, name: str) -> str:
    lo, hi = m.get(f"{name}_ci", [None, None])
    value = _num(m.get(name))
    return value if lo is None or value == "n/a" else f"{value} ({_num(lo)}–{_num(hi)})"


def _is_metrics(value: Any) -> bool:
    return isinstance(value, dict) and "auroc" in value


def _is_outcome_map(value: Any) -> bool:
    """{outcome: metrics}, the shape of `final` and of each per-site or subgroup entry."""
    return isinstance(value, dict) and bool(value) and all(_is_metrics(v) for v in value.values())


def pooled_table(final: dict) -> list[str]:
    oracle = any("oracle_auroc" in m for m in final.values())
    slope = any("calibration_slope" in m for m in final.values())
    header = ["outcome", "AUROC (95% CI)", "AUPRC (95% CI)",
              *(["calibration slope", "calibration intercept"] if slope else []), "Brier", "ECE",
              *(["oracle AUROC"] if oracle else []), "n", "events"]
    rows = [[o, _with_ci(m, "auroc"), _with_ci(m, "auprc"),
             *([_num(m.get("calibration_slope"), 2), _num(m.get("calibration_intercept"), 2)] if slope else []),
             _num(m.get("brier")), _num(m.get("ece")),
             *([_num(m.get("oracle_auroc"))] if oracle else []), _num(m.get("n")), _num(m.get("events"))]
            for o, m in _ordered(final)]
    return markdown_table(header, rows)


def cell_table(cells: dict[str, dict], label: str, suppress: bool = True) -> list[str]:
    """{label value: {outcome: metrics}} as one row per (label value, outcome), small cells suppressed
    (`suppress=False` only for pooled results, which are shown whole like a run's pooled table)."""
    oracle = any("oracle_auroc" in m for outcomes in cells.values() for m in outcomes.values())
    header = [label, "outcome", "AUROC (95% CI)", "AUPRC (95% CI)", "Brier", "ECE",
              *(["oracle AUROC"] if oracle else []), "n", "events"]
    rows = []
    for name, outcomes in cells.items():
        for outcome, m in _ordered(outcomes):
            if suppress and small_cell(m):
                rows.append([name, outcome, SUPPRESSED, *["—"] * (len(header) - 3)])
            else:
                rows.append([name, outcome, _with_ci(m, "auroc"), _with_ci(m, "auprc"), _num(m.get("brier")),
                             _num(m.get("ece")), *([_num(m.get("oracle_auroc"))] if oracle else []),
                             _num(m.get("n")), _num(m.get("events"))])
    return markdown_table(header, rows)


def _ordered(outcomes: dict) -> list[tuple[str, dict]]:
    known = [(o, outcomes[o]) for o in OUTCOMES if o in outcomes]
    return known + [(o, m) for o, m in outcomes.items() if o not in OUTCOMES]


def nested_metrics(title: str, value: dict, level: int = 3) -> list[str]:
    """Any nesting of dicts that ends in {outcome: metrics}: a heading per level, a table at the bottom.

    {group: {level: {outcome: metrics}}} (subgroups) becomes one table per group, rows by level.
    """
    heading = "#" * min(level, 6) + f" {title}"
    if all(isinstance(v, dict) and _is_outcome_map(v.get("final")) for v in value.values()):
        # runs side by side, e.g. an experiment's arms: their pooled results, one table
        finals = {str(v.get("label", k)): v["final"] for k, v in value.items()}
        return [heading, "", *cell_table(finals, "run", suppress=False)]
    if _is_outcome_map(value):
        return [heading, "", *cell_table({title: value}, "group")]
    if all(_is_outcome_map(v) for v in value.values()):
        return [heading, "", *cell_table(value, "level")]
    lines = [heading, ""]
    for key, child in value.items():
        if isinstance(child, dict) and _holds_metrics(child):
            lines += nested_metrics(str(key), child, level + 1)
    return lines


def _holds_metrics(value: Any, depth: int = 0) -> bool:
    if _is_metrics(value):
        return True
    return isinstance(value, dict) and depth < 6 and any(_holds_metrics(v, depth + 1) for v in value.values())


def _scalar_table(rows: dict[str, dict], label: str) -> list[str]:
    """{name: {key: scalar}} as a table, one column per key seen."""
    keys = list(dict.fromkeys(k for r in rows.values() for k, v in r.items() if not isinstance(v, dict | list)))
    return markdown_table([label, *keys], [[name, *(_num(r.get(k)) for k in keys)] for name, r in rows.items()])


# What a site declared when it joined: yes/no flags, and what it had spent then is left out (the privacy table
# shows what it spent in the run; 0 beside it reads as a contradiction).
_JOIN_FLAGS = {"patient-level", "releases-metrics"}
_JOIN_HIDDEN = {"epsilon-spent"}


def sites_table(sites: dict[str, dict]) -> list[str]:
    """The sites that joined: node ids as plain ids, flags as yes/no."""
    keys = list(dict.fromkeys(k for r in sites.values() for k, v in r.items()
                              if not isinstance(v, dict | list) and k not in _JOIN_HIDDEN))

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "—"
        if key == "node":
            return str(value)
        if key in _JOIN_FLAGS and isinstance(value, int | float):
            return "yes" if value else "no"
        return _num(value)

    return markdown_table(["site", *keys], [[name, *(cell(k, r.get(k)) for k in keys)] for name, r in sites.items()])


def _figures(run_dir: Path, names: list[str]) -> list[str]:
    return [f"![{Path(n).stem}]({n})" for n in names if (run_dir / n).exists()] + [""]


def _privacy(summary: dict) -> list[str]:
    privacy = summary.get("privacy") or {}
    lines = ["## Privacy", ""]
    if not privacy:
        kind = summary.get("kind")
        return [*lines, "No differential privacy: " + ("pooled training on one machine." if kind == "central"
                                                      else "no site trained with DP."), ""]
    secure = any("secagg_sites" in p for p in privacy.values())  # docs/secure-aggregation.md
    rows = [[site, _num(p.get("epsilon")), _num(p.get("budget")), _setting(p.get("delta")),
             _num(p.get("noise_multiplier")), _num(p.get("sample_rate"), 4), _num(p.get("steps")),
             _num(p.get("refused_rounds")),
             *([_num(p.get("secagg_sites")), _num(p.get("epsilon_without_secagg"))] if secure else [])]
            for site, p in privacy.items()]
    lines += markdown_table(["site", "ε spent", "ε budget", "δ", "noise multiplier", "sample rate", "steps",
                             "refused rounds", *(["t", "ε without secure aggregation"] if secure else [])], rows)
    lines += [] if not secure else ["Secure aggregation: the noise multiplier is the sum's, with t sites' "
                                    "shares in it; ε without secure aggregation is each site's from its own shares "
                                    "alone (SecAgg+ broken, or the coordinator colluding with every other site).", ""]
    return [*lines, "ε is per site and privacy unit (patient by default; the ledger records which), from the RDP "
            "accountant; ∞ means the site trained without DP.", ""]


def _communication_and_time(summary: dict) -> list[str]:
    lines = ["## Communication and time", ""]
    comm = summary.get("communication") or {}
    if comm.get("bytes_sent_per_client_round"):
        share = comm.get("share_of_full_model")
        lines.append(f"- each site sends {comm['bytes_sent_per_client_round']:,} bytes per round"
                     + (f" ({100 * share:.2f}% of the full model's {comm.get('full_model_bytes', 0):,})"
                        if share is not None else ""))
    elif comm:
        lines.append(f"- nothing is sent (pooled training); trainable part {_num(comm.get('trainable_bytes'))} "
                     f"bytes of the full model's {_num(comm.get('full_model_bytes'))}")
    for key, text in (("wall_seconds", "wall time of the training and evaluation"),
                      ("wall_seconds_total", "wall time of the whole command"),
                      ("client_train_seconds", "summed time the sites spent in their rounds"),
                      ("federation_overhead", "overhead ratio (wall time / summed site time)")):
        if isinstance(summary.get(key), int | float):
            unit = "" if key == "federation_overhead" else " s"
            lines.append(f"- {text}: {_num(summary[key], 2 if key == 'federation_overhead' else 1)}{unit}")
    return [*lines, ""]


def _audit(run_dir: Path) -> list[str]:
    path = run_dir / "audit.json"
    if not path.exists():
        return []
    a = json.loads(path.read_text())
    rows = [[a.get("site", "?"), _num(a.get("n_members")), _num(a.get("n_nonmembers")), _num(a.get("auroc")),
             _num(a.get("tpr_at_fpr_1pct")), _num(a.get("tpr_at_fpr_10pct")), _num(a.get("best_balanced_accuracy")),
             a.get("model", "?")]]
    return ["## Membership-inference audit", "",
            f"Attack: {a.get('attack', 'loss threshold')}; members = the site's {a.get('members', 'train split')}, "
            f"non-members = its {a.get('nonmembers', 'test split')}, balanced. AUROC 0.5 = the attacker learns "
            "nothing about who was trained on.", "",
            *markdown_table(["site", "members", "non-members", "attack AUROC", "TPR @ 1% FPR", "TPR @ 10% FPR",
                             "best balanced accuracy", "model"], rows)]


def _setting(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, list) else _num(value)


def _settings(config: dict) -> list[str]:
    flat = {k: v for k, v in config.items() if not isinstance(v, dict | list)}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, dict)})
    rows = [[k, _setting(v)] for k, v in flat.items()]
    return ["## Settings", "", *markdown_table(["setting", "value"], rows)] if rows else []


def _provenance(summary: dict) -> list[str]:
    """The code, libraries, machine and date that made the run (summary.json's `provenance`), in one line."""
    p = summary.get("provenance")
    if not isinstance(p, dict):
        return []
    commit = p.get("git_commit")
    code = f"edfed {p.get('edfed')}" + (f", commit {commit[:12]}" if commit else ", not from a git checkout")
    if p.get("git_dirty"):
        code += " with uncommitted changes"
    libraries = ", ".join(f"{k} {v}" for k, v in (p.get("packages") or {}).items() if v)
    return ["## Provenance", "",
            f"{code}; Python {p.get('python')}, {libraries}; CPU {p.get('cpu')} "
            f"(avx512_bf16 {'yes' if p.get('avx512_bf16') else 'no'}); written {p.get('date_utc')}.", ""]


def _model_label(summary: dict) -> str:
    config = summary.get("config", {})
    if summary.get("kind") == "federated":
        return "federated model"
    return f"edfed {config.get('modality', 'model')}".strip()


def peers_tables(summary: dict) -> list[str]:
    """The model next to its regression peers (`common.peers`) on the same test rows: pooled, and for a federation
    each site's model AUROC next to that site's own regressions (small cells suppressed)."""
    from edfed.common.peers import PEER_LABELS

    peers, final = summary["peers"], summary.get("final", {})
    label = _model_label(summary)
    method = peers.get("method", {})
    rows = [[label, *(_with_ci(final[o], "auroc") if o in final else "—" for o in OUTCOMES)]]
    rows += [[PEER_LABELS.get(p, p), *(_with_ci(m[o], "auroc") if o in m else "—" for o in OUTCOMES)]
             for p, m in peers.get("pooled", {}).items()]
    if any("oracle_auroc" in m for m in final.values()):
        rows.append(["true risk (oracle ceiling)", *(_num(final.get(o, {}).get("oracle_auroc")) for o in OUTCOMES)])
    lines = ["## The model against its regression peers (held-out test, pooled, same rows)", "",
             *markdown_table(["model", *(f"{o} AUROC (95% CI)" for o in OUTCOMES)], rows),
             f"Peers fitted on the {_num(method.get('train_rows'))} training visits only and scored on the same "
             f"{_num(peers.get('test_rows'))} test visits as the model: L2 logistic regression per outcome, C chosen "
             f"by cross-validated AUROC ({method.get('cv_folds', '?')} folds); structured = edfed's structured "
             "features with missingness indicators and an arrival-date spline; TF-IDF = word 1-2 grams of the "
             "three notes (any language); stacked = a logistic regression on the two peers' out-of-fold logits. "
             f"Fitted in {_num(peers.get('seconds'), 1)} s.", ""]
    local = peers.get("local") or {}
    if local:
        names = [p for p in PEER_LABELS if any(p in v for v in local.values())]
        local_only = summary.get("local_only") or {}
        header = ["site", "outcome", f"{label} AUROC", *(f"site's own {p} regression" for p in names),
                  *(["site's own edfed model (local-only)"] if local_only else []), "n", "events"]
        body = []
        for site, own in local.items():
            for outcome in OUTCOMES:
                cell = own[names[0]].get(outcome, {})
                if small_cell(cell):
                    body.append([site, outcome, SUPPRESSED, *["—"] * (len(header) - 3)])
                    continue
                model = summary.get("per_site", {}).get(site, {}).get(outcome, {})
                body.append([site, outcome, _num(model.get("auroc")),
                             *(_num(own[p][outcome].get("auroc")) for p in names),
                             *([_num(local_only.get(site, {}).get(outcome, {}).get("auroc"))] if local_only else []),
                             _num(cell.get("n")), _num(cell.get("events"))])
        lines += ["## Per site: the model against each site's own regressions", "",
                  "Each site's regressions are fitted on that site's training visits alone and scored on its own "
                  "test visits, like a hospital that keeps its data and fits the regression itself.", "",
                  *markdown_table(header, body)]
    return lines


def deployment_tables(deployment: dict) -> list[str]:
    """Each site's deployed model against what it can build alone (its local-only model and its own stacked
    regression), and the other candidates, per outcome; then the mean paired gains over sites."""
    alone = ("local-only", "regression: stacked")
    others = [c for c in ("global", "global + regressions", "personalized") if c in deployment]
    header = ["site", "outcome", "deployed", "blend of", *alone, *others]
    rows = []
    for site, outcomes in deployment.get("deployed", {}).items():
        for outcome, m in _ordered(outcomes):
            if small_cell(m):
                rows.append([site, outcome, SUPPRESSED, *["—"] * (len(header) - 3)])
                continue
            rows.append([site, outcome, _num(m.get("auroc")), deployment["choices"][site][outcome],
                         *(_num(deployment[c][site][outcome].get("auroc")) if c in deployment else "—"
                           for c in (*alone, *others))])
    gains = []
    for label, key in (("local-only", "gain_over_local_only"), ("own stacked regression", "gain_over_own_regression")):
        gains += [[f"deployed - {label}", o, _num(g["mean_gain"]),
                   f"[{_num(g['mean_gain_ci'][0])}, {_num(g['mean_gain_ci'][1])}]", _num(g["sites"])]
                  for o, g in deployment.get(key, {}).items()]
    return ["## Each site's deployed model against what it can build alone (own test visits, AUROC)", "",
            "Per outcome, the global model stacked with the site's regressions, blended with its local-only model "
            "(a part below chance on the site's validation split is left out), recalibrated there; none of it "
            "leaves the site.", "", *markdown_table(header, rows),
            *markdown_table(["comparison", "outcome", "mean over sites", "paired 95% CI", "sites"], gains)]


SITES_FIGURE = "sites.png"


def site_models(summary: dict) -> dict[str, dict]:
    """{model: {site: {outcome: metrics}}} for the per-site figure: each site's deployed model against its
    local-only model and its own stacked regression where the run chose them, else the global model's per-site
    scores against what the summary has of the site alone."""
    deployment = summary.get("deployment") or {}
    if deployment.get("deployed"):
        names = {"deployed": "deployed", "local-only": "local-only", "regression: stacked": "own stacked regression"}
        return {label: deployment[key] for key, label in names.items() if deployment.get(key)}
    models = {}
    if summary.get("per_site"):
        models["global model"] = summary["per_site"]
    if summary.get("local_only"):
        models["local-only"] = summary["local_only"]
    local_peers = (summary.get("peers") or {}).get("local") or {}
    if any("stacked" in v for v in local_peers.values()):
        models["own stacked regression"] = {site: v["stacked"] for site, v in local_peers.items() if "stacked" in v}
    return models if len(models) > 1 or (models and summary.get("kind") == "federated") else {}


def _site_figure(run_dir: Path, summary: dict) -> list[str]:
    models = {name: per_site for name, per_site in site_models(summary).items() if per_site}
    if not models:  # nothing per site to draw (a deployment summary may hold empty ones)
        return []
    from edfed.common.plots import plot_site_aurocs

    plot_site_aurocs(models, run_dir / SITES_FIGURE, "each site's AUROC on its own test visits")
    os.chmod(run_dir / SITES_FIGURE, SHARED_FILE_MODE)  # aggregates only, small cells left out, like the page
    return ["## Each site, on its own test visits", "",
            f"{', '.join(models)}: AUROC with its 95% interval (bootstrap; the site's own regressions are point "
            f"estimates). Cells with fewer than {MIN_CELL} events or non-events are not drawn.", "",
            f"![sites]({SITES_FIGURE})", ""]


def render_run(run_dir: Path, summary: dict) -> list[str]:
    """A central or federated run (or any summary with `final`)."""
    kind = summary.get("kind", "run")
    lines = [f"# {kind.capitalize()} run: {run_dir.name}", ""]
    config = summary.get("config", {})
    facts = [f"{k} {config[k]}" for k in ("modality", "strategy", "num-server-rounds", "epsilon", "epochs", "seed")
             if k in config]
    if facts:
        lines += [", ".join(facts) + (f"; run id {summary['run_id']}" if "run_id" in summary else "") + ".", ""]
    if summary.get("final"):
        lines += ["## Held-out test, pooled", "", *pooled_table(summary["final"])]
        lines += _figures(run_dir, ["roc.png", "calibration.png"])
    if summary.get("peers"):
        lines += peers_tables(summary)
    if summary.get("per_site"):
        lines += ["## Per site (each site's own test visits)", "", *cell_table(summary["per_site"], "site")]
    if summary.get("local_only"):
        lines += ["## Each site alone (local-only model, no federation)", "",
                  *cell_table(summary["local_only"], "site")]
    if summary.get("deployment"):
        lines += deployment_tables(summary["deployment"])
    lines += _site_figure(run_dir, summary)
    if summary.get("subgroups"):
        lines += nested_metrics("Subgroups", summary["subgroups"], level=2)
    for key, value in summary.items():  # anything else that holds metrics, e.g. added by newer code
        if key not in _KNOWN_KEYS and isinstance(value, dict) and _holds_metrics(value):
            lines += nested_metrics(key.replace("_", " ").capitalize(), value, level=2)
    if summary.get("rounds"):
        rounds = summary["rounds"]
        outcomes = list(next(iter(rounds.values())))
        lines += ["## Pooled validation AUROC per round", "",
                  *markdown_table(["round", *outcomes],
                                  [[r, *(_num(v.get(o)) for o in outcomes)] for r, v in rounds.items()])]
    if summary.get("history"):
        lines += ["## Training history", "",
                  *markdown_table(["epoch", "train loss", "validation mean AUROC", "seconds"],
                                  [[_num(h.get("epoch")), _num(h.get("loss")), _num(h.get("val_mean_auroc")),
                                    _num(h.get("seconds"), 1)] for h in summary["history"]])]
    if kind in ("central", "federated") or summary.get("privacy"):
        lines += _privacy(summary)
    if summary.get("sites"):
        lines += ["## Sites that joined", "", *sites_table(summary["sites"])]
    for key, title in (("refused_sites", "Sites left out"), ("rejected_updates", "Updates left out")):
        if summary.get(key):
            lines += [f"## {title}", "", *_scalar_table({str(k): r for k, r in enumerate(summary[key], 1)}, "#")]
    lines += _communication_and_time(summary)
    lines += _audit(run_dir)
    lines += _settings(config)
    lines += _provenance(summary)
    return lines


def render_sweep(run_dir: Path, summary: dict) -> list[str]:
    lines = [f"# Privacy sweep: {run_dir.name}", ""]
    if (run_dir / "results.md").exists():
        body = (run_dir / "results.md").read_text().strip().splitlines()
        if body and body[0].startswith("# "):  # its title: the report has its own
            body = body[1:]
        lines += [*"\n".join(body).strip().splitlines(), ""]
    rows = [[b["epsilon"], _num(b.get("epsilon_spent_max"), 2), f"{_num(b.get('attack_auroc'))}"
             + (f" ± {_num(b['attack_auroc_sd'])}" if math.isfinite(b.get("attack_auroc_sd", math.nan)) else ""),
             _num(b.get("attack_tpr_at_fpr_1pct"))] for b in summary.get("budget_vs_leakage", [])]
    if rows:
        lines += ["## Formal budget against measured leakage", "",
                  *markdown_table(["ε (budget)", "max ε spent", "attack AUROC", "TPR @ 1% FPR"], rows),
                  "The budget bounds any attacker; the attack AUROC is what one simple attacker reaches (0.5 = none).",
                  ""]
    return lines + _provenance(summary)


def _flat_rows(value: Any) -> bool:
    """{name: {key: scalar}}, e.g. per-arm AUROC differences."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(v, dict) and v and not any(isinstance(x, dict | list) for x in v.values()) for v in value.values())


def render_folder(run_dir: Path) -> list[str]:
    """A folder without a run summary of its own (an experiment, say): what its summary.json or results.json
    holds, rendered here with small cells suppressed, its CSVs and figures, else its results.md."""
    lines = [f"# {run_dir.name}", ""]
    rendered = False
    for name in ("summary.json", "results.json"):
        if not (run_dir / name).exists():
            continue
        try:
            data = json.loads((run_dir / name).read_text())
        except ValueError as exc:
            raise EdfedError(f"{run_dir / name} is not valid JSON ({exc})") from exc
        scalars = {k: v for k, v in data.items() if isinstance(v, int | float | str)}
        if scalars:
            lines += markdown_table(["", "value"], [[k, _num(v)] for k, v in scalars.items()])
        for key, value in data.items():
            title = key.replace("_", " ").capitalize()
            if isinstance(value, dict) and _holds_metrics(value):
                lines += nested_metrics(title, value, level=2)
                rendered = True
            elif _flat_rows(value):
                lines += [f"## {title}", "", *_scalar_table(value, "")]
        for key in ("settings", "config"):
            if isinstance(data.get(key), dict):
                lines += _settings(data[key])
    if (run_dir / "results.md").exists():
        if rendered:  # its own tables may show small cells: link it, do not copy it
            lines += ["The folder's own write-up: [results.md](results.md).", ""]
        else:
            lines += [line.replace("# ", "## ", 1) if line.startswith("# ") else line
                      for line in (run_dir / "results.md").read_text().splitlines()] + [""]
    for csv in sorted(run_dir.glob("*.csv")):
        if csv.with_suffix(".md").exists():
            continue  # already shown as Markdown
        lines += [f"## {csv.name}", "", *_csv_table(csv)]
    return lines


def _csv_table(path: Path, max_rows: int = 100) -> list[str]:
    import pandas as pd

    frame = pd.read_csv(path)
    shown = frame.head(max_rows)
    rows = [[_num(v) if isinstance(v, float) else str(v) for v in row] for row in shown.itertuples(index=False)]
    more = [f"({len(frame) - max_rows} more rows in [{path.name}]({path.name}))", ""] if len(frame) > max_rows else []
    return [*markdown_table([str(c) for c in frame.columns], rows), *more]


def _child_runs(run_dir: Path, max_depth: int = 3) -> list[Path]:
    """The outermost subfolders holding a summary.json (each one's report lists its own), skipping model and
    cache folders and links."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        here = Path(root)
        depth = len(here.relative_to(run_dir).parts)
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not (here / d).is_symlink()
                         and depth < max_depth)
        if here != run_dir and "summary.json" in files:
            found.append(here)
            dirs[:] = []
    return found


def _children(run_dir: Path) -> list[str]:
    rows = []
    for child in _child_runs(run_dir):
        rel = child.relative_to(run_dir).as_posix()
        try:
            summary = json.loads((child / "summary.json").read_text())
            write_report(child)
            link = f"[{rel}]({rel}/report.md)"
        except (ValueError, OSError, KeyError, TypeError, AttributeError, EdfedError):
            summary, link = {}, f"{rel} (summary unreadable)"
        final = summary.get("final") if isinstance(summary.get("final"), dict) else {}
        rows.append([link, str(summary.get("kind", "?")),
                     *(_num(final.get(o, {}).get("auroc")) for o in OUTCOMES),
                     _num(summary.get("wall_seconds_total", summary.get("wall_seconds")), 0)])
    if not rows:
        return []
    header = ["run", "kind", *(f"{o} AUROC" for o in OUTCOMES), "wall s"]
    return ["## Runs in this folder", "", *markdown_table(header, rows)]


def render_report(run_dir: Path) -> str:
    """The report of `run_dir` as Markdown (figure and sub-report links relative to `run_dir`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdfedError(f"{run_dir}: no such folder")
    summary = {}
    if (run_dir / "summary.json").exists():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except ValueError as exc:
            raise EdfedError(f"{run_dir / 'summary.json'} is not valid JSON ({exc})") from exc
    if summary.get("kind") == "privacy-sweep":
        lines = render_sweep(run_dir, summary)
    elif summary.get("final"):
        lines = render_run(run_dir, summary)
    else:
        lines = render_folder(run_dir)
    children = _children(run_dir)
    if len(lines) <= 2 and not children:
        raise EdfedError(f"{run_dir}: nothing to report (no summary.json, results.md or CSV, and no subfolder "
                         "holding a run)")
    linked = "\n".join(lines)
    extra = [p.name for p in sorted(run_dir.glob("*.png")) if f"({p.name})" not in linked]
    if extra:
        lines += ["## Other figures", "", *_figures(run_dir, extra)]
    return "\n".join([*lines, *children]).rstrip() + "\n"


def write_report(run_dir: Path) -> Path:
    """Render RUN_DIR/report.md (atomically; sub-runs get their own report.md, linked); returns its path.
    Readable by others, unlike the run's other files: it is the page meant to be published."""
    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / "report.md", render_report(run_dir), SHARED_FILE_MODE)
