"""The site data contract: a valid table loads clean; every kind of bad input gives one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edfed.cli import main as cli
from edfed.common.contract import (
    CONTRACT_COLUMNS,
    FLAG_COLUMNS,
    NOTE_COLUMNS,
    NUMERIC_RANGES,
    OUTCOMES,
    REQUIRED_COLUMNS,
    load_site,
    print_profile,
    profile_site,
)
from edfed.common.errors import EdfedError

SECRET = "ZEBRAFISHWORD"  # a distinctive word that must never reach a message


def make_site(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """n valid visits following the contract (some patients with two visits, some empty cells)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "visit_id": [f"V{i:04d}" for i in range(1, n + 1)],
        "patient_id": [f"P{i // 2:04d}" for i in range(n)],
        "arrival_date": pd.date_range("2020-03-01", periods=n, freq="D").strftime("%Y-%m-%d"),
        "age": rng.integers(18, 100, n).astype(float),
        "sex": rng.choice(["female", "male"], n),
    })
    for col, (lo, hi) in NUMERIC_RANGES.items():
        if col != "age":
            df[col] = np.round(rng.uniform(lo, hi, n), 1)
    df.loc[::7, "crp"] = np.nan  # some missing labs
    for col in FLAG_COLUMNS:
        df[col] = rng.integers(0, 2, n).astype(float)
    df["note_triage"] = [f"cough and fever for {i % 9 + 1} days" for i in range(n)]
    df["note_physician"] = "History: dyspnoea. IMPRESSION: likely COVID-19 pneumonia."
    df["note_assessment_plan"] = ["ASSESSMENT/PLAN: admit, oxygen" if i % 3 else "" for i in range(n)]
    mort = (np.arange(n) % 10 == 0).astype(float)
    df["mortality_30d"] = mort
    df["safe_discharge"] = np.where(mort == 1, 0.0, (np.arange(n) % 2).astype(float))
    df["readmission_30d"] = np.where(mort == 1, np.nan, (np.arange(n) % 5 == 1).astype(float))
    df["site_extra"] = "kept"
    return df


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(EdfedError) as info:
        load_site(path, **kwargs)
    return str(info.value)


@pytest.fixture
def site() -> pd.DataFrame:
    return make_site()


# ---------------------------------------------------------------------------------------------- valid input


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".pq"])
def test_valid_table_loads_with_contract_dtypes(site, tmp_path, suffix):
    path = write(site, tmp_path / f"site-1{suffix}")
    df = load_site(path)
    assert len(df) == 40
    assert list(df.columns[: len(CONTRACT_COLUMNS)]) == list(CONTRACT_COLUMNS)
    assert df["site_extra"].tolist() == ["kept"] * 40  # extra columns kept
    assert df["visit_id"].tolist() == site["visit_id"].tolist()  # "V0001": leading zeros survive
    assert pd.api.types.is_datetime64_any_dtype(df["arrival_date"])
    assert df["arrival_date"].iloc[0] == pd.Timestamp("2020-03-01")
    for col in (*NUMERIC_RANGES, *FLAG_COLUMNS, "readmission_30d"):
        assert df[col].dtype == np.float64, col
    assert df["crp"].isna().sum() == site["crp"].isna().sum()
    assert set(df["on_oxygen"].unique()) <= {0.0, 1.0}
    assert df["readmission_30d"].isna().sum() == 4
    for col in ("mortality_30d", "safe_discharge"):
        assert df[col].notna().all() and set(df[col].unique()) <= {0, 1}
    assert (df["note_assessment_plan"] == "").sum() == 14  # empty notes are "", never NaN
    assert df[list(NOTE_COLUMNS)].notna().all().all()
    assert df["sex"].isin(["female", "male"]).all()
    assert df.attrs["warnings"] == []


def test_optional_columns_may_be_absent(site, tmp_path):
    path = write(site.drop(columns=["crp", "note_triage", "dementia"]), tmp_path / "site.csv")
    df = load_site(path)
    assert df["crp"].isna().all() and (df["note_triage"] == "").all() and df["dementia"].isna().all()
    assert any("crp" in w and "absent" in w for w in df.attrs["warnings"])


