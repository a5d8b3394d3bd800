"""The regressions a clinician-statistician fits first, on the same rows as the model: its peers in every report.

Three peers per outcome, each fitted on the training rows alone and scored on the same test rows as the model,
with the same metrics (`common.metrics.evaluate`), so a report shows at once whether the deep model earns its cost:

- `structured`: logistic regression on edfed's own structured features (`structured_features`: fixed clinical
  transforms plus a missing-value indicator per column) and a cubic spline of the arrival date (COVID-19 outcomes
  changed across epidemic waves), standardised; C chosen by cross-validated AUROC on the training rows.
- `tfidf`: logistic regression on TF-IDF of the three notes concatenated (word 1-2 grams, sublinear tf); no stop
  words, no stemming, Unicode word tokens, so it reads any language a site writes in; C chosen as above.
- `stacked`: a logistic regression on the two peers' out-of-fold logits (each training row scored by the fold
  model that did not see it, at the peer's chosen C), so the stack never learns from a prediction made on the row.

Folds keep every visit of a patient together (as edfed's own split does). Rows whose label is missing (30-day
readmission after a death) are left out of that outcome's fit, as the neural loss leaves them out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from edfed.common.contract import NOTE_COLUMNS, OUTCOMES
from edfed.common.errors import EdfedError
from edfed.common.features import structured_features
from edfed.common.metrics import evaluate

PEERS: tuple[str, ...] = ("structured", "tfidf", "stacked")
PEER_LABELS: dict[str, str] = {
    "structured": "logistic regression, structured columns",
    "tfidf": "logistic regression, note TF-IDF (1-2 grams)",
    "stacked": "the two stacked (out-of-fold logits)",
}
CS = np.logspace(-4, 2, 7)  # the C grid searched by cross-validation (inverse L2 strength): decades
MAX_ITER = 2000
FOLDS = 5
MIN_DF = 2  # an n-gram seen in one note only is noise, and may identify a patient
_CALENDAR_ORIGIN = pd.Timestamp("2020-01-01")
_CALENDAR_KNOTS = 6
_MIN_CLASS = 3  # fewer events (or non-events) than this in the training rows: no fit, the training prevalence


def note_text(table: pd.DataFrame) -> list[str]:
    """The three notes of each visit, concatenated (section headers included: they are part of the text)."""
    cols = [table[c].fillna("").astype(str) if c in table else pd.Series("", index=table.index) for c in NOTE_COLUMNS]
    return (cols[0] + "\n" + cols[1] + "\n" + cols[2]).tolist()


def _calendar_days(table: pd.DataFrame) -> np.ndarray:
    dates = pd.to_datetime(table["arrival_date"], errors="coerce")
    days = ((dates - _CALENDAR_ORIGIN).dt.days).to_numpy(float)
    return np.nan_to_num(days, nan=float(np.nanmedian(days)) if np.isfinite(days).any() else 0.0).reshape(-1, 1)


@dataclass
class _OutcomeFit:
    """One outcome's fitted peers; `None` models mean too few events: the training prevalence is predicted."""

    prevalence: float
    structured: object | None = None
    tfidf: object | None = None
    stack: object | None = None
    c: dict[str, float] = field(default_factory=dict)
    # The training rows' out-of-fold logits (structured, TF-IDF) where the label is known: a stack built on them
    # (the peers' own, or a site's with its global model) never learns from a prediction made on its own row.
    known: np.ndarray | None = None
    oof: np.ndarray | None = None  # [known rows, 2]


