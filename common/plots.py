"""ROC and calibration figures (PNG) for a run's held-out predictions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from common.contract import OUTCOMES  # noqa: E402


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