def test_missing_readmission_cells_are_allowed(site, tmp_path):
    site["readmission_30d"] = np.nan
    df = load_site(write(site, tmp_path / "site.parquet"))
    assert df["readmission_30d"].isna().all()


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nowhere.parquet")
    assert str(tmp_path / "nowhere.parquet") in msg and "not found" in msg


def test_missing_required_column(site, tmp_path):
    path = write(site.drop(columns=["age", "safe_discharge"]), tmp_path / "site.parquet")
    msg = error_of(path)
    assert str(path) in msg
    assert "missing required column" in msg and "'age'" in msg and "'safe_discharge'" in msg


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_wrong_type_names_rows(site, tmp_path, suffix):
    site["heart_rate"] = site["heart_rate"].map(str)  # a text column, as a careless export writes it
    site.loc[[2, 6], "heart_rate"] = ["tachy", "1,5"]
    path = write(site, tmp_path / f"site{suffix}")
    msg = error_of(path)
    assert str(path) in msg and "column 'heart_rate'" in msg and "wrong type" in msg
    assert "2 rows" in msg and "row 3 (visit_id V0003)" in msg and "row 7 (visit_id V0007)" in msg


def test_out_of_range_and_sentinels(site, tmp_path):
    site.loc[1, "spo2"] = 150
    site.loc[4, "age"] = -1
    site.loc[5, "temperature"] = 999
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path)
    assert str(path) in msg and "out of range" in msg
    assert "column 'spo2'" in msg and "row 2 (visit_id V0002): 150" in msg
    assert "column 'age'" in msg and "row 5 (visit_id V0005): -1" in msg
    assert "column 'temperature'" in msg and "999" in msg


def test_only_first_five_rows_listed(site, tmp_path):
    site.loc[:11, "gcs"] = 0
    msg = error_of(write(site, tmp_path / "site.csv"))
    assert "column 'gcs'" in msg and "12 rows" in msg and "row 5 " in msg and "and 7 more" in msg
    assert "row 6 " not in msg


def test_duplicate_visit_id(site, tmp_path):
    site.loc[9, "visit_id"] = "V0003"
    path = write(site, tmp_path / "site.parquet")
    msg = error_of(path)
    assert str(path) in msg and "column 'visit_id'" in msg and "duplicate visit_id" in msg
    assert "row 3 (visit_id V0003)" in msg and "row 10 (visit_id V0003)" in msg


def test_label_not_0_1(site, tmp_path):
    site.loc[3, "mortality_30d"] = 2
    site.loc[7, "readmission_30d"] = 0.5
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path)
    assert str(path) in msg and "not 0/1" in msg
    assert "column 'mortality_30d'" in msg and "row 4 (visit_id V0004)" in msg
    assert "column 'readmission_30d'" in msg and "row 8 (visit_id V0008)" in msg


def test_missing_required_label(site, tmp_path):
    site.loc[12, "safe_discharge"] = np.nan
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path)
    assert str(path) in msg and "column 'safe_discharge'" in msg and "missing required label" in msg
    assert "row 13 (visit_id V0013)" in msg


def test_missing_required_value(site, tmp_path):
    site.loc[2, "patient_id"] = ""
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path)
    assert "column 'patient_id'" in msg and "missing value in required column" in msg and "row 3" in msg


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_table(site, tmp_path, suffix):
    path = write(site.iloc[:0], tmp_path / f"site{suffix}")
    msg = error_of(path)
    assert str(path) in msg and "empty table" in msg


def test_zero_byte_csv_is_empty_table(tmp_path):
    path = tmp_path / "site.csv"
    path.write_bytes(b"")
    msg = error_of(path)
    assert str(path) in msg and "empty table" in msg


def test_not_parquet_or_csv_by_extension(site, tmp_path):
    path = tmp_path / "site.txt"
    site.to_csv(path, index=False)
    msg = error_of(path)
    assert str(path) in msg and "not Parquet/CSV" in msg and ".txt" in msg


