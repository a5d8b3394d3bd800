"""The simulated cohort: files, contract conformance, determinism, outcome logic and the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edfed.common.errors import EdfedError
from edfed.simulations.cohort import generate_cohort, simulate_site, site_sizes

N = 150  # visits per site in these tests
SITES = 6

# written out from docs/data-contract.md on purpose (not imported), so a drift on either side fails here
CONTRACT_COLUMNS = [
    "visit_id", "patient_id", "arrival_date", "age", "sex", "resp_rate", "spo2", "on_oxygen", "heart_rate",
    "systolic_bp", "temperature", "gcs", "crp", "urea", "creatinine", "lymphocytes", "d_dimer", "ldh",
    "hypertension", "diabetes", "chronic_lung_disease", "heart_failure", "chronic_kidney_disease",
    "immunosuppression", "dementia", "nursing_home", "note_triage", "note_physician", "note_assessment_plan",
    "mortality_30d", "safe_discharge", "readmission_30d",
]
RANGES = {"age": (18, 120), "resp_rate": (4, 80), "spo2": (40, 100), "heart_rate": (20, 250),
          "systolic_bp": (40, 300), "temperature": (30, 44), "gcs": (3, 15), "crp": (0, 700),
          "urea": (0, 100), "creatinine": (10, 2500), "lymphocytes": (0, 50), "d_dimer": (0, 100),
          "ldh": (50, 5000)}
FLAGS = ["on_oxygen", "hypertension", "diabetes", "chronic_lung_disease", "heart_failure",
         "chronic_kidney_disease", "immunosuppression", "dementia", "nursing_home"]
OUTCOMES = ["mortality_30d", "safe_discharge", "readmission_30d"]
ORACLE = ["visit_id", "risk_mortality_30d", "risk_safe_discharge", "risk_readmission_30d"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort") / "c", visits_per_site=N, seed=3)


def _site(cohort: Path, k: int) -> pd.DataFrame:
    return pd.read_parquet(cohort / f"site-{k}.parquet")


def _oracle(cohort: Path, k: int) -> pd.DataFrame:
    return pd.read_parquet(cohort / "oracle" / f"site-{k}.parquet")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    ranks = pd.Series(score).rank().to_numpy()
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_files_columns_and_sizes(cohort: Path) -> None:
    expected = {f"site-{k}.parquet" for k in range(1, SITES + 1)} | {"cohort.json"} | {
        f"oracle/site-{k}.parquet" for k in range(1, SITES + 1)}
    assert set(_files(cohort)) == expected
    for k in range(1, SITES + 1):
        df = _site(cohort, k)
        assert list(df.columns) == CONTRACT_COLUMNS
        assert len(df) == N
    meta = json.loads((cohort / "cohort.json").read_text())
    assert meta["settings"] == {"n_sites": SITES, "visits_per_site": N, "seed": 3, "site_sizes": [N] * SITES,
                                "date_range": ["2020-03-01", "2021-06-30"]}
    for k in range(1, SITES + 1):
        info, df = meta["sites"][f"site-{k}"], _site(cohort, k)
        assert info["visits"] == N and info["patients"] == df.patient_id.nunique()
        assert info["prevalence"]["mortality_30d"] == pytest.approx(df.mortality_30d.mean(), abs=1e-4)
        assert info["prevalence"]["readmission_30d"] == pytest.approx(df.readmission_30d.mean(), abs=1e-4)
        assert info["missingness"]["crp"] == pytest.approx(df.crp.isna().mean(), abs=1e-4)


def test_same_seed_gives_identical_files(cohort: Path, tmp_path: Path) -> None:
    again = generate_cohort(tmp_path / "again", visits_per_site=N, seed=3)
    assert _files(again) == _files(cohort)


def test_different_seeds_differ(cohort: Path, tmp_path: Path) -> None:
    other = generate_cohort(tmp_path / "other", n_sites=1, visits_per_site=N, seed=4)
    a, b = _site(cohort, 1), _site(other, 1)
    assert not a.age.equals(b.age)
    assert (a.note_physician != b.note_physician).mean() > 0.9


def test_ids_and_repeat_visits(cohort: Path) -> None:
    for k in range(1, SITES + 1):
        df = _site(cohort, k)
        assert df.visit_id.is_unique
        assert df.visit_id.str.fullmatch(rf"s{k}-v\d{{6}}").all()
        assert df.patient_id.str.fullmatch(rf"s{k}-p\d{{6}}").all()
        per_patient = df.patient_id.value_counts()
        assert (per_patient > 1).sum() >= 1  # some patients come back
        assert per_patient.max() <= 3
        for _, visits in df[df.patient_id.isin(per_patient[per_patient > 1].index)].groupby("patient_id"):
            # the same person: same age, sex and comorbidities; later visits 31-60 days apart
            shared = ["age", "sex", "hypertension", "diabetes", "dementia", "nursing_home"]
            assert visits[shared].nunique().max() == 1
            gaps = pd.to_datetime(visits.arrival_date).sort_values().diff().dt.days.dropna()
            assert gaps.between(31, 60).all()
            # nobody comes back after dying: only the last visit may have mortality_30d = 1
            ordered = visits.assign(d=pd.to_datetime(visits.arrival_date)).sort_values("d")
            assert ordered.mortality_30d.iloc[:-1].eq(0).all()
    pooled = pd.concat([_site(cohort, k) for k in range(1, SITES + 1)])
    share_multi = (pooled.patient_id.value_counts() > 1).mean()
    assert 0.04 < share_multi < 0.2


def test_readmission_missing_exactly_when_death_before_leaving_hospital() -> None:
    sim = simulate_site(1, 3000, np.random.default_rng(11), notes=False)
    t, ev = sim["table"], sim["events"]
    readm = t["readmission_30d"]
    assert np.array_equal(np.isnan(readm), ev["died_in_index_stay"])
    assert ev["died_in_index_stay"].any() and (ev["died"] & ~ev["died_in_index_stay"]).any()
    assert np.array_equal(np.isnan(sim["oracle"]["risk_readmission_30d"]), np.isnan(readm))
    # sent home alive and never admitted: safe discharge, and no readmission
    assert np.array_equal(t["safe_discharge"] == 1, ev["sent_home"] & ~ev["return_admission"])
    assert np.all(readm[t["safe_discharge"] == 1] == 0)
    assert np.all(t["mortality_30d"][t["safe_discharge"] == 1] == 0)


def test_outcome_logic_in_files(cohort: Path) -> None:
    for k in range(1, SITES + 1):
        df = _site(cohort, k)
        assert df.mortality_30d.isin([0, 1]).all() and df.safe_discharge.isin([0, 1]).all()
        assert df.readmission_30d.dropna().isin([0.0, 1.0]).all()
        assert (df.mortality_30d[df.readmission_30d.isna()] == 1).all()
        safe = df.safe_discharge == 1
        assert (df.mortality_30d[safe] == 0).all() and (df.readmission_30d[safe] == 0).all()
    pooled = pd.concat([_site(cohort, k) for k in range(1, SITES + 1)])
    assert pooled.readmission_30d.isna().any()
    assert 0.05 < pooled.mortality_30d.mean() < 0.22
    assert 0.25 < pooled.safe_discharge.mean() < 0.6


def test_oracle_aligned_and_separate(cohort: Path) -> None:
    for k in range(1, SITES + 1):
        df, orc = _site(cohort, k), _oracle(cohort, k)
        assert list(orc.columns) == ORACLE
        assert not set(OUTCOMES) & set(orc.columns)
        assert not [c for c in df.columns if "risk" in c]
        assert orc.visit_id.tolist() == df.visit_id.tolist()
        risks = orc[ORACLE[1:]].to_numpy()
        assert np.nanmin(risks) >= 0 and np.nanmax(risks) <= 1
        assert orc.risk_mortality_30d.notna().all() and orc.risk_safe_discharge.notna().all()
        assert (orc.risk_readmission_30d.isna() == df.readmission_30d.isna()).all()


def test_values_within_contract(cohort: Path) -> None:
    for k in range(1, SITES + 1):
        df = _site(cohort, k)
        for col, (lo, hi) in RANGES.items():
            vals = df[col].dropna()
            assert vals.between(lo, hi).all(), col
            assert not vals.isin([-1, 999]).any(), col
        for col in FLAGS:
            assert df[col].dropna().isin([0, 1]).all(), col
        assert df.on_oxygen.isna().equals(df.spo2.isna())
        assert set(df.sex) <= {"female", "male"}
        assert df[["visit_id", "patient_id", "arrival_date", "age", "sex"]].notna().all().all()
        dates = pd.to_datetime(df.arrival_date)
        assert dates.min() >= pd.Timestamp("2020-03-01") and dates.max() <= pd.Timestamp("2021-06-30")
        for col in ("note_triage", "note_physician", "note_assessment_plan"):
            assert df[col].map(lambda x: isinstance(x, str)).all()
        filled = df.note_physician[df.note_physician != ""]
        assert filled.str.contains(r"(?m)^IMPRESSION: ").all()
        ap = df.note_assessment_plan[df.note_assessment_plan != ""]
        assert ap.str.startswith("ASSESSMENT/PLAN:").all()


def test_loads_with_the_contract_checker(cohort: Path) -> None:
    from edfed.common.contract import load_site

    for k in range(1, SITES + 1):
        clean = load_site(cohort / f"site-{k}.parquet")
        assert len(clean) == N
        assert clean.attrs["warnings"] == []


def test_notes_look_like_notes_and_do_not_leak_outcomes() -> None:
    sim = simulate_site(2, 400, np.random.default_rng(5))
    t = sim["table"]
    text = " ".join(" ".join(t[c]) for c in ("note_triage", "note_physician", "note_assessment_plan")).lower()
    for word in ("died", "death", "deceased", "expired", "readmit", "passed away", "was admitted",
                 "was discharged"):
        assert word not in text, word
    for col, (lo, hi) in {"note_triage": (15, 45), "note_physician": (55, 120),
                          "note_assessment_plan": (20, 60)}.items():
        words = np.median([len(x.split()) for x in t[col] if x])
        assert lo <= words <= hi, (col, words)
    # the note-only traits are written mostly in IMPRESSION and ASSESSMENT/PLAN
    limited = sim["latent"]["L"] == 1
    has_dnr = np.array(["dnr" in x.lower() or "comfort" in x.lower() or "no escalation" in x.lower()
                        for x in t["note_assessment_plan"]])
    assert has_dnr[limited].mean() > 0.6 and has_dnr[~limited].mean() < 0.02


def test_site_style_differs() -> None:
    def abbreviation_rate(k: int) -> float:
        notes = simulate_site(k, 200, np.random.default_rng(0))["table"]["note_physician"]
        text = " ".join(notes)
        return (text.count(" w/ ") + 1) / (text.count(" with ") + text.count(" w/ ") + 1)

    assert abbreviation_rate(2) > 0.7 > 0.2 > abbreviation_rate(3)  # terse site 2, verbose site 3


def test_some_sites_never_measure_some_labs(cohort: Path) -> None:
    site3, site5 = _site(cohort, 3), _site(cohort, 5)
    assert site3.d_dimer.isna().all() and site3.ldh.isna().all()
    assert site5.lymphocytes.isna().all()
    for k in (1, 2, 4, 6):
        df = _site(cohort, k)
        assert df.d_dimer.notna().any() and df.ldh.notna().any() and df.lymphocytes.notna().any()
    missing = {k: _site(cohort, k).crp.isna().mean() for k in range(1, SITES + 1)}
    assert max(missing.values()) > min(missing.values())  # sites measure at different rates


def test_oracle_is_calibrated_and_both_parts_carry_signal() -> None:
    sims = [simulate_site(k, 4000, np.random.default_rng(100 + k), notes=False) for k in (1, 4)]
    table = {c: np.concatenate([s["table"][c] for s in sims]) for c in OUTCOMES}
    oracle = {c: np.concatenate([s["oracle"]["risk_" + c] for s in sims]) for c in OUTCOMES}
    latent = {c: np.concatenate([s["latent"][c] for s in sims]) for c in sims[0]["latent"]}
    parts = {"mortality_30d": "mortality", "safe_discharge": "home", "readmission_30d": "readmission"}
    for outcome in OUTCOMES:
        y, risk = table[outcome], oracle[outcome]
        ok = ~np.isnan(y)
        assert abs(np.mean(risk[ok]) - np.mean(y[ok])) < 0.02, outcome
        full = _auroc(y[ok], risk[ok])
        structured = _auroc(y[ok], latent[f"eta_{parts[outcome]}_structured"][ok])
        notes = _auroc(y[ok], latent[f"eta_{parts[outcome]}_notes"][ok])
        assert full > 0.78, outcome
        assert min(structured, notes) > 0.65, (outcome, structured, notes)
        assert full > max(structured, notes) + 0.03, (outcome, full, structured, notes)


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdfedError, match="already exists"):
        generate_cohort(out, n_sites=1, visits_per_site=20)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no half-written sibling left


def test_accepts_an_empty_folder_and_creates_parents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert (generate_cohort(tmp_path / "empty", n_sites=1, visits_per_site=20) / "site-1.parquet").is_file()
    nested = generate_cohort(tmp_path / "a" / "b", n_sites=2, visits_per_site=20)
    assert (nested / "oracle" / "site-2.parquet").is_file()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


@pytest.mark.parametrize("kwargs", [{"n_sites": 0}, {"visits_per_site": 3}, {"seed": -1},
                                    {"n_sites": 2.5}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(EdfedError):
        generate_cohort(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_default_site_sizes() -> None:
    assert site_sizes(6, None) == [1600, 1300, 1000, 900, 700, 500]
    three = site_sizes(3, None)
    assert three[0] == 1600 and three[-1] == 500 and 500 < three[1] < 1600
    assert site_sizes(4, 250) == [250] * 4


def _content_hash(folder: Path) -> str:
    """The cohort's contents (table values as Python values, not Parquet bytes, which carry the writer's version,
    nor pandas' hash, which pandas 3 changed) and cohort.json."""
    import hashlib

    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".parquet":
            digest.update(path.relative_to(folder).as_posix().encode())
            table = pq.read_table(path)
            for name in table.column_names:
                digest.update(name.encode() + repr(table.column(name).to_pylist()).encode())
        elif path.suffix == ".json":
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_the_default_cohort_is_unchanged_by_the_harder_options(tmp_path):
    # The generator's output before `--harder` existed (version 1): tests and README figures rest on it. Re-recorded
    # when the hash stopped using pandas' (it changed with pandas 3); the default cohort's oracle and regression
    # AUROCs then still matched the README's to the third decimal, so the data had not moved.
    data = generate_cohort(tmp_path / "c", n_sites=2, visits_per_site=120, seed=0)
    assert _content_hash(data) == "b7e2d98278118c3f156e4ecb86d8f1d4c71c91cda03fc84a72c4741ec2687eef"


