"""ROC and calibration figures (PNG) for a run's held-out predictions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from edfed.common.contract import OUTCOMES  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


SPARSE_BIN = 10  # a calibration bin with fewer visits is drawn hollow


def wilson_interval(events: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of each observed rate events/n: honest for small n (1 of 1 is [0.21, 1], not 1)."""
    n = np.maximum(np.asarray(n, dtype=float), 1e-12)
    rate = np.asarray(events, dtype=float) / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # min/max: at a rate of 0 or 1 the bound is the rate itself, which rounding must not move past it
    return np.clip(np.minimum(centre - half, rate), 0, 1), np.clip(np.maximum(centre + half, rate), 0, 1)


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width risk bins that hold visits: mean predicted risk, observed rate, its Wilson interval, count."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    filled = counts > 0
    events = np.bincount(which, y, bins)[filled]
    lo, hi = wilson_interval(events, counts[filled])
    return {"predicted": np.bincount(which, p, bins)[filled] / counts[filled], "observed": events / counts[filled],
            "low": lo, "high": hi, "n": counts[filled]}


def plot_roc_and_calibration(labels: np.ndarray, probs: np.ndarray, metrics: dict, out_dir: Path,
                             title: str, bins: int = 10, references: dict[str, np.ndarray] | None = None) -> list[Path]:
    """`roc.png` and `calibration.png`, one panel per outcome.

    ROC: the model's curve and each of `references` ({name: risks [n, 3]} on the same rows, e.g. the true risk of a
    simulated cohort, the regression peers), each with its AUROC; a legend entry only for a curve drawn.
    Calibration: each risk bin's observed rate with its 95% Wilson interval and its visit count (a sparse bin shows
    a wide interval, never a confident 1.0), and the calibration slope and intercept (common.metrics).
    """
    from edfed.common.metrics import calibration_slope_intercept

    out_dir.mkdir(parents=True, exist_ok=True)
    references = references or {}
    roc_fig, roc_axes = plt.subplots(1, len(OUTCOMES), figsize=(4.4 * len(OUTCOMES), 4.4))
    cal_fig, cal_axes = plt.subplots(1, len(OUTCOMES), figsize=(4.4 * len(OUTCOMES), 4.6))
    for k, name in enumerate(OUTCOMES):
        known = ~np.isnan(labels[:, k])
        y, p = labels[known, k], probs[known, k]
        m = metrics[name]
        ax = roc_axes[k]
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(title=name, xlabel="1 - specificity", ylabel="sensitivity")
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, c="C0", lw=2, label=f"model, AUROC {m['auroc']:.3f}")
            for j, (ref_name, ref) in enumerate(references.items()):
                r = ref[known, k]
                if np.isnan(r).any():
                    continue
                fpr, tpr, _ = roc_curve(y, r)
                ax.plot(fpr, tpr, lw=1.2, ls="--" if j == 0 else "-", c=f"C{j + 1}",
                        label=f"{ref_name}, AUROC {roc_auc_score(y, r):.3f}")
            ax.legend(loc="lower right", fontsize="small")
        else:
            ax.text(0.5, 0.4, "one class only:\nno curve", ha="center", c="grey")
        ax = cal_axes[k]
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(xlabel="predicted risk (bin mean)", ylabel="observed rate (95% CI)", xlim=(0, 1), ylim=(0, 1.1))
        if len(y) == 0:
            ax.set_title(name)
            continue
        b = calibration_bins(y, p, bins)
        slope, intercept = calibration_slope_intercept(y, p)
        # The numbers in the title, not a legend: a legend would hide the sparse bins' intervals.
        ax.set_title(f"{name}\nECE {m['ece']:.3f}, Brier {m['brier']:.3f}, slope {slope:.2f}, "
                     f"intercept {round(intercept, 2) + 0.0:.2f}", fontsize="medium")
        ax.errorbar(b["predicted"], b["observed"], yerr=[b["observed"] - b["low"], b["high"] - b["observed"]],
                    fmt="none", ecolor="C0", alpha=0.6, capsize=2)
        sparse = b["n"] < SPARSE_BIN
        size = 12 + 60 * np.sqrt(b["n"] / b["n"].max())
        ax.scatter(b["predicted"][~sparse], b["observed"][~sparse], s=size[~sparse], c="C0", zorder=3)
        ax.scatter(b["predicted"][sparse], b["observed"][sparse], s=size[sparse], facecolors="white",
                   edgecolors="C0", zorder=3)  # hollow: a handful of visits
        for x, top, n in zip(b["predicted"], b["high"], b["n"], strict=True):
            ax.annotate(str(n), (x, top), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7,
                        color="dimgrey")
    cal_fig.text(0.5, 0.01, f"Equal-width risk bins; the number above each is its visits, hollow under "
                 f"{SPARSE_BIN}. Slope and intercept: logistic recalibration (1 and 0 when calibrated).",
                 ha="center", fontsize="small", color="dimgrey")
    paths = []
    for fig, name in ((roc_fig, "roc.png"), (cal_fig, "calibration.png")):
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.04 if fig is cal_fig else 0, 1, 1))
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def plot_site_aurocs(models: dict[str, dict[str, dict]], path: Path, title: str) -> Path:
    """Each site's AUROC with its 95% interval, one panel per outcome, one marker per model ({model: {site:
    {outcome: metrics}}}, e.g. deployed, local-only, own stacked regression). A cell with fewer than MIN_CELL events
    or non-events is not drawn ("suppressed"), as in the report."""
    from edfed.common.metrics import MIN_CELL, small_cell

    sites = list(dict.fromkeys(site for per_site in models.values() for site in per_site))
    fig, axes = plt.subplots(1, len(OUTCOMES), figsize=(4.4 * len(OUTCOMES), 1.2 + 0.55 * len(sites) * 1.3),
                             sharey=True, squeeze=False)
    offsets = np.linspace(-0.25, 0.25, len(models)) if len(models) > 1 else np.zeros(1)
    lowest = 0.45
    for col, outcome in enumerate(OUTCOMES):
        ax, labelled = axes[0, col], set()
        for i, site in enumerate(sites):
            cells = {name: per_site.get(site, {}).get(outcome) for name, per_site in models.items()}
            if any(m and small_cell(m) for m in cells.values()):
                ax.text(0.5, i, f"  suppressed (<{MIN_CELL} events)", fontsize=7, c="grey", va="center")
                continue
            for j, (name, m) in enumerate(cells.items()):
                if not m or not np.isfinite(m.get("auroc", np.nan)):
                    continue
                auroc = m["auroc"]
                lo, hi = m.get("auroc_ci", [auroc, auroc])
                lowest = min(lowest, lo - 0.02)
                ax.errorbar([auroc], [i + offsets[j]], xerr=[[auroc - lo], [hi - auroc]], fmt="o", c=f"C{j}",
                            capsize=2, ms=4, label=None if name in labelled else name)
                labelled.add(name)
        ax.axvline(0.5, ls=":", c="grey")
        ax.set(title=outcome, xlabel="AUROC (95% CI), own test visits", yticks=range(len(sites)),
               yticklabels=sites)
    for ax in axes[0]:
        ax.set_xlim(max(0.0, lowest), 1.01)
    axes[0, 0].set_ylim(len(sites) - 0.5, -0.5)  # first site on top
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_auroc_bars(rows: dict[str, dict], path: Path, title: str) -> Path:
    """Grouped bars of AUROC with its 95% CI: one group per outcome, one bar per row (arm, site, level)."""
    fig, ax = plt.subplots(figsize=(max(7.0, 1.5 + 0.3 * len(rows) * len(OUTCOMES)), 5.0 + 0.18 * len(rows)))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(OUTCOMES))
    lowest = 0.4
    for k, (label, final) in enumerate(rows.items()):
        auroc = np.array([final.get(o, {}).get("auroc", np.nan) for o in OUTCOMES], dtype=float)
        ci = np.array([final.get(o, {}).get("auroc_ci", [np.nan, np.nan]) for o in OUTCOMES], dtype=float)
        errors = np.abs(np.stack([auroc - ci[:, 0], ci[:, 1] - auroc]))
        ax.bar(x - 0.4 + width * (k + 0.5), auroc, width, yerr=np.nan_to_num(errors), capsize=2, label=label)
        lowest = float(np.nanmin([lowest, *auroc, *ci[:, 0]]))
    ax.axhline(0.5, ls=":", c="grey")
    ax.set(xticks=x, xticklabels=list(OUTCOMES), ylabel="AUROC (95% CI)", ylim=(max(0.0, lowest - 0.05), 1.0),
           title=title)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_privacy_utility(points: pd.DataFrame, references: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """AUROC and AUPRC of each outcome against the per-site epsilon: the mean over seeds with a min-max band.

    `points`: a DataFrame with `epsilon`, `seed` and `<outcome>_auroc` / `<outcome>_auprc` columns. The x axis
    is logarithmic; epsilon = inf (no DP) has its own tick at the right, "∞", behind a thin separator, and its
    mean is also drawn across as the non-private level. `references` adds a dotted line per entry
    (name -> {"<outcome>_<metric>": value}), e.g. each site alone or the oracle.
    """
    finite = sorted(float(e) for e in points["epsilon"].unique() if np.isfinite(e))
    has_inf = bool(np.isinf(points["epsilon"]).any())
    inf_x = finite[-1] * 4 if finite else 1.0  # a factor 4 right of the largest budget, on the log axis
    fig, axes = plt.subplots(2, len(OUTCOMES), figsize=(4.4 * len(OUTCOMES), 7.6), sharex=True, squeeze=False)
    for row, metric in enumerate(("auroc", "auprc")):
        for col, outcome in enumerate(OUTCOMES):
            ax, key = axes[row, col], f"{outcome}_{metric}"
            stats = points.groupby("epsilon")[key].agg(["mean", "min", "max"])
            dp = stats[np.isfinite(stats.index)]
            if len(dp):
                ax.plot(dp.index, dp["mean"], "o-", c="C0", label="DP federation, mean over seeds")
                ax.fill_between(dp.index, dp["min"], dp["max"], color="C0", alpha=0.2, label="min-max over seeds")
            if has_inf:
                m = stats.loc[np.inf]
                ax.errorbar([inf_x], [m["mean"]], yerr=[[m["mean"] - m["min"]], [m["max"] - m["mean"]]], fmt="s",
                            c="C3", capsize=3, label="federation without DP (ε = ∞)")
                ax.axhline(m["mean"], ls="--", lw=1, c="C3")
            for k, (name, ref) in enumerate(references.items()):
                if np.isfinite(ref.get(key, np.nan)):
                    ax.axhline(ref[key], ls=":", lw=1.5, c=f"C{k + 4}", label=name)
            ax.set_xscale("log")
            ax.set_xticks(finite + ([inf_x] if has_inf else []))
            ax.set_xticklabels([f"{e:g}" for e in finite] + (["∞"] if has_inf else []))
            ax.minorticks_off()
            if finite and has_inf:
                ax.axvline(np.sqrt(finite[-1] * inf_x), c="grey", lw=0.6)
            ax.set_xlim((finite[0] if finite else inf_x) / 1.6, inf_x * 1.6)
            ax.set(title=outcome if row == 0 else None, ylabel=metric.upper() if col == 0 else None,
                   xlabel="per-site ε (log scale)" if row == 1 else None)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