@dataclass
class FittedPeers:
    """The fitted transforms and per-outcome regressions; `predict` scores any rows of the same contract."""

    scaler: object
    calendar: object | None
    vectorizer: object | None
    fits: dict[str, _OutcomeFit]
    train_rows: int
    seconds: float = 0.0

    @property
    def peers(self) -> tuple[str, ...]:
        return PEERS if self.vectorizer is not None else ("structured",)

    def _structured(self, table: pd.DataFrame) -> np.ndarray:
        parts = [structured_features(table, calendar=False).astype(float)]
        if self.calendar is not None:
            parts.append(self.calendar.transform(_calendar_days(table)))
        return self.scaler.transform(np.hstack(parts))

    def logits(self, table: pd.DataFrame) -> np.ndarray:
        """[n, 3 outcomes, 2]: the structured and TF-IDF regressions' logits (NaN where an outcome has no fit)."""
        xs = self._structured(table)
        xt = self.vectorizer.transform(note_text(table)) if self.vectorizer is not None else None
        out = np.full((len(table), len(OUTCOMES), 2), np.nan)
        for k, outcome in enumerate(OUTCOMES):
            fit = self.fits[outcome]
            if fit.structured is not None and xt is not None:
                out[:, k] = np.column_stack([fit.structured.decision_function(xs), fit.tfidf.decision_function(xt)])
        return out

    def predict(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        """{peer: [n, 3] predicted risks} for the rows of `table`, outcomes in OUTCOMES order."""
        xs = self._structured(table)
        xt = self.vectorizer.transform(note_text(table)) if self.vectorizer is not None else None
        out = {p: np.empty((len(table), len(OUTCOMES))) for p in self.peers}
        for k, outcome in enumerate(OUTCOMES):
            fit = self.fits[outcome]
            if fit.structured is None:
                for p in self.peers:
                    out[p][:, k] = fit.prevalence
                continue
            zs = fit.structured.decision_function(xs)
            out["structured"][:, k] = _sigmoid(zs)
            if xt is not None:
                zt = fit.tfidf.decision_function(xt)
                out["tfidf"][:, k] = _sigmoid(zt)
                out["stacked"][:, k] = fit.stack.predict_proba(np.column_stack([zs, zt]))[:, 1]
        return out

    def coefficients(self) -> dict[str, dict[str, np.ndarray]]:
        """{outcome: {peer: coefficient vector}}: what the peers learned (and only from training rows)."""
        result = {}
        for outcome, fit in self.fits.items():
            models = {"structured": fit.structured, "tfidf": fit.tfidf, "stacked": fit.stack}
            linear = {p: m[-1] if hasattr(m, "steps") else m for p, m in models.items() if m is not None}
            result[outcome] = {p: np.concatenate([m.coef_.ravel(), m.intercept_.ravel()]) for p, m in linear.items()}
        return result

    def method(self) -> dict:
        """How the peers were made, for summary.json: settings and each outcome's chosen C."""
        return {"peers": {p: PEER_LABELS[p] for p in self.peers}, "train_rows": self.train_rows,
                "cv_folds": f"{FOLDS}, grouped by patient", "C_grid": [float(c) for c in CS], "min_df": MIN_DF,
                "calendar_spline_knots": _CALENDAR_KNOTS if self.calendar is not None else 0,
                "chosen_C": {o: f.c for o, f in self.fits.items()},
                "not_fitted": [o for o, f in self.fits.items() if f.structured is None]}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def _folds(y: np.ndarray, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds that keep a patient's visits together, stratified on the patient's label.

    Patients are dealt round-robin into folds in a shuffled order sorted by label (StratifiedGroupKFold's
    search costs seconds per call here; with ~1.1 visits a patient this is as balanced).
    """
    n_splits = int(min(FOLDS, y.sum(), len(y) - y.sum()))
    patients, inverse = np.unique(groups, return_inverse=True)
    label = np.zeros(len(patients))
    np.maximum.at(label, inverse, y)
    order = np.lexsort((np.random.default_rng(seed).permutation(len(patients)), label))
    fold_of_patient = np.empty(len(patients), dtype=int)
    fold_of_patient[order] = np.arange(len(patients)) % n_splits
    fold = fold_of_patient[inverse]
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(n_splits)]


def _fit_cv(x, y: np.ndarray, folds, seed: int) -> tuple[object, float, np.ndarray]:
    """(model, C, out-of-fold logits): L2 logistic regression at the C of best mean fold AUROC, refitted on all rows.

    As LogisticRegressionCV does, but the folds' predictions at the chosen C are kept: they are the stack's
    out-of-fold inputs, at no extra fit. Each fold walks the grid from strong to weak penalty, warm-started.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    oof = np.empty((len(CS), len(y)))
    aucs = np.zeros((len(folds), len(CS)))
    for f, (fit_rows, held) in enumerate(folds):
        model = LogisticRegression(C=CS[0], max_iter=MAX_ITER, warm_start=True, random_state=seed)
        for j, c in enumerate(CS):
            model.set_params(C=c).fit(x[fit_rows], y[fit_rows])
            oof[j, held] = model.decision_function(x[held])
            aucs[f, j] = roc_auc_score(y[held], oof[j, held]) if 0 < y[held].sum() < len(held) else np.nan
    best = int(np.nanargmax(np.nanmean(aucs, axis=0))) if np.isfinite(aucs).any() else 0
    final = LogisticRegression(C=CS[best], max_iter=MAX_ITER, random_state=seed).fit(x, y)
    return final, float(CS[best]), oof[best]


def fit_peers(train: pd.DataFrame, seed: int = 0) -> FittedPeers:
    """Fit every peer on `train` (contract rows, e.g. the model's training split) and on nothing else."""
    from threadpoolctl import threadpool_limits

    # Hundreds of small fits: BLAS threads only contend (30-50x slower on 2 busy cores than one thread).
    with threadpool_limits(limits=1):
        return _fit_peers(train, seed)


def _fit_peers(train: pd.DataFrame, seed: int) -> FittedPeers:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer, StandardScaler

    started = time.perf_counter()
    if len(train) == 0:
        raise EdfedError("regression peers: no training rows to fit them on")
    days = _calendar_days(train)
    # A spline, not a line: risk rose and fell with the waves. One date only (a tiny site): no calendar term.
    calendar = (SplineTransformer(n_knots=_CALENDAR_KNOTS, degree=3, extrapolation="constant").fit(days)
                if np.ptp(days) > 0 else None)
    raw = [structured_features(train, calendar=False).astype(float)]
    if calendar is not None:
        raw.append(calendar.transform(days))
    scaler = StandardScaler().fit(np.hstack(raw))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=MIN_DF, lowercase=True,
                                 token_pattern=r"(?u)\b\w+\b", dtype=np.float32)
    try:
        # Unsupervised (no labels), fitted once on all training rows; the supervised fits are what the folds guard.
        xt_all = vectorizer.fit_transform(note_text(train))
    except ValueError:  # no note text at all (or none shared by two visits): no text peers
        vectorizer, xt_all = None, None
    peers = FittedPeers(scaler, calendar, vectorizer, {}, len(train))
    xs_all = peers._structured(train)
    groups = train["patient_id"].astype(str).to_numpy() if "patient_id" in train else np.arange(len(train))
    labels = train[list(OUTCOMES)].to_numpy(float)
    for k, outcome in enumerate(OUTCOMES):
        known = ~np.isnan(labels[:, k])
        y = labels[known, k].astype(int)
        fit = _OutcomeFit(prevalence=float(y.mean()) if len(y) else 0.0)
        peers.fits[outcome] = fit
        if min(y.sum(), len(y) - y.sum()) < _MIN_CLASS:
            continue
        folds = _folds(y, groups[known], seed + k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the weakest penalties of the grid, in some folds
            fit.structured, fit.c["structured"], oof_s = _fit_cv(xs_all[known], y, folds, seed)
            if xt_all is None:
                continue
            fit.tfidf, fit.c["tfidf"], oof_t = _fit_cv(xt_all[known], y, folds, seed)
        # Standardised first: a peer chosen at a strong penalty has logits of tiny spread, and an L2 stacker on raw
        # logits would then drop it however well it ranks.
        fit.known, fit.oof = np.flatnonzero(known), np.column_stack([oof_s, oof_t])
        fit.stack = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=MAX_ITER)).fit(fit.oof, y)
    peers.seconds = time.perf_counter() - started
    return peers


