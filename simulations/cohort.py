"""The simulated cohort: COVID-19 visits to several emergency departments, with notes and true risks.

`generate_cohort(out)` writes `out/site-K.parquet` (one table per ED, following docs/data-contract.md),
`out/cohort.json` (settings, per-site counts, prevalence, missingness) and `out/oracle/site-K.parquet`
(the exact probability of each outcome under the generating model; no model ever reads it).

The generating model is documented with its equations and coefficients in docs/cohort.md. In short: each
visit has a structured part (age, sex, comorbidities, vitals and labs driven by a hidden physiological
severity; the ISARIC 4C Mortality Score is computed from them) and four note-only latent traits that no
structured column records: the clinician's gestalt H, a limitation of care L, frailty F and social risk S.
All three outcomes are logistic in both parts, so a model that reads the notes and the table together can
beat either one alone. The notes are written from templates that put those traits mostly in the
IMPRESSION line and the ASSESSMENT/PLAN note, in each site's own style.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from edfed.common.errors import EdfedError

GENERATOR_VERSION = 1
DATE_START = np.datetime64("2020-03-01", "D")
DATE_END = np.datetime64("2021-06-30", "D")
DEFAULT_SITE_SIZES = (1600, 1300, 1000, 900, 700, 500)
MIN_VISITS_PER_SITE = 10
MAX_VISITS_PER_SITE = 1_000_000
MAX_SITES = 100

COMORBIDITIES = ("hypertension", "diabetes", "chronic_lung_disease", "heart_failure",
                 "chronic_kidney_disease", "immunosuppression", "dementia")
VITALS = ("resp_rate", "spo2", "heart_rate", "systolic_bp", "temperature", "gcs")
LABS = ("crp", "urea", "creatinine", "lymphocytes", "d_dimer", "ldh")
NOTE_COLUMNS = ("note_triage", "note_physician", "note_assessment_plan")
OUTCOMES = ("mortality_30d", "safe_discharge", "readmission_30d")
ORACLE_COLUMNS = ("visit_id", "risk_mortality_30d", "risk_safe_discharge", "risk_readmission_30d")
# the contract's columns, in its order
COLUMNS = ("visit_id", "patient_id", "arrival_date", "age", "sex", "resp_rate", "spo2", "on_oxygen",
           "heart_rate", "systolic_bp", "temperature", "gcs", *LABS, *COMORBIDITIES, "nursing_home",
           *NOTE_COLUMNS, *OUTCOMES)

_SCHEMA = pa.schema(
    [("visit_id", pa.string()), ("patient_id", pa.string()), ("arrival_date", pa.date32()),
     ("age", pa.float64()), ("sex", pa.string())]
    + [(c, pa.float64()) for c in ("resp_rate", "spo2", "on_oxygen", "heart_rate", "systolic_bp",
                                   "temperature", "gcs", *LABS)]
    + [(c, pa.int64()) for c in (*COMORBIDITIES, "nursing_home")]
    + [(c, pa.string()) for c in NOTE_COLUMNS]
    + [("mortality_30d", pa.int64()), ("safe_discharge", pa.int64()), ("readmission_30d", pa.float64())]
)
_ORACLE_SCHEMA = pa.schema([("visit_id", pa.string())] + [(c, pa.float64()) for c in ORACLE_COLUMNS[1:]])

# ----------------------------------------------------------------------------------------------------------
# sites


@dataclass(frozen=True)
class SiteProfile:
    """What makes one ED different from the others (case mix, measurement habits, note style)."""

    kind: str
    age_beta_a: float  # age = 18 + 86 * Beta(a, 2.8): larger a, older patients
    severity_shift: float  # added to the hidden physiological severity
    nursing_home_shift: float  # on the logit of living in a care home
    social_shift: float  # added to the social-risk trait
    wave1_share: float  # share of visits in the spring-2020 wave (the rest: winter wave and between)
    missing_scale: float  # multiplies the base missingness of vitals and labs
    never_measured: tuple[str, ...]
    style: str  # "terse", "standard" or "verbose"
    empty_note: tuple[float, float, float]  # chance that each note (triage, physician, A/P) is empty


PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("urban academic centre", 3.0, 0.00, 0.0, 0.0, 0.50, 0.8, (), "standard",
                (0.02, 0.03, 0.04)),
    SiteProfile("urban community ED, younger", 2.6, -0.15, -0.6, 0.3, 0.45, 1.0, (), "terse",
                (0.04, 0.05, 0.06)),
    SiteProfile("suburban ED, older, many care homes", 3.5, 0.10, 0.7, -0.2, 0.30, 1.0,
                ("d_dimer", "ldh"), "verbose", (0.02, 0.02, 0.03)),
    SiteProfile("inner-city safety-net ED", 2.8, 0.15, -0.2, 0.6, 0.40, 1.3, (), "standard",
                (0.05, 0.06, 0.08)),
    SiteProfile("rural ED", 3.3, 0.00, 0.3, 0.1, 0.20, 1.6, ("lymphocytes",), "terse",
                (0.06, 0.08, 0.10)),
    SiteProfile("regional referral hospital", 3.0, 0.30, 0.0, -0.1, 0.35, 0.7, (), "verbose",
                (0.02, 0.03, 0.04)),
)

# base share of visits without the value (before the site's missing_scale); labs also depend on acuity
BASE_MISSING = {"resp_rate": 0.03, "spo2": 0.01, "heart_rate": 0.01, "systolic_bp": 0.02,
                "temperature": 0.03, "gcs": 0.12, "crp": 0.12, "renal": 0.08, "lymphocytes": 0.07,
                "d_dimer": 0.35, "ldh": 0.40}


def site_profile(k: int) -> SiteProfile:
    """Site k (1-based); beyond six sites the six profiles repeat."""
    return PROFILES[(k - 1) % len(PROFILES)]


def site_sizes(n_sites: int, visits_per_site: int | None) -> list[int]:
    """Visits per site: the given number everywhere, else the default sizes (interpolated for n != 6)."""
    if visits_per_site is not None:
        return [int(visits_per_site)] * n_sites
    if n_sites == len(DEFAULT_SITE_SIZES):
        return list(DEFAULT_SITE_SIZES)
    pos = np.linspace(0, len(DEFAULT_SITE_SIZES) - 1, n_sites) if n_sites > 1 else np.zeros(1)
    sizes = np.interp(pos, np.arange(len(DEFAULT_SITE_SIZES)), DEFAULT_SITE_SIZES)
    return [int(round(s, -1)) for s in sizes]


# ----------------------------------------------------------------------------------------------------------
# the generating model's coefficients (docs/cohort.md explains each)

AGE_CENTER, AGE_SCALE = 62.0, 18.0
VISITS_PER_PATIENT_P = (0.875, 0.09, 0.035)  # 1, 2, 3 visits
REPEAT_GAP_DAYS = (31, 60)  # a later visit comes this many days after the previous one

COMORBIDITY_LOGIT = {  # intercept, age_z, morbidity latent M, extra terms
    "hypertension": (0.05, 1.10, 0.60),
    "diabetes": (-0.95, 0.35, 0.65),
    "chronic_lung_disease": (-1.95, 0.40, 0.45),
    "heart_failure": (-2.90, 1.05, 0.60),
    "chronic_kidney_disease": (-2.85, 0.85, 0.65),  # + 0.5 diabetes + 0.3 hypertension
    "immunosuppression": (-2.85, 0.10, 0.30),
    "dementia": (-3.70, 1.85, 0.00),
}
MORTALITY = {"intercept": -3.35, "four_c": 0.18, "labs": 0.50, "urea": 0.25, "crp": 0.15, "hypotension": 0.6,
             "H": 1.10, "L": 1.40, "F": 0.50}
HOME = {"intercept": -0.10, "four_c": -0.12, "hypoxia": -0.60, "labs": -0.45, "crp": -0.35,
        "H": -0.90, "F": -0.50, "S": -0.55}
READMIT_STRUCT = {"heart_failure": 0.75, "chronic_kidney_disease": 0.55, "diabetes": 0.35,
                  "chronic_lung_disease": 0.45, "immunosuppression": 0.60, "age_z": 0.25, "creatinine": 0.40,
                  "lymphocytes": -0.25}
READMIT_NOTE = {"S": 0.90, "F": 0.50, "H": 0.35}
READMIT_WARD_INTERCEPT = -3.3
BOUNCE_BACK = {"intercept": -3.2, "hypoxia": 0.45, "four_c": 0.10}
DEATH_IN_INDEX_STAY = {"L0": 0.88, "L1": 0.60}  # P(death happens before leaving hospital | death in 30 d)

# `--harder` only (docs/cohort.md, "Harder cohort"): log-odds of 30-day death added by calendar date.
CALENDAR_MORTALITY = {"early": 0.60, "early_full_until": "2020-05-01", "early_gone_by": "2020-08-01",
                      "alpha": 0.35, "alpha_peak": "2021-01-15", "alpha_sd_days": 30.0,
                      "vaccine_70plus": -0.90, "vaccine_from": "2021-01-15", "vaccine_ramp_days": 75.0}


def calendar_mortality_shift(day: np.ndarray, age: np.ndarray) -> np.ndarray:
    """Log-odds of 30-day death added at `day` (days after DATE_START) for patients of `age` (`--harder`).

    Early 2020 care was deadlier (adjusted mortality fell by about two thirds from March to August 2020, and
    dexamethasone from June 2020 cut it further), the Alpha variant was more lethal in winter 2020/21, and
    vaccination from January 2021 protected the over-70s first; sources in docs/cohort.md.
    """
    c = CALENDAR_MORTALITY
    at = {k: float((np.datetime64(c[k], "D") - DATE_START).astype(int))
          for k in ("early_full_until", "early_gone_by", "alpha_peak", "vaccine_from")}
    early = c["early"] * np.clip((at["early_gone_by"] - day) / (at["early_gone_by"] - at["early_full_until"]), 0, 1)
    alpha = c["alpha"] * np.exp(-0.5 * ((day - at["alpha_peak"]) / c["alpha_sd_days"]) ** 2)
    vaccine = c["vaccine_70plus"] * (age >= 70) * np.clip((day - at["vaccine_from"]) / c["vaccine_ramp_days"], 0, 1)
    return early + alpha + vaccine


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def four_c_score(age, male, n_comorbid, resp_rate, spo2, on_oxygen, gcs, urea, crp) -> np.ndarray:
    """ISARIC 4C Mortality Score (Knight et al., BMJ 2020;370:m3339), 0-21 points.

    Comorbidities count the flags the 4C score counts (not hypertension). SpO2 on supplemental oxygen
    scores as < 92 % (our convention: the score asks for room-air saturation).
    """
    age = np.asarray(age, dtype=float)
    pts = np.select([age >= 80, age >= 70, age >= 60, age >= 50], [7, 6, 4, 2], 0)
    pts = pts + np.asarray(male, dtype=int)
    pts = pts + np.minimum(np.asarray(n_comorbid, dtype=int), 2)
    pts = pts + np.select([resp_rate >= 30, resp_rate >= 20], [2, 1], 0)
    pts = pts + np.where((spo2 < 92) | (on_oxygen == 1), 2, 0)
    pts = pts + np.where(gcs < 15, 2, 0)
    pts = pts + np.select([urea > 14, urea >= 7], [3, 1], 0)
    pts = pts + np.select([crp >= 100, crp >= 50], [2, 1], 0)
    return pts.astype(int)


def four_c_group(score: np.ndarray) -> np.ndarray:
    """0 low (0-3), 1 intermediate (4-8), 2 high (9-14), 3 very high (>= 15)."""
    return np.select([score >= 15, score >= 9, score >= 4], [3, 2, 1], 0)


# standardised lab terms (fixed reference centres and scales, not estimated from the data)
def _z_log(x, centre, scale):
    return (np.log(x) - np.log(centre)) / scale


# ----------------------------------------------------------------------------------------------------------
# one site: structured data, latent traits, outcomes


def _arrival_dates(rng: np.random.Generator, n: int, wave1_share: float) -> np.ndarray:
    """First-visit dates: a spring-2020 wave, a winter-2020/21 wave and a low level in between."""
    w = np.array([wave1_share, 0.85 - wave1_share, 0.15])
    comp = rng.choice(3, size=n, p=w / w.sum())
    days = np.empty(n)
    start = DATE_START.astype(int)
    wave1 = np.datetime64("2020-04-08", "D").astype(int) - start
    wave2 = np.datetime64("2021-01-05", "D").astype(int) - start
    span = (DATE_END - DATE_START).astype(int)
    days[comp == 0] = rng.normal(wave1, 17, (comp == 0).sum())
    days[comp == 1] = rng.normal(wave2, 38, (comp == 1).sum())
    days[comp == 2] = rng.uniform(0, span, (comp == 2).sum())
    # out of range: reflect back inside, then clip (keeps the shape, no pile-up at the ends)
    days = np.where(days < 0, -days, days)
    days = np.where(days > span, 2 * span - days, days)
    return np.clip(np.round(days), 0, span).astype(int)


def simulate_site(k: int, n: int, rng: np.random.Generator, profile: SiteProfile | None = None,
                  notes: bool = True, harder: bool = False) -> dict:
    """Simulate site k with n visits. Returns {"table", "oracle", "latent", "events"} column dicts.

    "table" has the contract's columns (in order), "oracle" the true risks, "latent" the hidden traits and
    scores, "events" the simulated course (died_in_index_stay, sent_home, ...), for tests and the docs.
    """
    prof = profile or site_profile(k)

    # ---- patients: visit counts; oversample, since a patient who dies has no later visit
    n_pat = n + 20
    counts = rng.choice(3, size=n_pat, p=VISITS_PER_PATIENT_P) + 1
    P = n_pat
    age = np.floor(18 + 86 * rng.beta(prof.age_beta_a, 2.8, P))
    age_z = (age - AGE_CENTER) / AGE_SCALE
    male = rng.random(P) < 0.56
    M = rng.normal(0, 1, P)  # shared morbidity burden: makes comorbidities co-occur
    com = {}
    for name in COMORBIDITIES:
        a0, a_age, a_m = COMORBIDITY_LOGIT[name]
        eta = a0 + a_age * age_z + a_m * M
        if name == "chronic_kidney_disease":
            eta = eta + 0.5 * com["diabetes"] + 0.3 * com["hypertension"]
        com[name] = (rng.random(P) < _sigmoid(eta)).astype(int)
    n_com_4c = sum(com[c] for c in COMORBIDITIES if c != "hypertension")
    # note-only patient traits
    F_p = 0.55 * age_z + 0.70 * com["dementia"] + 0.12 * (n_com_4c - 1) + 0.75 * rng.normal(0, 1, P)
    nh = (rng.random(P) < _sigmoid(-4.0 + prof.nursing_home_shift + 1.0 * age_z + 1.8 * com["dementia"]
                                   + 0.9 * F_p)).astype(int)
    L_p = (rng.random(P) < _sigmoid(-3.4 + 0.9 * age_z + 1.2 * com["dementia"] + 1.0 * nh
                                    + 0.7 * F_p)).astype(int)
    S_p = prof.social_shift + rng.normal(0, 1, P)
    S_p = np.where(nh == 1, 0.3 * S_p, S_p)  # care-home staff make up for most social risk
    H_p = rng.normal(0, 1, P)
    Z_p = rng.normal(0, 1, P)

    # ---- visits
    pidx = np.repeat(np.arange(P), counts)
    vno = np.concatenate([np.arange(c) for c in counts])
    V = len(pidx)
    first = _arrival_dates(rng, P, prof.wave1_share)
    gaps = rng.integers(REPEAT_GAP_DAYS[0], REPEAT_GAP_DAYS[1] + 1, size=V)
    gaps[vno == 0] = 0
    cum = np.zeros(V, dtype=int)
    for j in (1, 2):  # cumulative gap within the patient
        sel = vno == j
        cum[sel] = cum[np.flatnonzero(sel) - 1] + gaps[sel]
    span = int((DATE_END - DATE_START).astype(int))
    last_offset = np.zeros(P, dtype=int)
    np.maximum.at(last_offset, pidx, cum)
    first = np.minimum(first, span - last_offset)  # the last visit must still fall inside the period
    day = first[pidx] + cum

    a_v, az = age[pidx], age_z[pidx]
    male_v = male[pidx]
    com_v = {c: com[c][pidx] for c in COMORBIDITIES}
    ncom4 = n_com_4c[pidx]
    ncom_all = ncom4 + com_v["hypertension"]
    nh_v = nh[pidx]
    F = F_p[pidx] + 0.2 * rng.normal(0, 1, V)
    S = S_p[pidx]
    L = L_p[pidx]
    H = np.sqrt(0.35) * H_p[pidx] + np.sqrt(0.65) * rng.normal(0, 1, V)  # partly a trait of the patient

    # ---- physiology (hidden severity Zs drives vitals and labs)
    Zs = (prof.severity_shift + 0.25 * az + 0.12 * (ncom_all - 1.5)
          + 0.5 * Z_p[pidx] + np.sqrt(0.75) * rng.normal(0, 1, V))
    e = rng.normal(0, 1, (14, V))
    R = 0.85 * Zs + 0.53 * e[0]  # respiratory involvement
    spo2_ra = 98.0 - np.exp(1.05 + 0.7 * R + 0.25 * e[1]) - 1.5 * com_v["chronic_lung_disease"]
    spo2_ra = np.clip(np.round(spo2_ra), 50, 100)
    on_o2 = np.where(spo2_ra < 92, rng.random(V) < 0.55,
                     rng.random(V) < 0.02 + 0.08 * com_v["chronic_lung_disease"]).astype(int)
    spo2 = np.where(on_o2 == 1, np.minimum(99, spo2_ra + rng.integers(3, 10, V)), spo2_ra)
    rr = 19.5 + 3.8 * R + 1.4 * np.maximum(R, 0) ** 2 + 1.8 * e[2]
    rr = np.clip(np.round(rr), 10, 60)
    temp = np.clip(np.round(37.5 + 0.35 * Zs + 0.65 * e[3], 1), 35.0, 41.5)
    hr = np.clip(np.round(86 + 6 * Zs + 6 * (temp - 37.5) + 12 * e[4]), 40, 190)
    sbp = np.clip(np.round(134 + 9 * com_v["hypertension"] - 6 * Zs + 18 * e[5]), 60, 230)
    p_low_gcs = _sigmoid(-3.5 + 0.6 * Zs + 0.9 * az + 1.6 * com_v["dementia"])
    gcs = np.where(rng.random(V) < p_low_gcs, np.maximum(3, 15 - rng.geometric(0.45, V)), 15).astype(float)
    crp = np.clip(np.round(np.exp(np.log(50) + 0.7 * Zs + 0.65 * e[6]), 1), 0.5, 700)
    urea = np.exp(np.log(6.0) + 0.25 * az + 0.22 * Zs + 0.65 * com_v["chronic_kidney_disease"]
                  + 0.2 * com_v["heart_failure"] + 0.35 * e[7])
    urea = np.clip(np.round(urea, 1), 1.0, 100)
    creat = np.exp(np.log(80) + 0.12 * male_v + 0.08 * az + 0.85 * com_v["chronic_kidney_disease"]
                   + 0.12 * Zs + 0.16 * e[7] + 0.2 * e[8])
    creat = np.clip(np.round(creat), 20, 2500)
    lymph = np.clip(np.round(np.exp(np.log(1.05) - 0.3 * Zs - 0.35 * com_v["immunosuppression"]
                                    + 0.4 * e[9]), 2), 0.05, 50)
    ddim = np.clip(np.round(np.exp(np.log(0.9) + 0.45 * Zs + 0.2 * az + 0.75 * e[10]), 2), 0.1, 100)
    ldh = np.clip(np.round(np.exp(np.log(290) + 0.28 * Zs + 0.25 * e[11])), 80, 5000)

    # ---- scores and outcome models
    c4 = four_c_score(a_v, male_v, ncom4, rr, spo2, on_o2, gcs, urea, crp)
    lab = (0.45 * _z_log(ldh, 290, 0.35) + 0.35 * _z_log(ddim, 0.9, 0.8)
           - 0.35 * _z_log(lymph, 1.05, 0.45))
    crp_z, urea_z = _z_log(crp, 50, 0.8), _z_log(urea, 6.0, 0.5)
    creat_z, lymph_z = _z_log(creat, 80, 0.4), _z_log(lymph, 1.05, 0.45)
    hypot = (sbp < 90).astype(float)
    hypoxia = np.where(on_o2 == 1, 1.5, np.clip((95 - spo2) / 3, 0, 3))
    eta_m_struct = (MORTALITY["four_c"] * (c4 - 8) + MORTALITY["labs"] * lab + MORTALITY["urea"] * urea_z
                    + MORTALITY["crp"] * crp_z + MORTALITY["hypotension"] * hypot)
    eta_m_note = MORTALITY["H"] * H + MORTALITY["L"] * L + MORTALITY["F"] * F
    if harder:  # calendar waves; no random draw, so every other column stays as in the default cohort
        m = _sigmoid(MORTALITY["intercept"] + eta_m_struct + eta_m_note + calendar_mortality_shift(day, a_v))
    else:
        m = _sigmoid(MORTALITY["intercept"] + eta_m_struct + eta_m_note)

    eta_h_struct = (HOME["four_c"] * (c4 - 8) + HOME["hypoxia"] * hypoxia + HOME["labs"] * lab
                    + HOME["crp"] * crp_z)
    eta_h_note = HOME["H"] * H + HOME["F"] * F + HOME["S"] * S
    h = _sigmoid(HOME["intercept"] + eta_h_struct + eta_h_note)

    eta_r_struct = (sum(READMIT_STRUCT[c] * com_v[c] for c in COMORBIDITIES if c in READMIT_STRUCT)
                    + READMIT_STRUCT["age_z"] * az + READMIT_STRUCT["creatinine"] * creat_z
                    + READMIT_STRUCT["lymphocytes"] * lymph_z)
    eta_r_note = READMIT_NOTE["S"] * S + READMIT_NOTE["F"] * F + READMIT_NOTE["H"] * H
    r_ward = _sigmoid(READMIT_WARD_INTERCEPT + eta_r_struct + eta_r_note)
    r_home = _sigmoid(BOUNCE_BACK["intercept"] + eta_r_struct + eta_r_note + BOUNCE_BACK["hypoxia"] * hypoxia
                      + BOUNCE_BACK["four_c"] * (c4 - 8))
    pi_in = np.where(L == 1, DEATH_IN_INDEX_STAY["L1"], DEATH_IN_INDEX_STAY["L0"])

    # exact risks under the model
    risk_mort = m
    risk_safe = (1 - m) * h * (1 - r_home)
    p_left_alive = (1 - m) + m * (1 - pi_in)
    p_readm_and_left = m * (1 - pi_in) * (1 - L) + (1 - m) * (h * r_home + (1 - h) * r_ward)
    risk_readm = p_readm_and_left / p_left_alive

    # ---- the course of each visit, sampled with those risks
    u = rng.random((5, V))
    died = u[0] < m
    died_in_index = died & (u[1] < pi_in)
    sent_home = ~died & (u[2] < h)
    return_admit = sent_home & (u[3] < r_home)
    ward_readmit = ~died & ~sent_home & (u[4] < r_ward)
    mortality = died.astype(int)
    safe = (sent_home & ~return_admit).astype(int)
    readm = np.where(died, (~died_in_index & (L == 0)).astype(float), (return_admit | ward_readmit) * 1.0)
    readm = np.where(died_in_index, np.nan, readm)
    risk_readm = np.where(died_in_index, np.nan, risk_readm)

    # ---- keep n visits: no visit after a death; take whole patients in order, cut the last one short
    died_before = np.zeros(V, dtype=bool)
    for j in (1, 2):
        sel = np.flatnonzero(vno == j)
        died_before[sel] = died_before[sel - 1] | died[sel - 1]
    keep = ~died_before
    order = np.flatnonzero(keep)[:n]
    if len(order) < n:  # cannot happen with n + 20 patients, but never return a short site
        raise RuntimeError("cohort simulation drew too few visits")
    # rows sorted by arrival (then patient, visit) like an ED export
    order = order[np.lexsort((vno[order], pidx[order], day[order]))]

    # identifiers
    used_pat, pat_inverse = np.unique(pidx[order], return_inverse=True)
    pseudo = rng.permutation(max(10 * len(used_pat), 1000))[: len(used_pat)]
    width = max(6, len(str(int(pseudo.max()))))
    patient_id = np.array([f"s{k}-p{p:0{width}d}" for p in pseudo])[pat_inverse]
    vwidth = max(6, len(str(n)))
    visit_id = np.array([f"s{k}-v{i:0{vwidth}d}" for i in range(1, n + 1)])

    def sub(x):
        return np.asarray(x)[order]

    table = {
        "visit_id": visit_id,
        "patient_id": patient_id,
        "arrival_date": (DATE_START + sub(day).astype("timedelta64[D]")),
        "age": sub(a_v).astype(float),
        "sex": np.where(sub(male_v), "male", "female"),
        "resp_rate": sub(rr), "spo2": sub(spo2), "on_oxygen": sub(on_o2).astype(float),
        "heart_rate": sub(hr), "systolic_bp": sub(sbp), "temperature": sub(temp), "gcs": sub(gcs),
        "crp": sub(crp), "urea": sub(urea), "creatinine": sub(creat), "lymphocytes": sub(lymph),
        "d_dimer": sub(ddim), "ldh": sub(ldh),
        **{c: sub(com_v[c]) for c in COMORBIDITIES},
        "nursing_home": sub(nh_v),
    }
    latent = {"H": sub(H), "L": sub(L), "F": sub(F), "S": sub(S), "severity": sub(Zs), "respiratory": sub(R),
              "four_c": sub(c4),
              "spo2_room_air": sub(spo2_ra), "visit_number": sub(vno) + 1,
              "eta_mortality_structured": sub(eta_m_struct), "eta_mortality_notes": sub(eta_m_note),
              "eta_home_structured": sub(eta_h_struct), "eta_home_notes": sub(eta_h_note),
              "eta_readmission_structured": sub(eta_r_struct), "eta_readmission_notes": sub(eta_r_note),
              "p_home": sub(h)}
    events = {"died": sub(died), "died_in_index_stay": sub(died_in_index), "sent_home": sub(sent_home),
              "return_admission": sub(return_admit), "ward_readmission": sub(ward_readmit)}
    oracle = {"visit_id": visit_id, "risk_mortality_30d": sub(risk_mort),
              "risk_safe_discharge": sub(risk_safe), "risk_readmission_30d": sub(risk_readm)}

    _apply_missingness(table, latent, prof, rng)
    if notes:
        writer = _NoteWriter(k, prof, rng)
        table.update(writer.write_all(table, latent))
        if harder:  # drawn after everything else, so the other columns stay as in the default cohort
            table.update(messier_notes(table, k, np.random.default_rng(rng.integers(2**63))))
    else:
        for c in NOTE_COLUMNS:
            table[c] = np.full(n, "", dtype=object)
    table["mortality_30d"] = sub(mortality)
    table["safe_discharge"] = sub(safe)
    table["readmission_30d"] = sub(readm)
    table = {c: table[c] for c in COLUMNS}
    return {"table": table, "oracle": oracle, "latent": latent, "events": events}


def _apply_missingness(table: dict, latent: dict, prof: SiteProfile, rng: np.random.Generator) -> None:
    """Blank values in place: per-site rates; labs are skipped more often in milder visits."""
    n = len(table["visit_id"])
    acuity = np.clip(latent["severity"], -3, 3)
    for key, base in BASE_MISSING.items():
        cols = ("urea", "creatinine") if key == "renal" else (key,)
        if any(c in prof.never_measured for c in cols):
            miss = np.ones(n, dtype=bool)
        else:
            p = min(0.9, base * prof.missing_scale)
            if key in VITALS:
                miss = rng.random(n) < p
            else:
                miss = rng.random(n) < _sigmoid(_logit(p) - 0.5 * acuity)
        for c in cols:
            table[c] = np.where(miss, np.nan, table[c]).astype(float)
    table["on_oxygen"] = np.where(np.isnan(table["spo2"]), np.nan, table["on_oxygen"])


# ----------------------------------------------------------------------------------------------------------
# notes
#
# Graded banks (level 0 = best ... 4 = worst) carry the note-only traits; each site prefers some variants
# of every bank over others (fixed Dirichlet weights per site). Plain banks are the rest of the text.

GESTALT = (  # the clinician's impression: H (plus a little measured severity)
    ("well appearing", "comfortable at rest", "in no acute distress, speaking full sentences", "looks well",
     "well-appearing, no respiratory distress"),
    ("nontoxic, conversant", "mildly ill appearing but comfortable", "no acute distress",
     "appears stable, not in respiratory distress"),
    ("tired but conversant", "appears fatigued", "mildly uncomfortable", "looks tired, mild distress"),
    ("looks unwell", "ill appearing", "uncomfortable, speaking in short sentences", "appears unwell"),
    ("toxic appearing", "appears very unwell, in distress", "looks sick, I am worried about this patient",
     "ill and toxic appearing"),
)
TRIAGE_LOOK = (  # the triage nurse's view: a noisier H
    ("ambulatory to triage, NAD", "walked in, appears comfortable", "NAD"),
    ("NAD", "appears comfortable", "ambulatory"),
    ("appears tired", "appears uncomfortable", "mild distress"),
    ("appears unwell", "uncomfortable", "arrived by EMS, appears unwell"),
    ("in resp distress", "arrived by EMS on stretcher, appears very ill", "distressed, diaphoretic"),
)
FRAILTY = (  # F
    ("active, works full time", "very active at baseline, still drives", "independent, exercises daily"),
    ("independent in ADLs", "lives independently, ambulates without assistance", "independent at baseline"),
    ("uses a cane", "needs help with some ADLs", "slow gait at baseline, uses cane outdoors"),
    ("frail, uses walker", "recent falls, uses walker", "frail, high fall risk",
     "uses walker, 2 falls this year"),
    ("bed-bound", "bed-bound, dependent for all ADLs", "bed-bound, needs total care"),
)
SOCIAL = (  # S
    ("lives with spouse, good support at home", "strong family support",
     "lives with wife and adult children"),
    ("lives with family", "daughter nearby checks in daily", "lives with partner"),
    ("lives alone", "lives alone, son visits weekly", "lives alone, neighbour checks in"),
    ("lives alone, poor follow-up", "unable to obtain medications", "no PCP, missed prior appointments",
     "lives alone, no transportation to follow-up"),
    ("homeless", "currently homeless, staying in shelter", "unstably housed, no phone"),
)
CODE_LIMITED = ("DNR/DNI", "comfort-focused care", "family wishes no escalation",  # L = 1
                "DNR/DNI per advance directive, not for ICU", "goals of care discussed: comfort-focused care",
                "DNR, family wishes no escalation of care")
CODE_FULL = ("full code", "Full code, confirmed with pt", "no DNR on file", "FULL CODE")  # L = 0
LEAN = (  # disposition thinking: the clinician's noisy estimate of P(sent home), not the decision
    ("likely discharge home with return precautions", "plan d/c home with pulse oximeter if sat ok",
     "safe for outpatient management if tolerating PO", "anticipate discharge home after ambulation trial"),
    ("obs vs admit, reassess after ambulation trial", "consider admission if desaturates on ambulation",
     "reassess after fluids, dispo pending"),
    ("admit to medicine", "admit, telemetry", "anticipate admission, may need higher level of care",
     "admit, low threshold for ICU consult"),
)
LUNGS = (  # respiratory involvement R, noisy
    ("clear to auscultation bilaterally", "CTAB", "clear, no wheezes"),
    ("scattered crackles", "few bibasilar crackles", "mild crackles at bases"),
    ("bibasilar crackles, mildly increased work of breathing", "bilateral crackles, tachypneic"),
    ("diffuse crackles, increased work of breathing", "coarse bilateral crackles, accessory muscle use"),
)
CXR = (
    ("no focal consolidation", "clear lungs", "no acute cardiopulmonary process"),
    ("subtle peripheral opacities", "mild bibasilar opacities"),
    ("bilateral patchy opacities", "multifocal ground-glass opacities"),
    ("diffuse bilateral opacities", "extensive bilateral airspace disease"),
)
SYMPTOMS = {"sob": ("shortness of breath", "SOB", "dyspnea"), "cough": ("cough", "dry cough"),
            "fever": ("fever", "fevers"), "fatigue": ("fatigue", "malaise"),
            "myalgia": ("myalgias", "body aches"), "anosmia": ("loss of taste and smell", "anosmia"),
            "diarrhea": ("diarrhea",), "headache": ("headache",), "chest": ("chest tightness",),
            "confusion": ("confusion",), "fall": ("a fall at home",), "weakness": ("generalized weakness",)}
SYMPTOM_P = (("cough", 0.7), ("fever", 0.65), ("fatigue", 0.45), ("myalgia", 0.25), ("anosmia", 0.12),
             ("diarrhea", 0.12), ("headache", 0.12), ("chest", 0.08))
PMH_NAMES = {"hypertension": ("HTN", "hypertension"), "diabetes": ("DM2", "type 2 diabetes", "diabetes"),
             "chronic_lung_disease": ("COPD", "asthma", "chronic lung disease"),
             "heart_failure": ("CHF", "heart failure", "HFrEF"),
             "chronic_kidney_disease": ("CKD", "CKD stage 3", "chronic kidney disease"),
             "immunosuppression": ("kidney transplant on tacrolimus", "on chemotherapy for lymphoma",
                                   "chronic prednisone use", "rheumatoid arthritis on methotrexate"),
             "dementia": ("dementia", "Alzheimer dementia")}
HOME_MEDS = {"hypertension": ("lisinopril", "amlodipine", "losartan"),
             "diabetes": ("metformin", "insulin glargine"),
             "chronic_lung_disease": ("albuterol inhaler", "tiotropium", "fluticasone/salmeterol"),
             "heart_failure": ("furosemide", "carvedilol", "sacubitril/valsartan"),
             "chronic_kidney_disease": ("calcitriol", "sodium bicarbonate"),
             "immunosuppression": ("tacrolimus", "prednisone", "methotrexate"),
             "dementia": ("donepezil", "memantine")}
NEGATIONS = ("denies chest pain", "no hemoptysis", "denies sick contacts", "no leg swelling",
             "denies abdominal pain", "no recent travel")
# plain banks: key -> variants
PHRASES: dict[str, tuple[str, ...]] = {
    "care-home": ("resides in nursing home", "NH resident", "lives in a care home",
                  "from long-term care facility"),
    "tri-covid": ("COVID+ on home test", "COVID swab positive 2 days ago", "known COVID contact at home",
                  "COVID test pending", "+ COVID PCR"),
    "tri-sat": ("sat ", "SpO2 ", "O2 sat "),
    "tri-nh": ("from NH", "sent from nursing home", "NH resident"),
    "tri-walker": ("w/ walker", "wheelchair to triage", "unsteady gait"),
    "tri-neg": ("denies CP", "no chest pain", "denies N/V", "no CP"),
    "tri-extra": ("Pt placed in resp isolation.", "Masked, roomed.", "Family at bedside.",
                  "Allergies: NKDA."),
    "ra": ("RA", "on RA", "on room air"),
    "pmh-none-a": ("with no significant PMH", "with no known PMH"),
    "pmh-none-b": ("without significant past medical history", "who is previously healthy and"),
    "pmh-none-c": ("no PMH", "no sig PMH", "previously healthy"),
    "hpi-onset": ("gradually worsening", "worse over the last 2 days", "progressively worse since onset",
                  "waxing and waning"),
    "hpi-assoc": ("Also reports ", "Associated ", "Endorses "),
    "meds-label": ("Meds: ", "Home meds: ", "Medications: "),
    "covid-test": ("SARS-CoV-2 PCR positive today.", "Positive COVID antigen test at home.",
                   "COVID PCR sent from ED.", "Household contact with confirmed COVID."),
    "ros": ("ROS: otherwise negative in 10 systems.", "ROS: all other systems reviewed and negative.",
            "ROS: negative except as noted in the HPI."),
    "gen-neutral": ("alert", "awake, alert", "A&O"),
    "cv": ("RRR, no murmur", "regular rate and rhythm", "RRR"),
    "exam-other": ("Abd: soft, NT/ND.", "Ext: no edema.", "HEENT: dry mucous membranes.", "Skin: warm, dry.",
                   "Abdomen soft, nontender. No calf tenderness."),
    "neuro-conf": ("confused, oriented to self only", "drowsy but rousable", "disoriented"),
    "neuro-ok": ("A&Ox3", "alert and oriented x3", "no focal deficits"),
    "ed-course": ("In ED: acetaminophen 1 g PO.", "Given 1 L NS in ED.",
                  "Received acetaminophen and IV fluids in ED.",
                  "In ED given antipyretic, ambulatory sat to be checked."),
    "ap-dx": ("COVID-19 pneumonia", "COVID-19 infection", "Acute COVID-19", "Viral pneumonia, COVID-19"),
    "ap-hyp": (" with hypoxemia", " with acute hypoxic respiratory failure", ", hypoxic"),
    "ap-o2": ("O2 to keep sat 92-96%", "supplemental O2, titrate to SpO2 > 92%", "wean O2 as tolerated"),
    "ap-dex": ("dexamethasone 6 mg daily", "start dexamethasone", "dexamethasone"),
    "ap-hyp-extra": ("continuous pulse oximetry", "awake proning as tolerated", "VTE prophylaxis",
                     "trend inflammatory markers"),
    "ap-supp": ("supportive care, antipyretics", "tylenol prn, fluids", "symptomatic treatment"),
    "ap-supp-extra": ("oral hydration", "isolation precautions", "ambulatory sat check",
                      "encourage incentive spirometry"),
    "ap-extra": ("CXR reviewed", "labs sent, f/u CBC, BMP, CRP", "ECG reviewed", "blood cultures if febrile",
                 "repeat ambulatory sat"),
    "code-label": ("Code status: ", "Code: ", ""),
    "ap-labs": ("F/u CBC, BMP, CRP, D-dimer.", "Follow up labs and blood cultures.", "Trend CRP and LDH.",
                "Check ambulatory saturation before any dispo."),
    "ap-iso": ("Droplet and contact isolation.", "COVID isolation precautions.",
               "Airborne precautions for aerosol-generating procedures."),
    "ap-discussed": ("Plan discussed with pt.", "Discussed with pt and family at bedside.",
                     "Updated daughter by phone.", "Pt agrees with plan."),
    "filler": ("The patient was seen and examined at the bedside.", "Nursing notes and vital signs reviewed.",
               "History obtained from the patient and family.", "Discussed with the attending physician.",
               "Risks and benefits discussed with the patient, who agrees with the plan.",
               "Prior records reviewed in the electronic health record."),
}
# `--harder` only (docs/cohort.md, "Harder cohort"): the notes of one site are written in Swedish (the seed paper's
# six EDs wrote Swedish), every site's physician notes carry copied-forward text, and words have typos.
SWEDISH_SITE = 3
SWEDISH: dict[str, str] = {
    # graded banks: the note-only traits
    "well appearing": "opåverkad", "comfortable at rest": "bekväm i vila",
    "in no acute distress, speaking full sentences": "ej akut påverkad, talar hela meningar",
    "looks well": "ser pigg ut", "well-appearing, no respiratory distress": "opåverkad, ingen andningspåverkan",
    "nontoxic, conversant": "ej toxisk, samtalar", "mildly ill appearing but comfortable": "lätt påverkad men bekväm",
    "no acute distress": "ej akut påverkad",
    "appears stable, not in respiratory distress": "stabil, ej andningspåverkad",
    "tired but conversant": "trött men samtalar", "appears fatigued": "ser trött ut",
    "mildly uncomfortable": "lätt obekväm", "looks tired, mild distress": "ser trött ut, lätt påverkad",
    "looks unwell": "ser sjuk ut", "ill appearing": "sjukdomspåverkad",
    "uncomfortable, speaking in short sentences": "obekväm, talar i korta meningar", "appears unwell": "verkar sjuk",
    "toxic appearing": "toxiskt påverkad", "appears very unwell, in distress": "mycket sjuk, kraftigt påverkad",
    "looks sick, I am worried about this patient": "ser sjuk ut, jag är orolig för patienten",
    "ill and toxic appearing": "sjuk och toxiskt påverkad",
    "ambulatory to triage, NAD": "gående till triage, opåverkad", "walked in, appears comfortable": "kom gående",
    "appears comfortable": "verkar bekväm", "ambulatory": "gående", "appears tired": "verkar trött",
    "appears uncomfortable": "verkar obekväm", "mild distress": "lätt påverkad",
    "arrived by EMS, appears unwell": "kom med ambulans, verkar sjuk", "in resp distress": "andningspåverkad",
    "arrived by EMS on stretcher, appears very ill": "kom med ambulans på bår, mycket sjuk",
    "distressed, diaphoretic": "påverkad, kallsvettig", "uncomfortable": "obekväm", "NAD": "opåverkad",
    "active, works full time": "aktiv, arbetar heltid",
    "very active at baseline, still drives": "mycket aktiv i vanliga fall, kör bil",
    "independent, exercises daily": "självständig, motionerar dagligen", "independent in ADLs": "oberoende i ADL",
    "lives independently, ambulates without assistance": "bor självständigt, går utan hjälp",
    "independent at baseline": "självständig i vanliga fall", "uses a cane": "går med käpp",
    "needs help with some ADLs": "behöver hjälp med viss ADL",
    "slow gait at baseline, uses cane outdoors": "långsam gång, käpp utomhus", "frail, uses walker": "skör, rollator",
    "recent falls, uses walker": "nyligen fallit, rollator", "frail, high fall risk": "skör, hög fallrisk",
    "uses walker, 2 falls this year": "rollator, 2 fall i år",
    "bed-bound, dependent for all ADLs": "sängliggande, beroende i all ADL",
    "bed-bound, needs total care": "sängliggande, behöver total omvårdnad", "bed-bound": "sängliggande",
    "lives with spouse, good support at home": "sammanboende, gott stöd hemma",
    "strong family support": "starkt stöd från familjen", "lives with wife and adult children": "bor med fru och barn",
    "lives with family": "bor med familj", "daughter nearby checks in daily": "dotter tittar till dagligen",
    "lives with partner": "sambo", "lives alone, poor follow-up": "ensamboende, dålig uppföljning",
    "unable to obtain medications": "kan inte hämta ut läkemedel",
    "no PCP, missed prior appointments": "ingen husläkare, uteblivit från besök",
    "lives alone, no transportation to follow-up": "ensamboende, saknar transport till återbesök",
    "lives alone, son visits weekly": "ensamboende, son hälsar på varje vecka",
    "lives alone, neighbour checks in": "ensamboende, granne tittar till", "lives alone": "ensamboende",
    "currently homeless, staying in shelter": "bostadslös, bor på härbärge",
    "unstably housed, no phone": "osäkert boende, ingen telefon", "homeless": "bostadslös",
    "DNR/DNI per advance directive, not for ICU": "ej HLR enligt vårdplan, ej aktuell för IVA",
    "goals of care discussed: comfort-focused care": "vårdnivå diskuterad: palliativ vård",
    "DNR, family wishes no escalation of care": "ej HLR, familjen önskar ingen upptrappning",
    "DNR/DNI": "ej HLR", "comfort-focused care": "palliativ vård",
    "family wishes no escalation": "familjen önskar ingen upptrappning",
    "Full code, confirmed with pt": "full behandling, bekräftat med pat", "full code": "full behandling",
    "no DNR on file": "inget HLR-beslut",
    "likely discharge home with return precautions": "troligen hem med råd om återbesök",
    "plan d/c home with pulse oximeter if sat ok": "plan hem med pulsoximeter om saturation ok",
    "safe for outpatient management if tolerating PO": "kan skötas polikliniskt om pat äter och dricker",
    "anticipate discharge home after ambulation trial": "förväntas gå hem efter gångprov",
    "obs vs admit, reassess after ambulation trial": "observation eller inläggning, ny bedömning efter gångprov",
    "consider admission if desaturates on ambulation": "överväg inläggning om desaturation vid gång",
    "reassess after fluids, dispo pending": "ny bedömning efter vätska, vidare handläggning oklar",
    "admit to medicine": "inläggning medicin", "admit, telemetry": "inläggning, telemetri",
    "anticipate admission, may need higher level of care": "förväntas läggas in, kan behöva högre vårdnivå",
    "admit, low threshold for ICU consult": "inläggning, låg tröskel för IVA-konsult",
    "clear to auscultation bilaterally": "normala andningsljud bilateralt", "CTAB": "ua",
    "clear, no wheezes": "rena, inga ronki", "scattered crackles": "spridda rassel",
    "few bibasilar crackles": "enstaka basala rassel", "mild crackles at bases": "lätta basala rassel",
    "bibasilar crackles, mildly increased work of breathing": "basala rassel, lätt ökat andningsarbete",
    "bilateral crackles, tachypneic": "bilaterala rassel, takypné",
    "diffuse crackles, increased work of breathing": "diffusa rassel, ökat andningsarbete",
    "coarse bilateral crackles, accessory muscle use": "grova rassel bilateralt, använder hjälpmuskulatur",
    "no focal consolidation": "ingen fokal konsolidering", "clear lungs": "fria lungor",
    "no acute cardiopulmonary process": "ingen akut kardiopulmonell process",
    "subtle peripheral opacities": "diskreta perifera förtätningar",
    "mild bibasilar opacities": "lätta basala förtätningar", "bilateral patchy opacities": "fläckiga förtätningar",
    "multifocal ground-glass opacities": "multifokala matglasförtätningar",
    "diffuse bilateral opacities": "diffusa bilaterala förtätningar",
    "extensive bilateral airspace disease": "utbredda bilaterala förtätningar",
    # frequent words of the rest of the text
    "shortness of breath": "andfåddhet", "dyspnea": "dyspné", "dry cough": "torrhosta", "cough": "hosta",
    "fevers": "feber", "fever": "feber", "fatigue": "trötthet", "malaise": "sjukdomskänsla",
    "body aches": "värk i kroppen", "loss of taste and smell": "nedsatt lukt och smak", "diarrhea": "diarré",
    "headache": "huvudvärk", "confusion": "förvirring", "generalized weakness": "allmän svaghet",
    "resides in nursing home": "bor på äldreboende", "lives in a care home": "bor på vårdboende",
    "nursing home": "äldreboende", "Social": "Socialt", "Baseline": "Habitualtillstånd", "days": "dagar",
    "admit": "inläggning", "discharge": "utskrivning", "home": "hem",
}
_SWEDISH_PATTERN = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in sorted(SWEDISH, key=len, reverse=True))
                              + r")\b", re.IGNORECASE)
_SWEDISH_LOWER = {k.lower(): v for k, v in SWEDISH.items()}
COPY_FORWARD_P = 0.5  # share of physician notes that open with text copied from an earlier note
TYPO_P = 0.03  # share of words of 4+ letters with two neighbouring letters swapped


def messier_notes(table: dict, k: int, rng: np.random.Generator) -> dict:
    """`--harder` notes: copied-forward text at the top of half the physician notes (it pushes the history, where
    social and functional status sit, past a short token budget), typos, and site SWEDISH_SITE in Swedish (the
    contract's section headers stay, as a site's export maps them)."""
    filler = PHRASES["filler"] + PHRASES["ros"] + PHRASES["exam-other"] + PHRASES["ed-course"]
    out = {}
    for col in NOTE_COLUMNS:
        notes = np.array(table[col], dtype=object)
        for i, text in enumerate(notes):
            if not text:
                continue
            if col == "note_physician" and rng.random() < COPY_FORWARD_P:
                copied = rng.choice(len(filler), size=int(rng.integers(4, 10)), replace=True)
                text = "Copied from prior note: " + " ".join(filler[j] for j in copied) + "\n" + text
            if k == SWEDISH_SITE:
                text = _SWEDISH_PATTERN.sub(lambda m: _SWEDISH_LOWER[m.group(0).lower()], text)
            notes[i] = _typos(text, rng)
        out[col] = notes
    return out


def _typos(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    for j, word in enumerate(words):
        if len(word) >= 4 and word.isalpha() and word.lower() not in ("impression", "assessment")  \
                and rng.random() < TYPO_P:
            at = int(rng.integers(0, len(word) - 1))
            words[j] = word[:at] + word[at + 1] + word[at] + word[at + 2:]
    return " ".join(words)


# (pattern, replacement) abbreviations: terse sites apply nearly all, verbose sites almost none
ABBREVIATIONS = tuple((re.compile(p), r) for p, r in (
    (r"\bshortness of breath\b", "SOB"), (r"\bcomplains of\b", "c/o"), (r"\bpatient\b", "pt"),
    (r"\bwithout\b", "w/o"), (r"\bwith\b", "w/"), (r"\bhistory of\b", "h/o"),
    (r"\bno acute distress\b", "NAD"), (r"\broom air\b", "RA"), (r"\bnursing home\b", "NH"),
    (r"\bbilateral\b", "b/l"), (r"\bdischarge\b", "d/c"), (r"\bsaturation\b", "sat"), (r"\bdays\b", "d"),
    (r"\band\b", "&"), (r"\bemergency department\b", "ED"), (r"\brespiratory\b", "resp"),
    (r"\bfollow-up\b", "f/u"),
))
ABBREV_P = {"terse": 0.9, "standard": 0.35, "verbose": 0.03}


def _cap(text: str) -> str:
    """First letter upper case, the rest untouched (keeps DNR, ADLs, PCP, ...)."""
    return text[:1].upper() + text[1:]


def _cut(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    return np.searchsorted(np.asarray(edges), x).astype(int)


def _hypoxic(v: dict) -> bool:
    return bool(v["on_oxygen"] == 1 or (not np.isnan(v["spo2"]) and v["spo2"] < 92))


class _NoteWriter:
    """Writes the three notes of every visit of one site, in the site's style."""

    def __init__(self, k: int, prof: SiteProfile, rng: np.random.Generator) -> None:
        self.k, self.prof, self.rng = k, prof, rng
        self.style = prof.style
        self._weights: dict[str, np.ndarray] = {}

    # -- choices
    def pick(self, key: str, options: tuple[str, ...] | None = None) -> str:
        """One variant of a bank, drawn with the site's fixed preference (the same for every seed)."""
        options = PHRASES[key] if options is None else options
        w = self._weights.get(key)
        if w is None or len(w) != len(options):
            w = np.cumsum(np.random.default_rng([self.k, zlib.crc32(key.encode())])
                          .dirichlet(np.full(len(options), 0.8)))
            self._weights[key] = w
        return options[min(int(np.searchsorted(w, self.rng.random() * w[-1])), len(options) - 1)]

    def fillers(self, count: int) -> list[str]:
        """`count` different filler sentences of a verbose site."""
        chosen: list[str] = []
        for _ in range(4 * count):
            f = self.pick("filler")
            if f not in chosen:
                chosen.append(f)
            if len(chosen) == count:
                break
        return chosen

    def abbreviate(self, text: str) -> str:
        p = ABBREV_P[self.style]
        for pat, rep in ABBREVIATIONS:
            if self.rng.random() < p:
                text = pat.sub(rep, text)
        return text

    # -- all notes
    def write_all(self, t: dict, lat: dict) -> dict:
        rng, n = self.rng, len(t["visit_id"])
        # what the clinicians perceive of the hidden traits, graded into 5 levels with noise
        sev = lat["severity"]
        gestalt = _cut(0.9 * lat["H"] + 0.35 * sev + 0.35 * rng.normal(0, 1, n), (-1.0, -0.3, 0.45, 1.25))
        look = _cut(0.6 * lat["H"] + 0.4 * sev + 0.8 * rng.normal(0, 1, n), (-1.0, -0.3, 0.5, 1.4))
        frail = _cut(lat["F"] + 0.35 * rng.normal(0, 1, n), (-0.8, 0.3, 1.0, 1.7))
        social = _cut(lat["S"] + 0.35 * rng.normal(0, 1, n), (-0.8, 0.3, 1.0, 1.8))
        lean = 2 - _cut(np.log(lat["p_home"] / (1 - lat["p_home"])) + rng.normal(0, 1, n), (-0.6, 0.4))
        lungs = np.clip(np.round(0.8 * lat["respiratory"] + 0.8 * rng.normal(0, 1, n)), -1, 2).astype(int) + 1
        cxr = np.clip(np.round(0.8 * lat["respiratory"] + 0.8 * rng.normal(0, 1, n)), -1, 2).astype(int) + 1
        empty = rng.random((3, n)) < np.asarray(self.prof.empty_note)[:, None]
        out = {c: np.empty(n, dtype=object) for c in NOTE_COLUMNS}
        for i in range(n):
            v = {c: t[c][i] for c in t}
            v.update(spo2_ra=lat["spo2_room_air"][i], frailty=lat["F"][i], limited=lat["L"][i],
                     gestalt=gestalt[i], look=look[i], frail=frail[i], social=social[i], lean=lean[i],
                     lungs=lungs[i], cxr=cxr[i])
            v["sx"], v["days"] = self._symptoms(v), int(1 + rng.poisson(4))
            out["note_triage"][i] = "" if empty[0, i] else self.triage(v)
            out["note_physician"][i] = "" if empty[1, i] else self.physician(v)
            out["note_assessment_plan"][i] = "" if empty[2, i] else self.plan(v)
        return out

    # -- pieces
    def _symptoms(self, v: dict) -> list[str]:
        rng = self.rng
        keys = ["sob"] if rng.random() < _sigmoid(0.5 * (94 - v["spo2_ra"]) + 0.3) else []
        keys += [key for key, p in SYMPTOM_P if rng.random() < p]
        if v["gcs"] < 15 or (v["dementia"] and rng.random() < 0.3):
            keys.insert(0, "confusion")
        if v["frailty"] > 1.2 and rng.random() < 0.3:
            keys.append("fall")
        keys = keys or ["weakness"]
        rest = [keys[j] for j in rng.permutation(len(keys) - 1) + 1][:3]
        return [self.pick("sx-" + key, SYMPTOMS[key]) for key in [keys[0], *rest]]

    def _sat_text(self, v: dict) -> str:
        if np.isnan(v["spo2"]):
            return ""
        if v["on_oxygen"] == 1:
            flow = int(self.rng.integers(2, 7))
            where = self.pick("o2", (f"on {flow}L NC", f"on {flow}L", f"on {flow} L nasal cannula", "on O2"))
        else:
            where = self.pick("ra")
        return f"{int(v['spo2'])}% {where}"

    def triage(self, v: dict) -> str:
        rng, terse = self.rng, self.style == "terse"
        age, sx, days = int(v["age"]), v["sx"], v["days"]
        sex_s, sex_l = ("M", "male") if v["sex"] == "male" else ("F", "female")
        intro = self.pick("tri-intro", (f"{age}yo {sex_s}", f"{age} y/o {sex_l}", f"{age} year old {sex_l}",
                                        f"Pt is a {age} yo {sex_s}"))
        cc = self.pick("tri-cc", (f"c/o {sx[0]} x{days}d", f"complains of {sx[0]} for {days} days",
                                  f"presents with {sx[0]} x {days} days", f"here for {sx[0]}, {days} days"))
        parts = [f"{intro} {cc}"]
        if len(sx) > 1:
            parts.append(", ".join(sx[1:]))
        if rng.random() < 0.7:
            parts.append(self.pick("tri-covid"))
        vit = []
        if not np.isnan(v["resp_rate"]) and rng.random() < 0.65:
            vit.append(f"RR {int(v['resp_rate'])}")
        sat = self._sat_text(v)
        if sat and rng.random() < 0.75:
            vit.append(self.pick("tri-sat") + sat)
        if not np.isnan(v["heart_rate"]) and rng.random() < 0.55:
            vit.append(f"HR {int(v['heart_rate'])}")
        if not np.isnan(v["temperature"]) and rng.random() < 0.6:
            vit.append(f"T {v['temperature']:.1f}")
        if not np.isnan(v["systolic_bp"]) and rng.random() < 0.5:
            vit.append(f"BP {int(v['systolic_bp'])}/{int(round(v['systolic_bp'] * 0.58 + rng.normal(0, 6)))}")
        if vit:
            parts.append(", ".join(vit))
        if v["nursing_home"] and rng.random() < 0.8:
            parts.append(self.pick("tri-nh"))
        if rng.random() < 0.55:
            parts.append(self.pick(f"tri-look-{v['look']}", TRIAGE_LOOK[v["look"]]))
        if v["frail"] >= 3 and rng.random() < 0.35:
            parts.append(self.pick("tri-walker"))
        if rng.random() < 0.5:
            parts.append(self.pick("tri-neg"))
        if not terse and rng.random() < 0.4:
            parts.append(self.pick("tri-extra"))
        if not terse:
            parts = [_cap(p) for p in parts]
        return self.abbreviate(". ".join(p.rstrip(".") for p in parts) + ".")

    def physician(self, v: dict) -> str:
        rng, style = self.rng, self.style
        age, sx, days = int(v["age"]), v["sx"], v["days"]
        sex_s, sex_w = ("M", "man") if v["sex"] == "male" else ("F", "woman")
        # history
        pmh = [self.pick("pmh-" + c, PMH_NAMES[c]) for c in COMORBIDITIES if v[c] and rng.random() < 0.75]
        if pmh:
            text = ", ".join(pmh)
            clause = (f"with PMH of {text}", f"with history of {text}", f"PMH {text}")
        else:
            clause = (self.pick("pmh-none-a"), self.pick("pmh-none-b"), self.pick("pmh-none-c"))
        onset = self.pick("hpi-onset")
        s = [self.pick("hpi", (
            f"HPI: {age} yo {sex_w} {clause[0]} presenting with {days} days of {sx[0]}, {onset}.",
            f"{age} year old {sex_w} {clause[1]} who presents with {sx[0]} for {days} days, {onset}.",
            f"HPI: {age}{sex_s}, {clause[2]}, here with {sx[0]} x{days}d, {onset}.",
        )).replace("and who presents", "and presents")]
        if len(sx) > 1:
            s.append(self.pick("hpi-assoc") + ", ".join(sx[1:]) + ".")
        negs = [NEGATIONS[j] for j in rng.permutation(len(NEGATIONS))[: int(rng.integers(1, 4))]]
        if rng.random() < 0.5:
            s.append("Denies " + ", ".join(x.replace("denies ", "").replace("no ", "") for x in negs) + ".")
        else:
            s.append(" ".join(_cap(x) + "." for x in negs))
        if not v["chronic_lung_disease"] and rng.random() < 0.4:
            s.append("Not on home O2.")
        if rng.random() < 0.6:
            meds = [self.pick("med-" + c, HOME_MEDS[c]) for c in COMORBIDITIES if v[c]]
            s.append(self.pick("meds-label") + (", ".join(meds) if meds else "none") + ".")
        if rng.random() < 0.5:
            s.append(self.pick("covid-test"))
        if v["nursing_home"]:
            s.append(_cap(self.pick("care-home")) + ".")
        elif rng.random() < 0.3:
            s.append("Social: " + self.pick(f"social-{v['social']}", SOCIAL[v["social"]]) + ".")
        if rng.random() < 0.3:
            s.append("Baseline: " + self.pick(f"frail-{v['frail']}", FRAILTY[v["frail"]]) + ".")
        if style == "verbose":
            s.append(self.pick("ros"))
            s.extend(self.fillers(2))
        elif rng.random() < 0.4:
            s.append("ROS otherwise negative.")
        # exam
        vit = [fmt.format(v[col]) for col, fmt in (("temperature", "T {:.1f}"), ("heart_rate", "HR {:.0f}"),
                                                   ("resp_rate", "RR {:.0f}"))
               if not np.isnan(v[col]) and rng.random() < 0.45]
        sat = self._sat_text(v)
        if sat and rng.random() < 0.5:
            vit.append("SpO2 " + sat)
        exam = ["EXAM: " + (", ".join(vit) + "." if vit else "Vitals reviewed.")]
        if rng.random() < 0.6:
            exam.append("General: " + self.pick(f"gestalt-{v['gestalt']}", GESTALT[v["gestalt"]]) + ".")
        else:
            exam.append("General: " + self.pick("gen-neutral") + ".")
        exam.append("Lungs: " + self.pick(f"lungs-{v['lungs']}", LUNGS[v["lungs"]]) + ".")
        tachy = not np.isnan(v["heart_rate"]) and v["heart_rate"] > 100
        exam.append("CV: " + ("tachycardic, regular rhythm" if tachy else self.pick("cv")) + ".")
        if rng.random() < 0.6:
            exam.append(self.pick("exam-other"))
        if v["gcs"] < 15 and rng.random() < 0.7:
            exam.append("Neuro: " + self.pick("neuro-conf") + ".")
        elif rng.random() < 0.6:
            exam.append("Neuro: " + self.pick("neuro-ok") + ".")
        if rng.random() < 0.7:
            exam.append("CXR: " + self.pick(f"cxr-{v['cxr']}", CXR[v["cxr"]]) + ".")
        if rng.random() < 0.5:
            exam.append(self.pick("ed-course"))
        # impression: where the clinician's gestalt goes
        hyp = _hypoxic(v)
        dx = self.pick("imp-dx", ("hypoxemic " * hyp + "COVID-19 pneumonia",
                                  "COVID-19 infection" + ", hypoxemic" * hyp,
                                  "hypoxemic " * hyp + "COVID-19 pneumonitis",
                                  "acute COVID-19" + " with hypoxia" * hyp))
        imp = [self.pick("imp-intro", (f"{age}{sex_s} with {dx}", f"{age} yo {sex_w} with {dx}",
                                       f"{_cap(dx)} in a {age} year old {sex_w}"))]
        imp.append(self.pick(f"imp-gestalt-{v['gestalt']}", GESTALT[v["gestalt"]]))
        if rng.random() < 0.25:
            imp.append(self.pick(f"frail-{v['frail']}", FRAILTY[v["frail"]]))
        text = " ".join(s) + "\n" + " ".join(exam) + "\nIMPRESSION: " + "; ".join(imp) + "."
        return self.abbreviate(text)

    def plan(self, v: dict) -> str:
        rng, style = self.rng, self.style
        hyp = _hypoxic(v)
        s = [self.pick("ap-dx") + (self.pick("ap-hyp") if hyp else "") + "."]
        if hyp:
            tx = [self.pick("ap-o2"), self.pick("ap-dex")]
            if rng.random() < 0.6:
                tx.append(self.pick("ap-hyp-extra"))
        else:
            tx = [self.pick("ap-supp")]
            if rng.random() < 0.6:
                tx.append(self.pick("ap-supp-extra"))
        if rng.random() < 0.6:
            tx.append(self.pick("ap-extra"))
        s.append(_cap("; ".join(tx)) + ".")
        # code status: documented more often when care is limited
        if v["limited"] and rng.random() < 0.88:
            s.append(_cap(self.pick("code-label") + self.pick("code-limited", CODE_LIMITED)) + ".")
        elif not v["limited"] and rng.random() < 0.6:
            s.append(_cap(self.pick("code-label") + self.pick("code-full", CODE_FULL)) + ".")
        if rng.random() < 0.55:
            s.append(_cap(self.pick(f"lean-{v['lean']}", LEAN[v["lean"]])) + ".")
        if v["nursing_home"]:
            if rng.random() < 0.7:
                s.append(_cap(self.pick("care-home")) + ".")
        elif rng.random() < 0.85:
            s.append(_cap(self.pick(f"social-{v['social']}", SOCIAL[v["social"]])) + "."
                     + (" SW consult." if v["social"] >= 3 and rng.random() < 0.5 else ""))
        if rng.random() < 0.65:
            s.append(_cap(self.pick(f"frail-{v['frail']}", FRAILTY[v["frail"]])) + "."
                     + (" PT eval." if v["frail"] >= 3 and rng.random() < 0.5 else ""))
        if rng.random() < 0.7:
            s.append(self.pick("ap-labs"))
        if style != "terse" and rng.random() < 0.5:
            s.append(self.pick("ap-iso"))
        if rng.random() < 0.4:
            s.append(self.pick("ap-discussed"))
        if style == "verbose":
            s.extend(self.fillers(2))
            if v["lean"] == 0 and rng.random() < 0.5:
                s.append("Return precautions and isolation instructions reviewed.")
        if style != "standard":  # the standard sites keep one order; the others vary it
            s = s[:2] + [s[j] for j in rng.permutation(len(s) - 2) + 2]
        return self.abbreviate("ASSESSMENT/PLAN: " + " ".join(s))