def test_harder_cohort_moves_mortality_with_the_calendar():
    from edfed.simulations.cohort import DATE_START, MORTALITY, calendar_mortality_shift

    hard = simulate_site(1, 800, np.random.default_rng(4), harder=True)
    t, lat = hard["table"], hard["latent"]
    day = (t["arrival_date"] - DATE_START).astype("timedelta64[D]").astype(float)
    shift = calendar_mortality_shift(day, t["age"])
    risk = hard["oracle"]["risk_mortality_30d"]
    without = MORTALITY["intercept"] + lat["eta_mortality_structured"] + lat["eta_mortality_notes"]
    np.testing.assert_allclose(np.log(risk / (1 - risk)) - without, shift, atol=1e-9)  # the oracle knows the date
    spring, summer = day < 61, (day > 160) & (day < 240)  # March-April 2020 against August-October 2020
    assert shift[spring].min() > 0.5 and np.abs(shift[summer]).max() < 0.01
    assert shift[(t["age"] >= 70) & (day > 450)].max() < -0.8  # the vaccinated over-70s of spring 2021
    plain = simulate_site(1, 800, np.random.default_rng(4))
    plain_spring = plain["table"]["arrival_date"] < DATE_START + np.timedelta64(61, "D")
    assert np.mean(plain["oracle"]["risk_mortality_30d"][plain_spring]) < np.mean(risk[spring])


