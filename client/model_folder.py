"""A site's deployed model as a self-describing folder, and the one way to predict with it (or with a run's global
model): `edfed predict` and the Python API (`edfed.load_model`) both call `load_model(...).predict_proba`.

The folder, in the layout Hugging Face users know:

    config.json        what the model is: format, edfed version, the encoder's fingerprint, each neural component's
                       settings, the regressions' settings, and per outcome the recipe that combines them
    model.safetensors  every array: the neural components' trained arrays ("global/...", "personalized/...",
                       "local-only/...") and the site's regressions ("regressions/...", "global-stack/...")
    vocabulary.json    the note TF-IDF regression's n-grams (words of the site's own notes: the folder stays there)
    README.md          the model card: intended use, data, performance with intervals, the DP guarantee, limitations

No pickle: loading a folder runs no code from it. A recipe per outcome is {"parts": {candidate: weight},
"scales": {candidate: logit scale}, "calibration": [a, b] or null}: the deployed risk is
sigmoid(a * z + b) with z = sum(weight * logit(candidate's risk) / scale), or sigmoid(z) without calibration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from edfed.common.config import RUN_DEFAULTS, TrainConfig, train_config_from
from edfed.common.contract import OUTCOMES, load_site
from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write, atomic_write_text, latest_checkpoint, private_dir
from edfed.common.metrics import MIN_CELL

FORMAT, FORMAT_VERSION = "edfed-deployed-model", 1
CONFIG, WEIGHTS, VOCABULARY, CARD = "config.json", "model.safetensors", "vocabulary.json", "README.md"
NEURAL = ("global", "personalized", "local-only")
# What each candidate (client.local_models.CANDIDATES) is computed from.
SOURCES: dict[str, tuple[str, ...]] = {
    "global": ("global",), "personalized": ("personalized",), "local-only": ("local-only",),
    "global + local-only": ("global", "local-only"), "global + regressions": ("global", "regressions"),
    "regression: structured": ("regressions",), "regression: tfidf": ("regressions",),
    "regression: stacked": ("regressions",),
}
RISK_COLUMNS = tuple(f"risk_{o}" for o in OUTCOMES)  # as the simulated cohort's oracle names them
_TFIDF_KEYS = ("analyzer", "binary", "lowercase", "max_df", "min_df", "ngram_range", "norm", "smooth_idf",
               "strip_accents", "sublinear_tf", "token_pattern", "use_idf")
_SPLINE_KEYS = ("degree", "extrapolation", "include_bias", "knots", "n_knots", "order")


def _edfed_version() -> str:
    from edfed.common.provenance import provenance

    return provenance()["edfed"] or "unknown"


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def platt_parameters(val_risk: np.ndarray, val_labels: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of a logistic fit of the validation labels on the validation logits (Platt scaling), or None where
    it cannot recalibrate (one class only) or would reverse the ranking (a <= 0)."""
    from sklearn.linear_model import LogisticRegression

    known = ~np.isnan(val_labels)
    y = val_labels[known].astype(int)
    if not 0 < y.sum() < len(y):
        return None
    fit = LogisticRegression(C=100.0, max_iter=1000).fit(_logit(val_risk[known])[:, None], y)
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    return (a, b) if a > 0 else None


def blended_risk(recipe: Mapping[str, Any], risks: Mapping[str, np.ndarray], k: int) -> np.ndarray:
    """Outcome k's risk from a recipe's parts, before its calibration: sigmoid(sum(weight * logit / scale))."""
    return _sigmoid(sum(w * _logit(risks[name][:, k]) / recipe["scales"][name] for name, w in recipe["parts"].items()))


def apply_recipes(recipes: Mapping[str, Mapping[str, Any]], risks: Mapping[str, np.ndarray]) -> np.ndarray:
    """The deployed risks [n, 3] of rows whose candidates' risks are `risks` (float64: float32 could round apart
    values into ties). The one place a recipe is applied: at the site's deployment and in `predict_proba`."""
    out = np.empty(next(iter(risks.values())).shape, dtype=np.float64)
    for k, outcome in enumerate(OUTCOMES):
        risk, calibration = blended_risk(recipes[outcome], risks, k), recipes[outcome]["calibration"]
        out[:, k] = risk if not calibration else _sigmoid(calibration[0] * _logit(risk) + calibration[1])
    return out