# ----------------------------------------------------------------------------------------------------------
# summary and files


def _summary(k: int, prof: SiteProfile, sim: dict) -> dict:
    t = sim["table"]
    n = len(t["visit_id"])
    pids, counts = np.unique(t["patient_id"], return_counts=True)
    readm = t["readmission_30d"]
    known = ~np.isnan(readm)
    prev = {"mortality_30d": float(np.mean(t["mortality_30d"])),
            "safe_discharge": float(np.mean(t["safe_discharge"])),
            "readmission_30d": float(np.mean(readm[known])) if known.any() else None}
    miss = {c: round(float(np.mean(np.isnan(t[c]))), 4) for c in (*VITALS, "on_oxygen", *LABS)}
    miss.update({c: round(float(np.mean(t[c] == "")), 4) for c in NOTE_COLUMNS})
    group = four_c_group(sim["latent"]["four_c"])
    group_names = ("low_0_3", "intermediate_4_8", "high_9_14", "very_high_15_21")
    return {
        "profile": {**asdict(prof), "never_measured": list(prof.never_measured)},
        "visits": n,
        "patients": int(len(pids)),
        "patients_with_several_visits": int(np.sum(counts > 1)),
        "share_patients_with_several_visits": round(float(np.mean(counts > 1)), 4),
        "arrival_date_range": [str(t["arrival_date"].min()), str(t["arrival_date"].max())],
        "prevalence": {k_: round(v_, 4) if v_ is not None else None for k_, v_ in prev.items()},
        "positives": {"mortality_30d": int(np.sum(t["mortality_30d"])),
                      "safe_discharge": int(np.sum(t["safe_discharge"])),
                      "readmission_30d": int(np.nansum(readm))},
        "readmission_not_applicable": int(np.sum(~known)),
        "mean_risk": {c: round(float(np.nanmean(sim["oracle"][c])), 4) for c in ORACLE_COLUMNS[1:]},
        "missingness": miss,
        "age_median": float(np.median(t["age"])),
        "male_share": round(float(np.mean(t["sex"] == "male")), 4),
        "nursing_home_share": round(float(np.mean(t["nursing_home"])), 4),
        "four_c_groups": {name: {"visits": int(np.sum(group == g)),
                                 "mortality": round(float(np.mean(t["mortality_30d"][group == g])), 4)
                                 if np.any(group == g) else None}
                          for g, name in enumerate(group_names)},
    }


