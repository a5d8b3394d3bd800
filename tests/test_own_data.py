"""A hospital's own export: a mapping that renames and recodes, any common text encoding, no note lost."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_contract import SECRET, make_site

from edfed.cli import main as cli
from edfed.common.contract import load_site
from edfed.common.errors import EdfedError

# what a hospital's export calls the contract's columns
LOCAL_NAMES = {"visit_id": "VISIT_NO", "patient_id": "PAT_ID", "arrival_date": "ARRIVAL", "age": "AGE_YEARS",
               "sex": "GENDER", "note_physician": "DrNote", "mortality_30d": "DEATH30",
               "safe_discharge": "SAFE_DC", "readmission_30d": "READMIT30"}
MAPPING_TOML = """\
# site 4's export, as its data scientist wrote it
date_format = "%Y-%m-%d %H:%M:%S"

[columns]
VISIT_NO = "visit_id"
PAT_ID = "patient_id"
ARRIVAL = "arrival_date"
AGE_YEARS = "age"
GENDER = "sex"
DrNote = "note_physician"
DEATH30 = "mortality_30d"
SAFE_DC = "safe_discharge"
READMIT30 = "readmission_30d"

[values.sex]
F = "female"
M = "male"

[binary_values]
yes = 1
no = 0
"""
NOTE = "Patient févrile, toux sèche depuis 3 jours; SpO₂ 91 %. IMPRESSION: pneumonie – réévaluer"


def hospital_export(n: int = 40) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the contract table, the same visits as a hospital exports them: local names, F/M, yes/no, timestamps,
    accented notes)."""
    site = make_site(n)
    site["note_physician"] = [f"{NOTE.replace('₂', '2')} {SECRET} #{i}" for i in range(n)]  # cp1252 has no ₂
    local = site.copy()
    local["sex"] = local["sex"].map({"female": "F", "male": "M"})
    for col in ("mortality_30d", "safe_discharge", "readmission_30d"):
        local[col] = local[col].map({1.0: "yes", 0.0: "no"})  # an empty readmission stays empty
    local["arrival_date"] = pd.to_datetime(local["arrival_date"]).dt.strftime("%Y-%m-%d %H:%M:%S")
    return site, local.rename(columns=LOCAL_NAMES)