def test_garbage_parquet(tmp_path):
    path = tmp_path / "site.parquet"
    path.write_bytes(b"this is not a parquet file at all\x00\x01\x02" * 20)
    msg = error_of(path)
    assert str(path) in msg and "not Parquet/CSV" in msg and "Parquet" in msg


def test_parquet_bytes_named_csv(site, tmp_path):
    path = tmp_path / "site.csv"
    site.to_parquet(path, index=False)
    msg = error_of(path)
    assert str(path) in msg and "not Parquet/CSV" in msg and ".parquet" in msg


def test_bad_sex(site, tmp_path):
    site.loc[[0, 5], "sex"] = ["F", "unknown"]
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path)
    assert str(path) in msg and "column 'sex'" in msg and "not 'female'/'male'" in msg
    assert "row 1 (visit_id V0001): 'F'" in msg and "row 6 (visit_id V0006)" in msg


def test_bad_date(site, tmp_path):
    site.loc[[1, 2, 3], "arrival_date"] = ["03/01/2020", "2020-02-30", "1900-01-01"]
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path)
    assert str(path) in msg and "column 'arrival_date'" in msg and "YYYY-MM-DD" in msg
    assert "3 rows" in msg and "row 2 (visit_id V0002): '03/01/2020'" in msg and "row 4" in msg


def test_parquet_native_dates_accepted(site, tmp_path):
    site["arrival_date"] = pd.to_datetime(site["arrival_date"])
    df = load_site(write(site, tmp_path / "site.parquet"))
    assert df["arrival_date"].iloc[1] == pd.Timestamp("2020-03-02")


@pytest.mark.parametrize("bad", ["2", "yes"])
def test_bad_flag(site, tmp_path, bad):
    site["diabetes"] = site["diabetes"].astype(object)
    site.loc[8, "diabetes"] = bad
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path)
    assert str(path) in msg and "column 'diabetes'" in msg and "flag not 0/1" in msg
    assert "row 9 (visit_id V0009)" in msg


def test_all_violations_reported_together(site, tmp_path):
    site.loc[0, "sex"] = "X"
    site.loc[1, "spo2"] = 5
    site.loc[2, "visit_id"] = "V0001"
    site = site.drop(columns=["readmission_30d"])
    msg = error_of(write(site, tmp_path / "site.csv"))
    assert "4 problems" in msg
    for part in ("column 'sex'", "column 'spo2'", "duplicate visit_id", "'readmission_30d'"):
        assert part in msg
    assert "\n\n" not in msg  # one paragraph


# ----------------------------------------------------------------------------------------------- encoding


def test_cp1252_note_in_a_utf8_file_is_converted_and_named(site, tmp_path):
    """A cp1252 note pasted into a UTF-8 export: converted, never blanked, and its row named."""
    path = tmp_path / "site.csv"
    site.loc[3, "note_triage"] = "placeholder-note-4"
    site.loc[5, "note_physician"] = "History: fièvre. IMPRESSION: pneumonie."  # valid UTF-8 elsewhere
    text = site.to_csv(index=False).encode("utf-8")
    bad = f"cough {SECRET} fi\xe8vre".encode("latin-1")  # not valid UTF-8
    path.write_bytes(text.replace(b"placeholder-note-4", bad))
    df = load_site(path)
    assert len(df) == 40
    assert df.loc[3, "note_triage"] == f"cough {SECRET} fi\xe8vre"  # converted, not blanked
    assert df.loc[5, "note_physician"] == site.loc[5, "note_physician"]  # the UTF-8 text untouched
    assert df.loc[4, "note_triage"] == site.loc[4, "note_triage"]  # neighbours untouched
    warnings = df.attrs["warnings"]
    assert len(warnings) == 1
    assert "note_triage" in warnings[0] and "row 4 (visit_id V0004)" in warnings[0]
    assert "cp1252" in warnings[0]
    assert SECRET not in warnings[0] and "cough" not in warnings[0]
    assert profile_site(df)["warnings"] == warnings