def _overall(sites: list[dict]) -> dict:
    visits = sum(s["visits"] for s in sites)
    known_readm = visits - sum(s["readmission_not_applicable"] for s in sites)
    pos = {o: sum(s["positives"][o] for s in sites) for o in OUTCOMES}
    return {"visits": visits, "patients": sum(s["patients"] for s in sites),
            "prevalence": {"mortality_30d": round(pos["mortality_30d"] / visits, 4),
                           "safe_discharge": round(pos["safe_discharge"] / visits, 4),
                           "readmission_30d": round(pos["readmission_30d"] / max(1, known_readm), 4)},
            "positives": pos, "readmission_not_applicable": visits - known_readm}


def _write_parquet(columns: dict, schema: pa.Schema, path: Path) -> None:
    arrays = []
    for f in schema:
        col = columns[f.name]
        if f.type == pa.date32():
            arrays.append(pa.array(np.asarray(col, dtype="datetime64[D]"), type=pa.date32()))
        elif f.type == pa.string():
            arrays.append(pa.array([str(x) for x in col], type=pa.string()))
        elif f.type == pa.float64():
            arrays.append(pa.array(np.asarray(col, dtype=float), type=pa.float64(), from_pandas=True))
        else:
            arrays.append(pa.array(np.asarray(col, dtype=np.int64), type=f.type))
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)


