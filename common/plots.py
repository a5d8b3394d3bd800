"""ROC and calibration figures (PNG) for a run's held-out predictions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from common.contract import OUTCOMES  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


def plot_roc_and_calibration(labels: np.ndarray, probs: np.ndarray, metrics: dict, out_dir: Path,
                             title: str, bins: int = 10) -> list[Path]:
    """`roc.png` and `calibration.png`, one panel per outcome, AUROC / ECE in each legend."""
    out_dir.mkdir(parents=True, exist_ok=True)
    roc_fig, roc_axes = plt.subplots(1, len(OUTCOMES), figsize=(4.2 * len(OUTCOMES), 4.2))
    cal_fig, cal_axes = plt.subplots(1, len(OUTCOMES), figsize=(4.2 * len(OUTCOMES), 4.2))
    for k, name in enumerate(OUTCOMES):
        known = ~np.isnan(labels[:, k])
        y, p = labels[known, k], probs[known, k]
        m = metrics[name]
        ax = roc_axes[k]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"model AUROC {m['auroc']:.3f}")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(title=name, xlabel="1 - specificity", ylabel="sensitivity")
        if "oracle_auroc" in m:
            ax.plot([], [], " ", label=f"oracle AUROC {m['oracle_auroc']:.3f}")
        ax.legend(loc="lower right")
        ax = cal_axes[k]
        edges = np.linspace(0, 1, bins + 1)
        which = np.minimum((p * bins).astype(int), bins - 1)
        filled = np.bincount(which, minlength=bins) > 0
        mean_p = np.bincount(which, p, bins)[filled] / np.bincount(which, minlength=bins)[filled]
        mean_y = np.bincount(which, y, bins)[filled] / np.bincount(which, minlength=bins)[filled]
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.plot(mean_p, mean_y, "o-", label=f"ECE {m['ece']:.3f}, Brier {m['brier']:.3f}")
        ax.hist(p, bins=edges, weights=np.full(len(p), 0.5 / max(len(p), 1)), alpha=0.3, color="C1")
        ax.set(title=name, xlabel="predicted risk", ylabel="observed rate", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    paths = []
    for fig, name in ((roc_fig, "roc.png"), (cal_fig, "calibration.png")):
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


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