def test_hospital_export_in_cp1252_keeps_every_note(tmp_path, capsys):
    site, local = hospital_export()
    path = tmp_path / "site-4.csv"
    local.to_csv(path, index=False, encoding="cp1252")
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING_TOML)

    assert cli.main(["data", "check", str(path), "--mapping", str(mapping)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "cp1252" in out  # says how it read the text
    assert SECRET not in out

    df = load_site(path, mapping=mapping)
    assert df["note_physician"].tolist() == site["note_physician"].tolist()  # every note intact
    assert df["sex"].tolist() == site["sex"].tolist()
    for col in ("mortality_30d", "safe_discharge", "readmission_30d"):
        assert df[col].fillna(-1).tolist() == site[col].fillna(-1).tolist(), col
    assert df["arrival_date"].tolist() == pd.to_datetime(site["arrival_date"]).tolist()
    assert df.attrs["encoding"].startswith("cp1252")


def test_same_mapping_as_json(tmp_path):
    import tomllib

    site, local = hospital_export()
    path = tmp_path / "site-4.csv"
    local.to_csv(path, index=False)  # UTF-8
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(tomllib.loads(MAPPING_TOML)))
    df = load_site(path, mapping=mapping)
    assert df["note_physician"].tolist() == site["note_physician"].tolist()
    assert df.attrs["warnings"] == [] or all("cp1252" not in w for w in df.attrs["warnings"])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_excel_unicode_text_and_bom_are_read(tmp_path, encoding):
    site = make_site()
    site["note_triage"] = NOTE
    path = tmp_path / "site.csv"
    # Excel's "Unicode text" is UTF-16 with a byte-order mark, tab-separated
    site.to_csv(path, index=False, encoding=encoding, sep="\t" if encoding == "utf-16" else ",")
    df = load_site(path)
    assert len(df) == 40 and df["note_triage"].eq(NOTE).all()
    assert df["visit_id"].tolist() == site["visit_id"].tolist()


def test_explicit_encoding_that_does_not_fit_is_refused(tmp_path, capsys):
    site = make_site()
    site["note_triage"] = NOTE
    path = tmp_path / "site.csv"
    site.to_csv(path, index=False, encoding="utf-16")
    code = cli.main(["data", "check", str(path), "--encoding", "utf-8"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "not utf-8 text" in err and "--encoding" in err
    assert "Traceback" not in err
    assert cli.main(["data", "check", str(path), "--encoding", "utf-16"]) == 0


def test_encoding_only_in_the_mapping(tmp_path):
    site, local = hospital_export()
    path = tmp_path / "site-4.csv"
    local.to_csv(path, index=False, encoding="cp1252")
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('encoding = "cp1252"\n' + MAPPING_TOML)
    df = load_site(path, mapping=mapping)
    assert df["note_physician"].tolist() == site["note_physician"].tolist()
    assert df.attrs["encoding"] == "cp1252" and df.attrs["warnings"] == []


def error_of(*args, **kwargs) -> str:
    with pytest.raises(EdfedError) as info:
        load_site(*args, **kwargs)
    return str(info.value)


def test_reversed_mapping_gets_a_hint(tmp_path):
    _, local = hospital_export()
    path = tmp_path / "site-4.csv"
    local.to_csv(path, index=False)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(LOCAL_NAMES))  # contract name -> site name: the wrong way round
    msg = error_of(path, mapping=mapping)
    assert "reversed" in msg and "site column -> contract column" in msg and '"VISIT_NO": "visit_id"' in msg
    csv_map = tmp_path / "mapping.csv"
    csv_map.write_text("contract_column,site_column\nage,AGE_YEARS\n")
    assert "reversed" in error_of(path, mapping=csv_map)


def test_without_recodings_the_errors_point_to_the_mapping(tmp_path):
    _, local = hospital_export()
    path = tmp_path / "site-4.csv"
    local.to_csv(path, index=False)
    msg = error_of(path, mapping={v: k for k, v in LOCAL_NAMES.items()})
    assert "[values.sex]" in msg and "[binary_values]" in msg and "date_format" in msg


@pytest.mark.parametrize("bad,expected", [
    ({"columns": {"GENDER": "sex"}, "values": {"sex": {"F": "woman"}}}, "'female', 'male'"),
    ({"columns": {"GENDER": "sex"}, "binary_values": {"yes": 2}}, "0, 1"),
    ({"columns": {"GENDER": "sex"}, "colums": {}}, "unknown key"),
    ({"columns": {"GENDER": "sex"}, "encoding": "klingon-8"}, "unknown encoding"),
    ({"columns": {"DrNote": "note_physician"}, "values": {"note_physician": {"a": "b"}}}, "notes never"),
])
def test_bad_mapping_is_named(tmp_path, bad, expected):
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(bad))
    msg = error_of(tmp_path / "site.csv", mapping=mapping)
    assert str(mapping) in msg and expected in msg


def test_undecodable_text_is_refused_not_blanked(tmp_path, capsys):
    site = make_site()
    path = tmp_path / "site.csv"
    text = site.to_csv(index=False).encode("utf-8")
    path.write_bytes(text.replace(b"cough and fever for 3", b"cough \xe9 and \x81 fever for 3", 1))
    code = cli.main(["data", "check", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "not UTF-8 or cp1252 text" in err and "line " in err and "--encoding" in err
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_mapping_paths_are_documented():
    doc = (Path(__file__).parents[1] / "docs" / "data-contract.md").read_text()
    for key in ("[columns]", "[values.sex]", "[binary_values]", "date_format", "encoding", "--encoding"):
        assert key in doc, key


def test_recodings_leave_parquet_numbers_and_bools_alone(tmp_path):
    site, local = hospital_export()
    local["diabetes"] = site["diabetes"].astype(bool)  # a Parquet bool flag is already 0/1
    local["AGE_YEARS"] = site["age"]  # numbers stay numbers
    path = tmp_path / "site-4.parquet"
    local.to_parquet(path, index=False)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING_TOML)
    df = load_site(path, mapping=mapping)
    assert df["diabetes"].tolist() == site["diabetes"].tolist()
    assert df["age"].tolist() == site["age"].tolist()
    assert df["mortality_30d"].tolist() == site["mortality_30d"].tolist()