# ----------------------------------------------------------------------------------------------------------
# writing


def _check_recipes(recipes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    checked = {}
    for outcome in OUTCOMES:
        recipe = recipes.get(outcome)
        if not recipe or not recipe.get("parts"):
            raise EdfedError(f"deployed model: no recipe for {outcome}")
        unknown = sorted(set(recipe["parts"]) - set(SOURCES))
        if unknown:
            raise EdfedError(f"deployed model, {outcome}: unknown candidate(s) {unknown}; known: {', '.join(SOURCES)}")
        scales = {name: float(recipe.get("scales", {}).get(name, 1.0)) for name in recipe["parts"]}
        calibration = recipe.get("calibration")
        if calibration is not None and not (len(calibration) == 2 and float(calibration[0]) > 0):
            raise EdfedError(f"deployed model, {outcome}: calibration must be (a > 0, b) or None, got {calibration}")
        if not all(math.isfinite(s) and s > 0 for s in scales.values()):
            raise EdfedError(f"deployed model, {outcome}: every scale must be positive, got {scales}")
        checked[outcome] = {"parts": {n: float(w) for n, w in recipe["parts"].items()}, "scales": scales,
                            "calibration": None if calibration is None else [float(c) for c in calibration]}
    return checked


def _needed(recipes: dict[str, dict]) -> set[str]:
    return {part for r in recipes.values() for name in r["parts"] for part in SOURCES[name]}


def _array(values: Any) -> torch.Tensor:
    """A fitted array in its own float type: a regression fitted on float32 TF-IDF has float32 coefficients, and
    predicts in float32; widened, it would predict other numbers."""
    values = np.asarray(values)
    return torch.from_numpy(np.ascontiguousarray(values if values.dtype == np.float32 else values.astype(np.float64))
                            .reshape(-1))


def _scaled_linear(pipeline, prefix: str) -> dict[str, torch.Tensor]:
    """A StandardScaler + LogisticRegression pipeline (a stack) as arrays."""
    scaler, linear = pipeline[0], pipeline[-1]
    return {f"{prefix}/mean": _array(scaler.mean_), f"{prefix}/scale": _array(scaler.scale_),
            f"{prefix}/coef": _array(linear.coef_), f"{prefix}/intercept": _array(linear.intercept_)}


def _regression_arrays(peers, stack) -> tuple[dict[str, torch.Tensor], dict, list[str] | None]:
    """The site's regressions (common.peers.FittedPeers) and the global stack (client.local_models._GlobalStack,
    any object with `.fits`: {outcome: StandardScaler + LogisticRegression pipeline or None}) as arrays, their
    settings, and the TF-IDF vocabulary in column order."""
    arrays = {"regressions/scaler/mean": _array(peers.scaler.mean_),
              "regressions/scaler/scale": _array(peers.scaler.scale_)}
    settings: dict[str, Any] = {"train_rows": int(peers.train_rows), "outcomes": {}}
    if peers.calendar is not None:
        params = peers.calendar.get_params()
        if params["knots"] != "uniform":
            raise EdfedError("deployed model: only a calendar spline with uniform knots can be saved")
        settings["calendar"] = {k: params[k] for k in _SPLINE_KEYS}
        # Uniform knots depend on the training days' range alone: refitted on it, the spline is the same.
        degree = peers.calendar.degree
        arrays["regressions/calendar/range"] = _array(peers.calendar.bsplines_[0].t[[degree, -1 - degree]])
    vocabulary = None
    if peers.vectorizer is not None:
        params = peers.vectorizer.get_params()
        settings["tfidf"] = {k: list(params[k]) if isinstance(params[k], tuple) else params[k] for k in _TFIDF_KEYS}
        index = peers.vectorizer.vocabulary_
        vocabulary = sorted(index, key=index.get)
        arrays["regressions/tfidf/idf"] = _array(peers.vectorizer.idf_)
    for outcome in OUTCOMES:
        fit = peers.fits[outcome]
        settings["outcomes"][outcome] = {"prevalence": float(fit.prevalence), "fitted": fit.structured is not None}
        if fit.structured is None:
            continue
        p = f"regressions/{outcome}"
        arrays[f"{p}/structured/coef"] = _array(fit.structured.coef_)
        arrays[f"{p}/structured/intercept"] = _array(fit.structured.intercept_)
        if fit.tfidf is not None:
            arrays[f"{p}/tfidf/coef"] = _array(fit.tfidf.coef_)
            arrays[f"{p}/tfidf/intercept"] = _array(fit.tfidf.intercept_)
            arrays.update(_scaled_linear(fit.stack, f"{p}/stack"))
    if stack is not None:
        settings["global_stack"] = {}
        for outcome, fit in stack.fits.items():
            if fit is None:
                continue
            # (fit, whether it reads the global model's logit): a stack whose fit would weigh the global model at or
            # below zero is the regressions' alone (client.local_models._GlobalStack); a bare fit reads both
            pipeline, uses_global = fit if isinstance(fit, tuple) else (fit, True)
            arrays.update(_scaled_linear(pipeline, f"global-stack/{outcome}"))
            settings["global_stack"][outcome] = {"uses_global": bool(uses_global)}
    return arrays, settings, vocabulary


def save_deployed_model(out_dir: Path, *, site: str, run_config: Mapping[str, Any], encoder_fingerprint: str,
                        recipes: Mapping[str, Mapping[str, Any]], models: Mapping[str, Any],
                        peers: Any | None = None, stack: Any | None = None,
                        metrics: Mapping[str, Mapping[str, dict]] | None = None,
                        privacy: Mapping[str, Any] | None = None, rows: Mapping[str, int] | None = None) -> Path:
    """Write a site's deployed model as a self-describing folder (module docstring) that `load_model` reads.

    recipes: {outcome: {"parts": {candidate: weight}, "scales": {candidate: logit scale} (default 1),
             "calibration": (a, b) or None}}, candidates as in SOURCES (client.local_models.CANDIDATES);
    models: {"global" | "personalized" | "local-only": OutcomeModel}, at least those the recipes use (only those
            are saved); peers: the site's fitted regressions (common.peers.fit_peers); stack: the global model
            stacked with them (`.fits`), both where a recipe uses them;
    metrics: {"deployed" | candidate: {outcome: metrics with *_ci}} on the site's test split, for the model card;
    privacy: the run's guarantee at this site ({"epsilon", "delta", "privacy_unit"}); rows: {split: visits}.
    The folder is written beside OUT_DIR and renamed into place: a reader never sees half of it.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from edfed.common.exchange import frozen_init_fingerprint

    recipes = _check_recipes(recipes)
    run_config = {**RUN_DEFAULTS, **run_config}
    needed = _needed(recipes)
    missing = sorted(n for n in needed if n in NEURAL and n not in models)
    if missing or ("regressions" in needed and peers is None) or (
            any("global + regressions" in r["parts"] for r in recipes.values()) and stack is None):
        raise EdfedError(f"deployed model: the recipes use components not given ({missing or 'regressions'})")
    arrays: dict[str, torch.Tensor] = {}
    components: dict[str, dict] = {}
    for name in NEURAL:
        if name not in needed:
            continue
        model = models[name]
        settings = {k: v for k, v in model.config.to_dict().items() if k != "model"}
        components[name] = {"train_config": settings, "frozen_fingerprint": frozen_init_fingerprint(model)}
        arrays.update({f"{name}/{k}": v.detach().cpu().contiguous() for k, v in model.trainable_state().items()})
    regressions, vocabulary = None, None
    if "regressions" in needed:
        reg_arrays, regressions, vocabulary = _regression_arrays(peers, stack)
        arrays.update(reg_arrays)
    uses_text = any(c["train_config"]["modality"] != "structured" for c in components.values())
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "edfed_version": _edfed_version(),
              "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "site": site,
              "encoder_fingerprint": encoder_fingerprint if uses_text else "",
              "outcomes": list(OUTCOMES), "recipes": recipes, "components": components, "regressions": regressions,
              "run": {k: run_config[k] for k in ("num-server-rounds", "num-sites", "strategy", "epsilon", "delta",
                                                  "privacy-unit", "architecture", "modality", "seed")},
              "privacy": dict(privacy or {}), "rows": dict(rows or {}), "metrics": _plain(metrics or {})}
    out_dir = Path(out_dir)
    private_dir(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        atomic_write(tmp / WEIGHTS, lambda p: save_file(arrays, str(p), metadata={"format": FORMAT}))
        if vocabulary is not None:
            atomic_write_text(tmp / VOCABULARY, json.dumps(vocabulary, ensure_ascii=False))
        atomic_write_text(tmp / CONFIG, json.dumps(config, indent=2, allow_nan=True))
        atomic_write_text(tmp / CARD, model_card(config))
        if out_dir.exists():  # a re-run replaces the site's previous folder whole
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _plain(value: Any) -> Any:
    """JSON-safe copies of metrics (numpy scalars to floats)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------------
# the model card

MIN_EVENTS = MIN_CELL  # the report's rule: fewer events and a metric is not shown


def _ci(metric: dict, name: str) -> str:
    value, ci = metric.get(name), metric.get(f"{name}_ci")
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(map(math.isfinite, ci)) else f"{value:.3f}"


def model_card(config: dict) -> str:
    """README.md of a deployed model folder: what it is for, what it learned from, how well, what protects whom."""
    from edfed.common.markdown import markdown_table

    recipes, privacy, run = config["recipes"], config.get("privacy") or {}, config.get("run") or {}
    lines = [
        "---", "library_name: edfed", "tags: [tabular-classification, clinical, federated-learning, "
        "differential-privacy]", "---", "",
        f"# edfed deployed model of {config['site']}", "",
        f"Written {config['created_utc']} by edfed {config['edfed_version']} (`edfed personalize`). "
        "Predict with `edfed predict THIS_FOLDER --data VISITS --out predictions.csv`, or in Python "
        "`edfed.load_model(THIS_FOLDER).predict_proba(table)`; docs/using-a-model.md.", "",
        "## Intended use", "",
        "Risk of three outcomes of an adult COVID-19 emergency-department visit at this site: death within 30 "
        "days, a safe discharge, and readmission within 30 days. A decision aid for clinicians and "
        "statisticians of this site, on visits that follow the edfed data contract; not a diagnosis, not for "
        "other hospitals, other diseases, children, or use without clinical review.", "",
        "## Data", "",
        f"Trained on this site's own visits ({_rows(config.get('rows'))}) and on the federation's global model "
        f"({run.get('num-server-rounds', '?')} rounds of {run.get('strategy', '?')} over "
        f"{run.get('num-sites', 'all')} sites). "
        "Splits are by patient. The per-outcome model:", "",
    ]
    body = []
    for outcome in OUTCOMES:
        r = recipes[outcome]
        parts = ", ".join(f"{name} {w:.2g}" for name, w in r["parts"].items())
        body.append([outcome, parts, "yes (Platt, validation split)" if r["calibration"] else "no"])
    lines += markdown_table(["outcome", "combines (weight)", "recalibrated"], body)
    lines += ["## Performance on this site's test split", "",
              "Bootstrap 95% intervals. Fewer than 10 events: suppressed (too few to judge).", ""]
    metrics = config.get("metrics") or {}
    if metrics:
        body = []
        for name, per_outcome in metrics.items():
            for outcome in OUTCOMES:
                m = per_outcome.get(outcome)
                if not m:
                    continue
                if m.get("events", MIN_EVENTS) < MIN_EVENTS:
                    body.append([name, outcome, f"suppressed (<{MIN_EVENTS} events)", "—", "—", str(m.get("n", "—"))])
                else:
                    body.append([name, outcome, _ci(m, "auroc"), _ci(m, "auprc"), _ci(m, "brier"),
                                 str(m.get("n", "—"))])
        lines += markdown_table(["model", "outcome", "AUROC", "AUPRC", "Brier", "visits"], body)
    else:
        lines += ["Not recorded with this folder.", ""]
    epsilon = privacy.get("epsilon", run.get("epsilon"))
    delta = privacy.get("delta", run.get("delta"))
    unit = privacy.get("privacy_unit", run.get("privacy-unit", "patient"))
    lines += ["## Privacy", ""]
    if epsilon is not None and math.isfinite(float(epsilon)):
        lines.append(f"What this site sent the federation was released under ({float(epsilon):g}, {float(delta):g})-"
                     f"differential privacy per {unit}: the global model in this folder carries that guarantee for "
                     "this site's patients, and the other sites' guarantees for theirs.")
    else:
        lines.append("The federation ran without differential privacy (epsilon = inf): the global model carries no "
                     "formal guarantee.")
    lines += ["The site's own parts (its local-only and fine-tuned models, its regressions and the note n-grams in "
              "vocabulary.json) were trained without DP on this site's data and can reveal it: this folder stays "
              "at the site, like the data itself.", "",
              "## Limitations", "",
              "- Measured on this site's own test split (a few hundred visits at most): intervals are wide, and "
              "performance on later visits (new variants, treatments, coding) is unknown until re-measured.",
              "- Risks are calibrated on this site's validation split only; recalibrate before trusting them "
              "as absolute probabilities elsewhere or later.",
              "- Inputs outside the data contract are refused; the notes must be written as the training notes "
              f"were. The text encoder must be the one the run used (fingerprint "
              f"`{config.get('encoder_fingerprint') or 'none: no text'}`).",
              "- Readmission is defined only for visits whose patient survived; its risk is that of a survivor.", ""]
    return "\n".join(lines)


def _rows(rows: Mapping[str, int] | None) -> str:
    return ", ".join(f"{split} {n}" for split, n in rows.items()) + " visits" if rows else "visit counts not recorded"


# ----------------------------------------------------------------------------------------------------------
# reading and predicting


class DeployedModel:
    """A deployed model folder or a run's global model, ready to predict; `load_model` makes one."""

    def __init__(self, source: Path, recipes: dict[str, dict], neural: dict[str, tuple[TrainConfig, dict, str]],
                 regressions: dict | None, arrays: dict[str, torch.Tensor], vocabulary: list[str] | None,
                 encoder_fingerprint: str, encoder: Path | None, device: str | None = None) -> None:
        from edfed.common.config import resolve_device

        self.source, self.recipes = source, recipes
        self.device = resolve_device(device)  # `cuda` where there is none: refused before anything loads
        self.encoder_fingerprint = encoder_fingerprint
        self._neural, self._regressions, self._arrays, self._vocabulary = neural, regressions, arrays, vocabulary
        self._models = self._build_models(encoder)
        self._peers = self._build_peers() if regressions is not None else None

    def __repr__(self) -> str:
        return f"DeployedModel({str(self.source)!r}, components={sorted(self._models)})"

    def _build_models(self, encoder: Path | None) -> dict:
        from edfed.common.exchange import encoder_fingerprint, frozen_init_fingerprint
        from edfed.common.model import build_model

        models = {}
        for name, (config, state, frozen) in self._neural.items():
            config = config.replace(model=str(encoder) if encoder else "")
            if config.uses_text and self.encoder_fingerprint:
                mine = encoder_fingerprint(config.encoder_dir)
                if mine != self.encoder_fingerprint:
                    raise EdfedError(f"{self.source}: the model was trained with the encoder of fingerprint "
                                     f"{self.encoder_fingerprint}; {config.encoder_dir} has {mine}. Pass --model "
                                     "(API: encoder=) the encoder folder the run used; refusing to predict")
            model = build_model(config, state)
            if frozen and frozen != frozen_init_fingerprint(model):
                raise EdfedError(f"{self.source}: the {name} model's seeded frozen matrices differ from the ones "
                                 "built here (another torch version?); refusing to predict")
            # The GLM is a linear layer on cached features: it predicts on the CPU, as it trained.
            models[name] = model if config.glm else model.to(self.device)
        return models

    def _build_peers(self):
        """The site's regressions as the same sklearn objects `common.peers` predicts with."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import SplineTransformer

        from edfed.common.peers import FittedPeers, _OutcomeFit

        a, settings = self._arrays, self._regressions
        scaler = _scaler(a["regressions/scaler/mean"], a["regressions/scaler/scale"])
        calendar = None
        if "calendar" in settings:
            calendar = SplineTransformer(**settings["calendar"]).fit(
                a["regressions/calendar/range"].numpy().reshape(-1, 1))
        vectorizer = None
        if "tfidf" in settings:
            params = {k: tuple(v) if isinstance(v, list) else v for k, v in settings["tfidf"].items()}
            vectorizer = TfidfVectorizer(**params, vocabulary=self._vocabulary, dtype=np.float32)
            vectorizer.idf_ = a["regressions/tfidf/idf"].numpy()
        fits = {}
        for outcome in OUTCOMES:
            fit = _OutcomeFit(prevalence=settings["outcomes"][outcome]["prevalence"])
            p = f"regressions/{outcome}"
            if f"{p}/structured/coef" in a:
                fit.structured = _linear(a[f"{p}/structured/coef"], a[f"{p}/structured/intercept"])
            if f"{p}/tfidf/coef" in a:
                fit.tfidf = _linear(a[f"{p}/tfidf/coef"], a[f"{p}/tfidf/intercept"])
                fit.stack = _pipeline(a, f"{p}/stack")
            fits[outcome] = fit
        return FittedPeers(scaler, calendar, vectorizer, fits, settings["train_rows"])

    def _candidates(self, table: pd.DataFrame, names: set[str]) -> dict[str, np.ndarray]:
        from edfed.common.data import VisitDataset
        from edfed.common.features import load_tokenizer
        from edfed.common.train import cache_frozen_layers, predict

        risks: dict[str, np.ndarray] = {}
        for name, model in self._models.items():
            dataset = VisitDataset(table, load_tokenizer(model.config), model.config)
            with torch.no_grad():
                cache_frozen_layers(model, dataset)  # as the site's deployment computed them
                risks[name] = predict(model, dataset).astype(np.float64)
        if "global + local-only" in names:
            risks["global + local-only"] = (risks["global"] + risks["local-only"]) / 2
        if self._peers is not None:
            regressions = self._peers.predict(table)
            for peer in ("tfidf", "stacked"):  # no note text at the site: the structured regression is all there is
                regressions.setdefault(peer, regressions["structured"])
            risks.update({f"regression: {p}": r for p, r in regressions.items()})
            if "global + regressions" in names:
                risks["global + regressions"] = self._global_stack(risks["global"], table)
        return risks

    def _global_stack(self, global_risk: np.ndarray, table: pd.DataFrame) -> np.ndarray:
        logits, out = self._peers.logits(table), global_risk.copy()
        stacks = self._regressions.get("global_stack", {})
        for k, outcome in enumerate(OUTCOMES):
            prefix = f"global-stack/{outcome}"
            if f"{prefix}/coef" in self._arrays:
                x = np.column_stack([_logit(global_risk[:, k]), logits[:, k]])
                uses_global = stacks.get(outcome, {}).get("uses_global", True)
                out[:, k] = _pipeline(self._arrays, prefix).predict_proba(x if uses_global else x[:, 1:])[:, 1]
        return out

    def predict_proba(self, table: pd.DataFrame | str | Path, mapping: Path | str | dict | None = None,
                      encoding: str | None = None) -> pd.DataFrame:
        """Each visit's three risks: a frame of `visit_id` and risk_mortality_30d, risk_safe_discharge,
        risk_readmission_30d, in the table's row order. `table`: a frame or a Parquet/CSV file, checked against the
        data contract (outcome columns may be absent) after `mapping` (docs/data-contract.md) is applied."""
        clean = load_site(table, mapping=mapping, encoding=encoding, labels=False)
        names = {name for r in self.recipes.values() for name in r["parts"]}
        out = apply_recipes(self.recipes, self._candidates(clean, names))
        return pd.DataFrame({"visit_id": clean["visit_id"].to_numpy(),
                             **{col: out[:, k] for k, col in enumerate(RISK_COLUMNS)}})


def _scaler(mean: torch.Tensor, scale: torch.Tensor):
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = mean.numpy(), scale.numpy()
    scaler.var_, scaler.n_features_in_, scaler.n_samples_seen_ = scaler.scale_ ** 2, len(scaler.mean_), 1
    return scaler


def _linear(coef: torch.Tensor, intercept: torch.Tensor):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression()
    model.coef_, model.intercept_ = coef.numpy().reshape(1, -1), intercept.numpy()
    model.classes_, model.n_features_in_ = np.array([0, 1]), model.coef_.shape[1]
    return model


def _pipeline(arrays: dict[str, torch.Tensor], prefix: str):
    from sklearn.pipeline import make_pipeline

    return make_pipeline(_scaler(arrays[f"{prefix}/mean"], arrays[f"{prefix}/scale"]),
                         _linear(arrays[f"{prefix}/coef"], arrays[f"{prefix}/intercept"]))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdfedError(f"{path}: unreadable ({exc})") from None


def _load_arrays(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise EdfedError(f"{path}: not a readable safetensors file ({exc})") from None


def _train_config(saved: dict) -> TrainConfig:
    """A component's TrainConfig; folders written before FFA-LoRA left edfed carry `ffa_lora`, false unless that
    comparison trained them (the compact model freezes LoRA's A either way)."""
    saved = dict(saved)
    if saved.pop("ffa_lora", False) and saved.get("architecture") != "compact":
        raise ValueError("trained with ffa_lora, an option this edfed no longer has; retrain the model")
    return TrainConfig(**saved)


def load_model(path: Path | str, encoder: Path | str | None = None, device: str | None = None) -> DeployedModel:
    """A deployed model folder (`save_deployed_model`: config.json, model.safetensors) or a run folder (run.json and
    checkpoints/: its global model). `encoder`: the run's text encoder folder (default: the packaged one); its
    fingerprint must be the one the model was trained with. `device`: auto, cpu or cuda (default: the run
    settings' `device`, common.config.resolve_device)."""
    path = Path(path)
    encoder = Path(encoder) if encoder else None
    if not path.is_dir():
        raise EdfedError(f"{path}: no such model folder (a deployed model's folder, or a run folder)")
    if (path / "run.json").is_file():
        return _load_run(path, encoder, device)
    if not (path / CONFIG).is_file():
        raise EdfedError(f"{path}: neither a deployed model folder (config.json, model.safetensors) nor a run "
                         "folder (run.json, checkpoints/)")
    config = _read_json(path / CONFIG)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise EdfedError(f"{path / CONFIG}: not an edfed deployed model (format {config.get('format')!r})"
                         if isinstance(config, dict) else f"{path / CONFIG}: not an edfed deployed model")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise EdfedError(f"{path}: written by a newer edfed ({config.get('edfed_version')}, format "
                         f"{config['format_version']}); update edfed to read it")
    try:
        recipes = _check_recipes(config["recipes"])
        arrays = _load_arrays(path / WEIGHTS)
        neural = {}
        for name, component in config["components"].items():
            state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}/")}
            neural[name] = (_train_config(component["train_config"]), state, component.get("frozen_fingerprint", ""))
        vocabulary = None
        if config.get("regressions") and "tfidf" in config["regressions"]:
            vocabulary = _read_json(path / VOCABULARY)
    except (KeyError, TypeError, ValueError) as exc:
        raise EdfedError(f"{path}: incomplete or damaged model folder ({type(exc).__name__}: {exc})") from None
    missing = sorted(_needed(recipes) & set(NEURAL) - set(neural))
    if missing:
        raise EdfedError(f"{path}: the recipes use {missing}, which the folder does not hold")
    return DeployedModel(path, recipes, neural, config.get("regressions"), arrays, vocabulary,
                         config.get("encoder_fingerprint", ""), encoder, device)


def _load_run(run_dir: Path, encoder: Path | None, device: str | None) -> DeployedModel:
    """A run's global model, every outcome uncalibrated: what the federation trained, before any site chose."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise EdfedError(f"{run_dir}: no global model checkpoint (checkpoints/round-K.safetensors)")
    recorded = _read_json(run_dir / "run.json")
    config = train_config_from({**RUN_DEFAULTS, **recorded.get("config", {}), "model": ""})
    recipe = {"parts": {"global": 1.0}, "scales": {"global": 1.0}, "calibration": None}
    return DeployedModel(run_dir, {o: dict(recipe) for o in OUTCOMES},
                         {"global": (config, _load_arrays(checkpoint), recorded.get("frozen-fingerprint", ""))},
                         None, {}, None, recorded.get("encoder-fingerprint", ""), encoder, device)