def score_peers(peers: FittedPeers, test: pd.DataFrame, oracle: np.ndarray | None, bootstrap: int = 200,
                seed: int = 0) -> dict[str, dict]:
    """{peer: {outcome: metrics}} on `test`, exactly as the model is scored (same bootstrap draws for same rows)."""
    labels = test[list(OUTCOMES)].to_numpy(float)
    return {p: evaluate(labels, probs, bootstrap, seed, oracle) for p, probs in peers.predict(test).items()}


def regression_peers(train: pd.DataFrame, test: pd.DataFrame, data_dir: Path, bootstrap: int = 200, seed: int = 0,
                     local: bool = False, console=None, curves: dict | None = None) -> dict:
    """`summary["peers"]`: peers fitted on pooled `train`, scored on pooled `test`; with `local`, also each site's
    own peers (fitted on its training rows alone, scored on its test rows), for a federation's per-site table.
    `curves`: also gets the pooled peers' test risks ({label: [n, 3]}, `test`'s rows), for the ROC figure."""
    from edfed.common.display import make_console
    from edfed.common.evaluation import oracle_risks

    started = time.perf_counter()
    oracle = oracle_risks(data_dir, test)
    pooled = fit_peers(train, seed)
    result: dict = {"method": pooled.method(), "test_rows": len(test),
                    "pooled": score_peers(pooled, test, oracle, bootstrap, seed)}
    if curves is not None:
        curves.update({f"regression: {p}": risks for p, risks in pooled.predict(test).items()})
    if local:
        result["local"], result["local_method"] = {}, {}
        for site, site_test in test.groupby("site", sort=False):
            site_train = train[train["site"] == site]
            if site_train.empty:
                continue
            fitted = fit_peers(site_train, seed)
            rows = (test["site"] == site).to_numpy()
            # Point estimates: a site's test split is small, and 200 draws x 9 peers x sites would take longer
            # than the fits (the pooled peers keep their intervals).
            result["local"][site] = score_peers(fitted, site_test, None if oracle is None else oracle[rows], 0, seed)
            result["local_method"][site] = {"train_rows": fitted.train_rows, "chosen_C": fitted.method()["chosen_C"]}
    result["seconds"] = time.perf_counter() - started
    (console or make_console()).print(f"fitting regression peers: {result['seconds']:.1f} s "
                                      f"({len(train)} training, {len(test)} test visits"
                                      + (", and each site's own" if local else "") + ")")
    return result


def federation_peers(data_dir: Path, seed: int, bootstrap: int = 200, console=None, curves: dict | None = None) -> dict:
    """A simulated federation's peers: pooled (as central) and each site's own, on the federation's splits."""
    from edfed.common.data import load_cohort

    cohort = load_cohort(data_dir, seed)
    return regression_peers(cohort[cohort["split"] == "train"], cohort[cohort["split"] == "test"], data_dir,
                            bootstrap, seed, local=True, console=console, curves=curves)