def test_harder_notes_copy_forward_have_typos_and_one_site_writes_swedish():
    from edfed.simulations.cohort import SWEDISH_SITE

    plain = simulate_site(SWEDISH_SITE, 300, np.random.default_rng(5))["table"]
    hard = simulate_site(SWEDISH_SITE, 300, np.random.default_rng(5), harder=True)["table"]
    other = simulate_site(1, 300, np.random.default_rng(5), harder=True)["table"]
    physician = pd.Series(hard["note_physician"])
    copied = physician.str.startswith("Copied from prior note:")
    assert 0.35 < copied.mean() < 0.65
    assert physician[copied].str.len().mean() > pd.Series(plain["note_physician"])[copied].str.len().mean() + 150
    # the trait phrases are Swedish at the Swedish site only; section headers stay for the contract
    swedish_words = ("påverkad", "ensamboende", "rassel", "förtätningar", "sängliggande", "inläggning")
    text = " ".join(physician) + " ".join(hard["note_assessment_plan"])
    assert sum(text.count(w) for w in swedish_words) > 100 and physician.str.contains("IMPRESSION:").mean() > 0.9
    assert not any(w in " ".join(other["note_physician"]) for w in swedish_words)
    # typos: words of the plain note that the harder one spells otherwise
    plain_words = set(" ".join(pd.Series(plain["note_triage"])).split())
    hard_words = set(" ".join(pd.Series(other["note_triage"])).split())
    assert len(hard_words - plain_words) > 20