def _check_args(n_sites, visits_per_site, seed) -> None:
    def whole(x) -> bool:
        return not isinstance(x, bool) and isinstance(x, int | np.integer)

    if not whole(n_sites) or not 1 <= n_sites <= MAX_SITES:
        raise EdfedError(f"cohort: the number of sites must be a whole number from 1 to {MAX_SITES}, "
                         f"not {n_sites!r}.")
    if visits_per_site is not None and (
            not whole(visits_per_site) or not MIN_VISITS_PER_SITE <= visits_per_site <= MAX_VISITS_PER_SITE):
        raise EdfedError(f"cohort: visits per site must be a whole number from {MIN_VISITS_PER_SITE} to "
                         f"{MAX_VISITS_PER_SITE:,}, not {visits_per_site!r}.")
    if not whole(seed) or seed < 0:
        raise EdfedError(f"cohort: the seed must be a whole number >= 0, not {seed!r}.")


def generate_cohort(out: Path, n_sites: int = 6, visits_per_site: int | None = None, seed: int = 0,
                    harder: bool = False) -> Path:
    """Write the simulated cohort into the folder `out` (which must not exist or be empty); returns it.

    `harder` adds effects the default cohort lacks (docs/cohort.md, "Harder cohort"); without it the files are
    exactly those of earlier versions.

    Everything is built in a hidden sibling folder and renamed into place at the end, so `out` is either
    complete or absent. The same seed gives byte-identical files.
    """
    _check_args(n_sites, visits_per_site, seed)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a folder that is not empty" if out.is_dir() else "a file"
        raise EdfedError(f"cohort: {out} already exists and is {what}; choose a new folder (or remove it) "
                         "so no earlier cohort is overwritten. Nothing was written.")
    sizes = site_sizes(n_sites, None if visits_per_site is None else int(visits_per_site))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdfedError(f"cohort: cannot create the parent folder of {out} ({exc.strerror}).") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "oracle").mkdir(parents=True)
        site_rngs = np.random.default_rng(int(seed)).spawn(n_sites)
        summary = {
            "generator": "edfed simulations.cohort",
            "generator_version": GENERATOR_VERSION,
            "settings": {"n_sites": int(n_sites), "visits_per_site": visits_per_site
                         if visits_per_site is None else int(visits_per_site), "seed": int(seed),
                         "site_sizes": sizes, "date_range": [str(DATE_START), str(DATE_END)],
                         **({"harder": {"calendar_mortality": CALENDAR_MORTALITY}} if harder else {})},
            "files": {"sites": [f"site-{k}.parquet" for k in range(1, n_sites + 1)],
                      "oracle": [f"oracle/site-{k}.parquet" for k in range(1, n_sites + 1)]},
            "sites": {},
        }
        progress = None
        if sys.stderr.isatty():
            from rich.progress import Progress
            progress = Progress(transient=True)
            progress.start()
            task = progress.add_task("simulating sites", total=n_sites)
        try:
            for k, (n, rng) in enumerate(zip(sizes, site_rngs, strict=True), start=1):
                sim = simulate_site(k, n, rng, harder=harder)
                _write_parquet(sim["table"], _SCHEMA, tmp / f"site-{k}.parquet")
                _write_parquet(sim["oracle"], _ORACLE_SCHEMA, tmp / "oracle" / f"site-{k}.parquet")
                summary["sites"][f"site-{k}"] = _summary(k, site_profile(k), sim)
                if progress is not None:
                    progress.advance(task)
        finally:
            if progress is not None:
                progress.stop()
        summary["overall"] = _overall(list(summary["sites"].values()))
        (tmp / "cohort.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # an empty folder (checked above) or one that appeared meanwhile
            try:
                out.rmdir()
            except OSError:
                raise EdfedError(f"cohort: {out} was filled by something else while the cohort was being "
                                 "generated; nothing was written.") from None
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


SITE_LIST_KEYS = ("file", "mapping", "encoding")
_SITE_NAME = re.compile(r"^site-[1-9][0-9]*$")


def checked_site_folder(site_list: Path) -> Path:
    """The folder of contract tables for a site list (`--data sites.toml`; docs/data-contract.md):

        [site-1]
        file = "exports/karolinska.csv"     # relative to the TOML file
        mapping = "exports/karolinska.toml" # optional: renames, recodings, date format, encoding
        encoding = "cp1252"                 # optional: over the mapping's and detection

    Every site is read through its mapping and checked against the contract before anything is written; then
    each is written, as the contract names it, to `<list>.checked/site-K.parquet` beside the list (owner-only).
    A table whose contents did not change keeps its file, so the sites' caches stay valid across runs."""
    import tomllib

    from edfed.common.contract import CONTRACT_COLUMNS, load_site
    from edfed.common.files import atomic_write, private_dir

    site_list = Path(site_list)
    try:
        entries = tomllib.loads(site_list.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EdfedError(f"--data {site_list}: cannot read the site list: {exc}") from None
    problems = []
    for name, entry in entries.items():
        if not _SITE_NAME.match(name):
            problems.append(f"[{name}]: a site is named site-K (site-1, site-2, ...)")
        elif not isinstance(entry, dict) or "file" not in entry:
            problems.append(f"[{name}]: needs file = \"PATH\" (its table)")
        elif (unknown := sorted(set(entry) - set(SITE_LIST_KEYS))):
            problems.append(f"[{name}]: unknown key(s) {', '.join(unknown)} (known: {', '.join(SITE_LIST_KEYS)})")
    if not entries:
        problems.append("no sites: add a [site-1] table with file = \"PATH\"")
    if problems:
        raise EdfedError(f"--data {site_list}: " + "; ".join(problems))
    tables = {}
    for name, entry in sorted(entries.items(), key=lambda item: int(item[0].split("-")[1])):
        where = {k: site_list.parent / str(entry[k]) for k in ("file", "mapping") if k in entry}
        table = load_site(where["file"], mapping=where.get("mapping"), encoding=entry.get("encoding"))
        for warning in table.attrs.get("warnings", []):
            print(f"{name} ({where['file']}): {warning}", flush=True)
        tables[name] = table[list(CONTRACT_COLUMNS)]
    folder = private_dir(site_list.parent / f"{site_list.stem}.checked")
    for name, table in tables.items():
        path = folder / f"{name}.parquet"
        fresh = pa.Table.from_pandas(table, preserve_index=False)
        if path.exists():
            try:
                if pq.read_table(path).equals(fresh):
                    continue
            except (OSError, pa.ArrowInvalid):
                pass  # unreadable: rewritten below
        atomic_write(path, lambda tmp, fresh=fresh: pq.write_table(fresh, tmp))
    for stale in folder.glob("site-*.*"):  # a site taken off the list leaves the federation
        if stale.stem not in tables:
            stale.unlink()
    return folder


def ensure_cohort(data_dir: Path, seed: int = 0) -> Path:
    """The data folder `--data` names: the folder itself when it exists; a site list's checked tables
    (`checked_site_folder`); the default simulated cohort generated there when it is the main job's default
    folder (so the README's first command needs no data of its own); otherwise an `EdfedError`, before anything
    is written: a mistyped --data must not train on fake data."""
    from edfed.common.config import DEFAULT_DATA_DIR

    data_dir = Path(data_dir)
    if data_dir.suffix == ".toml" and data_dir.is_file():
        return checked_site_folder(data_dir)
    if data_dir.is_file():
        raise EdfedError(f"--data {data_dir}: a file; name a folder of site-K.parquet|csv files or a site list "
                         "(sites.toml: each site's file and mapping, docs/data-contract.md)")
    if not data_dir.exists() and data_dir.resolve() != DEFAULT_DATA_DIR.resolve():
        raise EdfedError(f"--data {data_dir}: no such folder. Name the folder that holds site-1.parquet|csv ... or a "
                         "site list (sites.toml) "
                         f"(only the default {DEFAULT_DATA_DIR} is generated when missing: `edfed cohort generate "
                         f"--out {data_dir}` makes a simulated cohort there on purpose).")
    if not data_dir.exists():
        print(f"{data_dir} does not exist: generating the default simulated cohort there", flush=True)
        generate_cohort(data_dir, seed=seed)
    return data_dir
