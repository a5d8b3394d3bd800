"""A hospital's own export: a mapping that renames and recodes, any common text encoding, no note lost."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_contract import SECRET, make_site

import edfed
from edfed.cli import main as cli
from edfed.client.model_folder import RISK_COLUMNS
from edfed.common.contract import OUTCOMES, load_site
from edfed.common.errors import EdfedError
from edfed.simulations.cohort import checked_site_folder, generate_cohort

README = Path(__file__).resolve().parent.parent / "README.md"

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
    return site, as_export(site)


def as_export(site: pd.DataFrame) -> pd.DataFrame:
    """A contract table as the hospital of MAPPING_TOML exports it."""
    local = site.copy()
    local["sex"] = local["sex"].map({"female": "F", "male": "M"})
    for col in ("mortality_30d", "safe_discharge", "readmission_30d"):
        local[col] = local[col].map({1.0: "yes", 0.0: "no"})  # an empty readmission stays empty
    local["arrival_date"] = pd.to_datetime(local["arrival_date"]).dt.strftime("%Y-%m-%d %H:%M:%S")
    return local.rename(columns=LOCAL_NAMES)


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


def _site_list(tmp_path: Path, sites: dict[int, str]) -> Path:
    """Hospital-style cp1252 exports of a small simulated cohort (accented notes), one mapping, and their list."""
    cohort = generate_cohort(tmp_path / "cohort", n_sites=len(sites), visits_per_site=200, seed=3)
    (tmp_path / "my_mapping.toml").write_text(MAPPING_TOML)
    entries = []
    for k, name in sites.items():
        site = pd.read_parquet(cohort / f"site-{k}.parquet")
        site["note_physician"] = site["note_physician"] + " – réévalué, févrile"
        as_export(site).to_csv(tmp_path / name, index=False, encoding="cp1252")
        entries.append(f'[site-{k}]\nfile = "{name}"\nmapping = "my_mapping.toml"\n')
    (tmp_path / "my_sites.toml").write_text("\n".join(entries))
    return tmp_path / "my_sites.toml"


def test_a_site_list_becomes_checked_contract_tables_without_losing_a_note(tmp_path):
    site_list = _site_list(tmp_path, {1: "my_site.csv", 2: "other.csv"})
    folder = checked_site_folder(site_list)
    assert folder == tmp_path / "my_sites.checked" and sorted(p.name for p in folder.iterdir()) == [
        "site-1.parquet", "site-2.parquet"]
    assert (folder.stat().st_mode & 0o077) == 0
    checked = pd.read_parquet(folder / "site-1.parquet")
    assert checked["note_physician"].str.endswith(" – réévalué, févrile").all()
    assert set(checked["sex"]) <= {"female", "male"} and set(checked["mortality_30d"].dropna()) <= {0, 1}

    # Unchanged tables keep their files (the sites' caches key on them); a site taken off the list is gone.
    before = (folder / "site-1.parquet").stat().st_mtime_ns
    site_list.write_text(site_list.read_text().split("[site-2]")[0])
    checked_site_folder(site_list)
    assert (folder / "site-1.parquet").stat().st_mtime_ns == before
    assert not (folder / "site-2.parquet").exists()


@pytest.mark.parametrize("text, says", [
    ('[hospital-a]\nfile = "my_site.csv"\n', "[hospital-a]: a site is named site-K"),
    ('[site-1]\nmapping = "my_mapping.toml"\n', '[site-1]: needs file = "PATH"'),
    ('[site-1]\nfile = "my_site.csv"\nmaping = "x"\n', "unknown key(s) maping"),
    ("", "no sites"),
    ("[site-1\n", "cannot read the site list"),
])
def test_a_bad_site_list_is_refused_by_name_with_nothing_written(tmp_path, text, says):
    site_list = tmp_path / "sites.toml"
    site_list.write_text(text)
    with pytest.raises(EdfedError) as info:
        checked_site_folder(site_list)
    assert says in str(info.value) and str(site_list) in str(info.value)
    assert not (tmp_path / "sites.checked").exists()


def test_a_site_list_with_a_bad_table_names_the_file_and_writes_nothing(tmp_path):
    site_list = _site_list(tmp_path, {1: "my_site.csv", 2: "other.csv"})
    export = pd.read_csv(tmp_path / "other.csv", encoding="cp1252")
    export.loc[3, "GENDER"] = "X"
    export.to_csv(tmp_path / "other.csv", index=False, encoding="cp1252")
    with pytest.raises(EdfedError) as info:
        checked_site_folder(site_list)
    assert "other.csv" in str(info.value) and "sex" in str(info.value)
    assert not (tmp_path / "my_sites.checked").exists()


def _readme_block(section: str) -> list[list[str]]:
    text = README.read_text()
    part = text[text.index(f"## {section}"):]
    start = part.index("```bash\n") + len("```bash\n")
    return [shlex.split(line, comments=True) for line in part[start:part.index("```", start)].splitlines()
            if line.strip()]


@pytest.mark.slow
def test_the_readme_own_data_commands_run_as_written_from_export_to_risks(tmp_path, tiny_encoder, monkeypatch):
    """The README's "Your own data" block, each line as written, on hospital-style cp1252 exports of three sites
    (local column names, F/M, yes/no, timestamps): only sizing flags are added (the tiny encoder, one round)."""
    _site_list(tmp_path, {1: "my_site.csv", 2: "st_erik.csv", 3: "south.csv"})
    visits = pd.read_parquet(tmp_path / "cohort" / "site-3.parquet").head(40)
    visits["note_physician"] = visits["note_physician"] + " – réévalué"
    as_export(visits).drop(columns=["DEATH30", "SAFE_DC", "READMIT30"]).to_csv(
        tmp_path / "new_visits.csv", index=False, encoding="cp1252")
    monkeypatch.chdir(tmp_path)
    sizing = {"simulate": ["--model", str(tiny_encoder), "--rounds", "1", "--lora-layers", "1"],
              "personalize": ["--model", str(tiny_encoder)], "predict": ["--model", str(tiny_encoder)]}

    commands = _readme_block("Your own data")
    assert [c[:2] for c in commands] == [["edfed", "data"], ["edfed", "simulate"], ["edfed", "personalize"],
                                         ["edfed", "predict"], ["edfed", "report"]]
    for command in commands:
        assert cli.main([*command[1:], *sizing.get(command[1], [])]) == 0, command

    # The simulated federation trained on the mapped tables, every note whole.
    summary = json.loads(Path("run/summary.json").read_text())
    assert Path(summary["config"]["data-dir"]) == tmp_path / "my_sites.checked"
    notes = pd.read_parquet("my_sites.checked/site-1.parquet")["note_physician"]
    assert notes.str.endswith(" – réévalué, févrile").all()
    # What predict wrote is what the Python API returns, visit by visit.
    written = pd.read_csv("risks.csv", dtype={"visit_id": str})
    model = edfed.load_model("mine/my_site/model", encoder=tiny_encoder)
    expected = model.predict_proba(edfed.read_table("new_visits.csv", mapping="my_mapping.toml"))
    assert written["visit_id"].tolist() == visits["visit_id"].astype(str).tolist() == expected["visit_id"].tolist()
    np.testing.assert_allclose(written[list(RISK_COLUMNS)].to_numpy(), expected[list(RISK_COLUMNS)].to_numpy(),
                               rtol=1e-9, atol=1e-12)
    risks = written[list(RISK_COLUMNS)].to_numpy()
    assert risks.shape == (40, len(OUTCOMES)) and ((risks > 0) & (risks < 1)).all()
    assert Path("mine/report.md").exists() and os.path.getsize("mine/report.md") > 0


def test_visits_to_predict_use_the_sites_one_mapping_though_they_have_no_outcomes_yet(tmp_path):
    site, local = hospital_export()
    path = tmp_path / "new_visits.csv"
    local.drop(columns=["DEATH30", "SAFE_DC", "READMIT30"]).to_csv(path, index=False, encoding="cp1252")
    (tmp_path / "mapping.toml").write_text(MAPPING_TOML)
    visits = load_site(path, mapping=tmp_path / "mapping.toml", labels=False)
    assert visits["visit_id"].tolist() == site["visit_id"].tolist() and visits["mortality_30d"].isna().all()
    with pytest.raises(EdfedError, match="'DEATH30', 'SAFE_DC', 'READMIT30'"):
        load_site(path, mapping=tmp_path / "mapping.toml")  # training data needs them