def test_bad_encoding_in_parquet_binary_note(site, tmp_path):
    site["note_physician"] = [s.encode() for s in site["note_physician"]]
    site.loc[6, "note_physician"] = f"{SECRET} \xe9".encode("latin-1")
    df = load_site(write(site, tmp_path / "site.parquet"))
    assert df.loc[6, "note_physician"] == "" and df.loc[5, "note_physician"].startswith("History")
    assert "note_physician" in df.attrs["warnings"][0] and "row 7" in df.attrs["warnings"][0]
    assert SECRET not in " ".join(df.attrs["warnings"])


# ------------------------------------------------------------------------------------------------- mapping


MAPPING = {"AGE_YEARS": "age", "TriageText": "note_triage", "died30": "mortality_30d"}


def renamed_site(site: pd.DataFrame) -> pd.DataFrame:
    return site.rename(columns={"age": "AGE_YEARS", "note_triage": "TriageText", "mortality_30d": "died30"})


def test_mapping_json(site, tmp_path):
    path = write(renamed_site(site), tmp_path / "site.parquet")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(MAPPING))
    df = load_site(path, mapping=mapping)
    assert df["age"].tolist() == site["age"].tolist()
    assert df["note_triage"].tolist() == site["note_triage"].tolist()
    assert "AGE_YEARS" not in df.columns


def test_mapping_csv_and_dict(site, tmp_path):
    path = write(renamed_site(site), tmp_path / "site.csv")
    mapping = tmp_path / "map.csv"
    mapping.write_text("site_column,contract_column\nAGE_YEARS,age\nTriageText,note_triage\n"
                       "died30,mortality_30d\n")
    assert load_site(path, mapping=mapping)["mortality_30d"].sum() == site["mortality_30d"].sum()
    assert load_site(path, mapping=MAPPING)["age"].tolist() == site["age"].tolist()


def test_without_mapping_the_renamed_file_fails(site, tmp_path):
    msg = error_of(write(renamed_site(site), tmp_path / "site.csv"))
    assert "missing required column" in msg and "'age'" in msg and "--mapping" in msg


def test_mapped_column_errors_name_both_names(site, tmp_path):
    site.loc[0, "age"] = 300
    path = write(renamed_site(site), tmp_path / "site.csv")
    msg = error_of(path, mapping=MAPPING)
    assert "column 'age' (site column 'AGE_YEARS')" in msg and "out of range" in msg


def test_mapping_unknown_target(site, tmp_path):
    path = write(renamed_site(site), tmp_path / "site.csv")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"AGE_YEARS": "age_years", "died30": "mortality_30d"}))
    msg = error_of(path, mapping=mapping)
    assert str(mapping) in msg and "unknown target" in msg and "'age_years'" in msg


@pytest.mark.parametrize("content,name", [("{not json", "map.json"), ("a,b\nx,y\n", "map.csv"),
                                          ("AGE_YEARS: age", "map.yaml")])
def test_mapping_unreadable(site, tmp_path, content, name):
    path = write(renamed_site(site), tmp_path / "site.csv")
    mapping = tmp_path / name
    mapping.write_text(content)
    msg = error_of(path, mapping=mapping)
    assert str(mapping) in msg and "unreadable" in msg


def test_mapping_file_missing(site, tmp_path):
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path, mapping=tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in msg and "not found" in msg


def test_mapping_source_not_in_file(site, tmp_path):
    path = write(site, tmp_path / "site.csv")
    msg = error_of(path, mapping={"Age_Yrs": "age"})
    assert "'Age_Yrs'" in msg and str(path) in msg


# ------------------------------------------------------------------------------------------------- privacy


def test_note_text_never_in_messages(site, tmp_path):
    bad_rows = [0, 1, 2, 3, 4, 5, 6]
    for col in NOTE_COLUMNS:
        site.loc[bad_rows, col] = f"patient {SECRET} says hello"
    site["age"] = site["age"].map(str)
    site.loc[0, "age"] = "old"
    site.loc[1, "sex"] = "M"
    site.loc[2, "visit_id"] = "V0002"
    site.loc[3, "mortality_30d"] = 7
    site.loc[4, "arrival_date"] = "yesterday"
    site.loc[5, "on_oxygen"] = 3
    site.loc[6, "spo2"] = 0
    for suffix in (".csv", ".parquet"):
        path = write(site, tmp_path / f"site{suffix}")
        msg = error_of(path)
        assert "7 problems" in msg
        assert SECRET not in msg and "hello" not in msg


