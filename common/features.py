"""Turning one site's visits into model inputs, with nothing learned from other sites.

Structured values go through fixed clinical transforms (log for skewed labs, centring on a clinical
reference value, a fixed scale) plus a missing-value indicator each, and the arrival date through a fixed
calendar basis, so a site can featurise its own table alone and every site's features mean the same thing.
Notes become one token sequence with a marker per section, highest-priority sections first, so truncation
cuts the least informative text; and, whole and untruncated, hashed word n-grams per section (the lexical
path), which read any language and need no vocabulary shared between sites.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from edfed.common.errors import EdfedError

# column -> (transform, reference centre, scale), all on the transformed scale.
_NUMERIC_TRANSFORMS: dict[str, tuple[str, float, float]] = {
    "age": ("id", 60.0, 20.0),
    "resp_rate": ("id", 18.0, 6.0),
    "spo2": ("id", 95.0, 5.0),
    "heart_rate": ("id", 90.0, 20.0),
    "systolic_bp": ("id", 125.0, 25.0),
    "temperature": ("id", 37.5, 1.0),
    "gcs": ("id", 15.0, 3.0),
    "crp": ("log1p", np.log1p(50.0), 1.5),
    "urea": ("log1p", np.log1p(7.0), 0.6),
    "creatinine": ("log", np.log(90.0), 0.5),
    "lymphocytes": ("log1p", np.log1p(1.2), 0.4),
    "d_dimer": ("log1p", np.log1p(1.0), 0.8),
    "ldh": ("log", np.log(300.0), 0.5),
}
_FLAGS = (
    "on_oxygen", "hypertension", "diabetes", "chronic_lung_disease", "heart_failure",
    "chronic_kidney_disease", "immunosuppression", "dementia", "nursing_home",
)
_CLIP = 5.0
# COVID-19 outcomes moved across the epidemic's waves (treatments, variants, vaccination): the arrival date
# enters as a piecewise-linear function of time, hat functions on fixed knots every quarter from 2020 to 2023.
# Fixed and public, so every site computes the same basis from its own rows; beyond the knots it is flat.
_CALENDAR_KNOTS = pd.date_range("2020-01-01", "2023-01-01", freq="QS").to_numpy("datetime64[D]")


def structured_feature_names() -> list[str]:
    names = ["male"]
    for col in (*_NUMERIC_TRANSFORMS, *_FLAGS):
        names += [col, f"{col}_missing"]
    return names + [f"calendar_{str(k)[:7]}" for k in _CALENDAR_KNOTS]


def calendar_features(df: pd.DataFrame) -> np.ndarray:
    """[n_visits, n_knots]: each visit's arrival date as weights on the two nearest knots (summing to 1)."""
    dates = df["arrival_date"] if "arrival_date" in df else pd.Series(pd.NaT, index=df.index)  # required by contract
    days = pd.to_datetime(dates, errors="coerce").to_numpy("datetime64[D]").astype(float)
    knots = _CALENDAR_KNOTS.astype(float)
    days = np.clip(np.where(np.isnan(days), knots[0], days), knots[0], knots[-1])
    left = np.clip(np.searchsorted(knots, days, side="right") - 1, 0, len(knots) - 2)
    t = (days - knots[left]) / (knots[left + 1] - knots[left])
    basis = np.zeros((len(days), len(knots)), dtype=np.float32)
    rows = np.arange(len(days))
    basis[rows, left], basis[rows, left + 1] = 1.0 - t, t
    return basis


def structured_features(df: pd.DataFrame, calendar: bool = True) -> np.ndarray:
    """[n_visits, n_features] float32; missing values become the reference (0) plus an indicator. `calendar`:
    with the arrival-date basis (the regression peers fit their own spline of the date instead)."""
    columns = [(df["sex"] == "male").to_numpy(np.float32)]
    for col, (kind, centre, scale) in _NUMERIC_TRANSFORMS.items():
        raw = pd.to_numeric(df.get(col, pd.Series(np.nan, index=df.index)), errors="coerce").to_numpy(float)
        missing = np.isnan(raw)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = {"id": raw, "log1p": np.log1p(np.clip(raw, 0, None)),
                     "log": np.log(np.clip(raw, 1e-3, None))}[kind]
        z = np.clip((value - centre) / scale, -_CLIP, _CLIP)
        columns += [np.where(missing, 0.0, z), missing]
    for col in _FLAGS:
        raw = pd.to_numeric(df.get(col, pd.Series(np.nan, index=df.index)), errors="coerce").to_numpy(float)
        missing = np.isnan(raw)
        columns += [np.where(missing, 0.0, raw), missing]
    features = np.stack(columns, axis=1).astype(np.float32)
    return np.hstack([features, calendar_features(df)]) if calendar else features


