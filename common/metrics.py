"""Discrimination and calibration per outcome, with percentile-bootstrap 95% intervals."""

from __future__ import annotations

import numpy as np

from edfed.common.contract import OUTCOMES


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |observed - predicted| over equal-width probability bins, weighted by bin size."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins))
    return float(gap.sum() / max(counts.sum(), 1))


# A per-site or subgroup cell with fewer events (or non-events) than this shows no numbers, in the log as in the
# report: too few to judge, and a count that small may identify someone.
MIN_CELL = 10
SUPPRESSED = f"suppressed (<{MIN_CELL} events)"


def small_cell(m: dict) -> bool:
    """True when the cell must not be shown: fewer than MIN_CELL events or non-events (or no count recorded)."""
    n, events = m.get("n"), m.get("events")
    if n is None or events is None:
        return True
    return events < MIN_CELL or n - events < MIN_CELL


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def calibration_slope_intercept(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the logistic recalibration y ~ a + b * logit(p) (Cox 1958): slope 1 and intercept 0
    are a calibrated model, a slope below 1 risks too extreme. The intercept is calibration-in-the-large (the slope
    held at 1): above 0, more events than predicted. NaN without both classes. Newton's method, no penalty."""
    if not 0 < y.sum() < len(y):
        return float("nan"), float("nan")
    z = _logit(p)
    x = np.column_stack([np.ones_like(z), z])
    beta = np.zeros(2)
    for _ in range(50):
        mu = 1 / (1 + np.exp(-np.clip(x @ beta, -30, 30)))
        hessian = x.T @ (x * (mu * (1 - mu))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, x.T @ (y - mu))
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    offset = 0.0
    for _ in range(50):
        mu = 1 / (1 + np.exp(-np.clip(offset + z, -30, 30)))
        step = (y - mu).sum() / max((mu * (1 - mu)).sum(), 1e-12)
        offset += step
        if abs(step) < 1e-10:
            break
    return float(beta[1]), float(offset)


def _point(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score  # here: a site's process starts faster

    both = 0 < y.sum() < len(y)
    return {
        "auroc": float(roc_auc_score(y, p)) if both else float("nan"),
        "auprc": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(np.mean((p - y) ** 2)),
        "ece": expected_calibration_error(y, p),
    }


def outcome_metrics(y: np.ndarray, p: np.ndarray, bootstrap: int = 200, seed: int = 0,
                    oracle: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of one outcome on the rows whose label is known, with `<metric>_ci` = [lo, hi]."""
    known = ~np.isnan(y)
    y, p = y[known].astype(float), p[known].astype(float)
    result: dict = {**_point(y, p), "n": int(len(y)), "events": int(y.sum())}
    result["calibration_slope"], result["calibration_intercept"] = calibration_slope_intercept(y, p)
    if oracle is not None:
        o = oracle[known]
        result["oracle_auroc"] = _point(y, o)["auroc"] if not np.isnan(o).any() else float("nan")
    if bootstrap and len(y) > 1:
        rng = np.random.default_rng(seed)
        draws = [_point(y[i], p[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(bootstrap))]
        for name in ("auroc", "auprc", "brier", "ece"):
            values = np.array([d[name] for d in draws])
            values = values[~np.isnan(values)]
            result[f"{name}_ci"] = ([float(v) for v in np.percentile(values, [2.5, 97.5])]
                                    if len(values) else [float("nan")] * 2)
    return result


def evaluate(labels: np.ndarray, probs: np.ndarray, bootstrap: int = 200, seed: int = 0,
             oracle: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """`{outcome: metrics}` for [n, 3] labels (NaN = not applicable) and predicted probabilities."""
    return {name: outcome_metrics(labels[:, k], probs[:, k], bootstrap, seed + k,
                                  None if oracle is None else oracle[:, k])
            for k, name in enumerate(OUTCOMES)}


def mean_paired_gain(pairs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], bootstrap: int = 200,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean over sites of AUROC(model A) - AUROC(model B) on each site's own test rows, per outcome, with a paired
    95% interval: every bootstrap draw resamples each site's rows once and scores both models on them.

    `pairs`: site -> (labels [n, 3], probs A [n, 3], probs B [n, 3]). A site where an outcome has one class only
    is left out of that outcome's mean (`sites` says how many count).
    """
    from sklearn.metrics import roc_auc_score

    def gains(rows: dict[str, np.ndarray], k: int) -> list[float]:
        out = []
        for site, (y, a, b) in pairs.items():
            i = rows[site]
            yk, known = y[i, k], ~np.isnan(y[i, k])
            if 0 < yk[known].sum() < known.sum():
                out.append(roc_auc_score(yk[known], a[i, k][known]) - roc_auc_score(yk[known], b[i, k][known]))
        return out

    rng = np.random.default_rng(seed)
    identity = {site: np.arange(len(y)) for site, (y, _, _) in pairs.items()}
    draws = [{site: rng.integers(0, len(y), len(y)) for site, (y, _, _) in pairs.items()} for _ in range(bootstrap)]
    result = {}
    for k, outcome in enumerate(OUTCOMES):
        point = gains(identity, k)
        boot = [np.mean(g) for g in (gains(d, k) for d in draws) if g]
        result[outcome] = {"mean_gain": float(np.mean(point)) if point else float("nan"), "sites": len(point),
                           "mean_gain_ci": [float(v) for v in np.percentile(boot, [2.5, 97.5])] if boot
                           else [float("nan")] * 2}
    return result