def test_free_text_in_a_checked_column_is_not_echoed(site, tmp_path):
    site["age"] = f"note by dr {SECRET} on the ward"  # e.g. a note column mapped onto 'age' by mistake
    site.loc[0, "sex"] = "M"
    msg = error_of(write(site, tmp_path / "site.csv"))
    assert "column 'age'" in msg and "wrong type" in msg and "not shown" in msg
    assert SECRET not in msg and "ward" not in msg
    assert "'M'" in msg  # short codes are still shown


def test_semicolon_csv_gets_a_hint(site, tmp_path):
    path = tmp_path / "site.csv"
    site.to_csv(path, index=False, sep=";")
    msg = error_of(path)
    assert str(path) in msg and "comma-separated" in msg


def test_profile_output_has_no_note_text(site, tmp_path, capsys):
    site["note_triage"] = f"{SECRET} " * 5
    df = load_site(write(site, tmp_path / "site.csv"))
    print_profile(df, tmp_path / "site.csv")
    assert SECRET not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- profile


def test_profile_numbers(site, tmp_path):
    prof = profile_site(load_site(write(site, tmp_path / "site.parquet")))
    assert prof["rows"] == 40 and prof["patients"] == 20
    assert prof["visits_per_patient"]["max"] == 2 and prof["visits_per_patient"]["share_multi"] == 1.0
    assert prof["arrival_date"] == {"min": "2020-03-01", "max": "2020-04-09"}
    assert prof["prevalence"]["mortality_30d"] == {"positive": 4, "n": 40, "rate": 0.1, "empty": 0}
    readm = prof["prevalence"]["readmission_30d"]
    assert readm["n"] == 36 and readm["empty"] == 4
    assert readm["rate"] == pytest.approx(site["readmission_30d"].sum() / 36)
    assert set(prof["prevalence"]) == set(OUTCOMES)
    assert prof["missingness"]["crp"] == pytest.approx(6 / 40)
    assert prof["missingness"]["age"] == 0.0
    assert prof["notes"]["note_physician"]["median_words"] == 6
    assert prof["notes"]["note_assessment_plan"]["share_empty"] == pytest.approx(14 / 40)
    assert set(prof["missingness"]) == set(CONTRACT_COLUMNS)
    json.dumps(prof)  # plain numbers only


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_check_good_file(site, tmp_path, capsys):
    path = write(site, tmp_path / "site-1.parquet")
    assert cli.main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {path} follows the data contract (40 visits, 20 patients)")
    for part in ("mortality_30d", "readmission_30d", "note_triage", "crp", "2020-03-01"):
        assert part in out


def test_cli_check_good_file_with_mapping(site, tmp_path, capsys):
    path = write(renamed_site(site), tmp_path / "site-1.csv")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(MAPPING))
    assert cli.main(["data", "check", str(path), "--mapping", str(mapping)]) == 0
    assert "OK:" in capsys.readouterr().out


def test_cli_check_bad_file(site, tmp_path, capsys):
    site.loc[2, "spo2"] = 999
    path = write(site, tmp_path / "site-1.csv")
    before = sorted(tmp_path.rglob("*"))
    code = cli.main(["data", "check", str(path)])
    captured = capsys.readouterr()
    assert code != 0
    assert "edfed: error:" in captured.err and "column 'spo2'" in captured.err and "row 3" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""  # no partial profile
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_cli_check_missing_file(tmp_path, capsys):
    code = cli.main(["data", "check", str(tmp_path / "absent.parquet")])
    captured = capsys.readouterr()
    assert code != 0 and "not found" in captured.err and "Traceback" not in captured.err


def test_required_columns_constant():
    assert set(REQUIRED_COLUMNS) <= set(CONTRACT_COLUMNS)
    assert "readmission_30d" in REQUIRED_COLUMNS and "crp" not in REQUIRED_COLUMNS