_IMPRESSION = re.compile(r"\bIMPRESSION\s*:", re.IGNORECASE)
_AP_HEADER = re.compile(r"^\s*ASSESSMENT\s*/\s*PLAN\s*:\s*", re.IGNORECASE)


def note_sections(row_triage: str, row_physician: str, row_plan: str) -> dict[str, str]:
    """Split a visit's three notes into the four sections the model reads."""
    physician = row_physician or ""
    match = _IMPRESSION.search(physician)
    history, impression = (physician[: match.start()], physician[match.end():]) if match else (physician, "")
    return {
        "impression": impression.strip(),
        "assessment_plan": _AP_HEADER.sub("", row_plan or "").strip(),
        "triage": (row_triage or "").strip(),
        "history": history.strip(),
    }


_MARKERS = {"impression": "impression :", "assessment_plan": "assessment and plan :",
            "triage": "triage :", "history": "history :"}


_WORD = re.compile(r"\w+", re.UNICODE)


def _section_ngrams(parts: dict[str, str]) -> list[str]:
    """Word 1- and 2-grams of each section, tagged with it: 'no' in an impression is not 'no' in a history."""
    grams = []
    for section, text in parts.items():
        words = _WORD.findall(text.lower())
        grams += [f"{section}:{w}" for w in words]
        grams += [f"{section}:{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    return grams


def lexical_features(df: pd.DataFrame, n_features: int):
    """[n_visits, n_features] sparse (CSR) float32: hashed section-tagged word n-grams of all of the note text,
    log-scaled counts, unit L2 norm per visit. Stateless (no vocabulary, no document frequencies), so each site
    computes it alone and identically; Unicode words, no stop-word list, so it does not assume English."""
    from sklearn.feature_extraction.text import HashingVectorizer

    parts = [note_sections(t, p, a) for t, p, a in zip(
        df["note_triage"].fillna(""), df["note_physician"].fillna(""),
        df["note_assessment_plan"].fillna(""), strict=True)]
    vectorizer = HashingVectorizer(n_features=n_features, analyzer=_section_ngrams, alternate_sign=False, norm=None)
    counts = vectorizer.transform(parts).astype(np.float32)
    counts.data = np.log1p(counts.data)
    norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
    return counts.multiply(1.0 / np.maximum(norms, 1e-12)[:, None]).tocsr().astype(np.float32)


def tokenize_notes(df: pd.DataFrame, tokenizer, sections: tuple[str, ...], max_tokens: int) -> list[list[int]]:
    """One token-id list per visit: [CLS] marker+section ... [SEP], at most `max_tokens` long.

    Sections are laid out in `sections` order (priority order) and the sequence is cut at the end,
    so with a short budget the lower-priority sections are the ones truncated or dropped.
    """
    parts = [note_sections(t, p, a) for t, p, a in zip(
        df["note_triage"].fillna(""), df["note_physician"].fillna(""),
        df["note_assessment_plan"].fillna(""), strict=True)]
    budget = max_tokens - 2
    marker_ids = {s: tokenizer(_MARKERS[s], add_special_tokens=False)["input_ids"] for s in sections}
    encoded = {s: tokenizer([p[s] for p in parts], add_special_tokens=False,
                            truncation=True, max_length=budget)["input_ids"] for s in sections}
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    sequences = []
    for i in range(len(parts)):
        ids: list[int] = []
        for s in sections:
            if encoded[s][i]:
                ids += marker_ids[s] + encoded[s][i]
            if len(ids) >= budget:
                break
        sequences.append([cls, *ids[:budget], sep])
    return sequences


def load_tokenizer(config):
    """The encoder directory's own tokenizer, or None for a structured-only model."""
    if not config.uses_text:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(config.encoder_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EdfedError(f"--model {config.encoder_dir}: cannot load its tokenizer ({exc})") from exc
