"""The site data contract (docs/data-contract.md): constants, loading, validation, profile.

`load_site` reads one site's table (Parquet or CSV, its text decoded without losing a character), applies an
optional mapping file (renames, value recodings, date format, encoding: docs/data-contract.md, "Mapping
file"), checks every rule of the contract and returns a clean frame with the contract's dtypes. Every
broken rule is collected first and raised together as one `EdfedError`, so a site can fix its file in one
go. Messages name the file, the column, the first offending rows and the rule; they never contain any text
from a note column. Each error also has an off-site form (`EdfedError.offsite`, what a site may send the
coordinator): file name, column, rule and row numbers only, no visit id and no cell value. `edfed data
check` shows the full one locally.

Row numbers in messages count data rows from 1 (the CSV header is not a row).
"""

from __future__ import annotations

import codecs
import csv
import datetime as _dt
import io
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from edfed.common.errors import EdfedError

OUTCOMES: tuple[str, ...] = ("mortality_30d", "safe_discharge", "readmission_30d")
NOTE_COLUMNS: tuple[str, ...] = ("note_triage", "note_physician", "note_assessment_plan")
ID_COLUMNS: tuple[str, ...] = ("visit_id", "patient_id")

# column -> (lowest, highest) allowed value, both inclusive; units in NUMERIC_UNITS
NUMERIC_RANGES: dict[str, tuple[float, float]] = {
    "age": (18.0, 120.0),
    "resp_rate": (4.0, 80.0),
    "spo2": (40.0, 100.0),
    "heart_rate": (20.0, 250.0),
    "systolic_bp": (40.0, 300.0),
    "temperature": (30.0, 44.0),
    "gcs": (3.0, 15.0),
    "crp": (0.0, 700.0),
    "urea": (0.0, 100.0),
    "creatinine": (10.0, 2500.0),
    "lymphocytes": (0.0, 50.0),
    "d_dimer": (0.0, 100.0),
    "ldh": (50.0, 5000.0),
}
NUMERIC_UNITS: dict[str, str] = {
    "age": "years",
    "resp_rate": "breaths/min",
    "spo2": "%",
    "heart_rate": "beats/min",
    "systolic_bp": "mmHg",
    "temperature": "deg C",
    "gcs": "Glasgow Coma Scale",
    "crp": "mg/L",
    "urea": "mmol/L",
    "creatinine": "umol/L",
    "lymphocytes": "10^9/L",
    "d_dimer": "mg/L FEU",
    "ldh": "U/L",
}
COMORBIDITIES: tuple[str, ...] = (
    "hypertension",
    "diabetes",
    "chronic_lung_disease",
    "heart_failure",
    "chronic_kidney_disease",
    "immunosuppression",
    "dementia",
)
FLAG_COLUMNS: tuple[str, ...] = ("on_oxygen", *COMORBIDITIES, "nursing_home")
SEX_VALUES: tuple[str, ...] = ("female", "male")

# every contract column, in the contract's order
CONTRACT_COLUMNS: tuple[str, ...] = (
    "visit_id",
    "patient_id",
    "arrival_date",
    "age",
    "sex",
    "resp_rate",
    "spo2",
    "on_oxygen",
    "heart_rate",
    "systolic_bp",
    "temperature",
    "gcs",
    "crp",
    "urea",
    "creatinine",
    "lymphocytes",
    "d_dimer",
    "ldh",
    *COMORBIDITIES,
    "nursing_home",
    *NOTE_COLUMNS,
    *OUTCOMES,
)
# columns the file must have (readmission_30d must be there, but its cells may be empty)
REQUIRED_COLUMNS: tuple[str, ...] = (
    "visit_id",
    "patient_id",
    "arrival_date",
    "age",
    "sex",
    "mortality_30d",
    "safe_discharge",
    "readmission_30d",
)
# required columns whose every cell must be filled
_REQUIRED_VALUES: tuple[str, ...] = tuple(c for c in REQUIRED_COLUMNS if c != "readmission_30d")

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)

# cell texts read as "missing" in non-note columns (empty cell, plus what common exporters write for it)
_NA_TOKENS = ("", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None", "<NA>", "#N/A")
_MAX_ROWS_SHOWN = 5
_MAX_PROBLEMS_SHOWN = 25
_REPLACEMENT_CHAR = "\ufffd"
_DATE_MIN, _DATE_MAX = pd.Timestamp("1900-01-02"), pd.Timestamp("2100-12-31")


# ----------------------------------------------------------------------------------------------------------
# reading


def _fail(path: Path, what: str, offsite: str | None = None) -> EdfedError:
    """`offsite`: `what` without the quoted details (a reader's error text may quote the file's content)."""
    return EdfedError(f"{path}: {what}", offsite=f"{path.name}: {what if offsite is None else offsite}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


@dataclass
class _Decoded:
    """A CSV's text and how it was read: the encoding used, and the cells converted from cp1252."""

    text: str
    encoding: str
    converted: dict[str, np.ndarray] = field(default_factory=dict)  # column -> rows read as cp1252
    notice: str = ""  # what the reader did that the user must know (shown as a warning)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode_csv(path: Path, data: bytes, encoding: str | None) -> _Decoded:
    """The CSV's text, never losing a character: an explicit encoding must decode every byte; otherwise a BOM
    decides (UTF-8, UTF-16 as Excel's "Unicode text" writes it), else UTF-8, with any byte run that is not
    UTF-8 read as cp1252 (what Windows exports write) and reported. Anything else is refused."""
    def refuse(enc: str, exc: UnicodeDecodeError, raw: bytes = data) -> EdfedError:
        line = _line_of(raw, exc.start)
        what = (f"not {enc} text: byte {raw[exc.start:exc.start + 1].hex()} at line {line} of the file "
                f"(line 1 is the header) cannot be decoded; nothing was read. Pass the file's text encoding "
                f"with --encoding (or `encoding` in the mapping file), e.g. utf-8, cp1252, utf-16")
        return _fail(path, what + ".", f"not {enc} text at line {line}; pass its encoding with --encoding.")

    if encoding:
        enc = codecs.lookup(encoding).name
        if enc == "utf-8" and data.startswith(codecs.BOM_UTF8):
            enc = "utf-8-sig"
        try:
            return _Decoded(data.decode(enc), encoding)
        except UnicodeDecodeError as exc:
            raise refuse(encoding, exc) from None
    if data.startswith(codecs.BOM_UTF8):
        try:
            return _Decoded(data.decode("utf-8-sig"), "utf-8 (with BOM)")
        except UnicodeDecodeError as exc:
            raise refuse("UTF-8", exc) from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return _Decoded(data.decode("utf-16"), "utf-16")
        except UnicodeDecodeError as exc:
            raise refuse("UTF-16", exc) from None
    if b"\x00" in data[:65536]:
        raise _fail(path, "not Parquet/CSV: the content is binary, not CSV text (for UTF-16 text without a "
                          "byte-order mark pass --encoding utf-16-le).")
    text = data.decode("utf-8", errors="surrogateescape")  # an undecodable byte b becomes U+DC00+b
    runs = list(_UNDECODED.finditer(text))
    if not runs:
        return _Decoded(text, "utf-8")
    non_ascii = len(data.translate(None, bytes(range(128))))
    undecoded = sum(len(m.group()) for m in runs)
    if undecoded == non_ascii:  # no valid UTF-8 sequence anywhere: a cp1252 file
        try:
            return _Decoded(data.decode("cp1252"), "cp1252 (detected)",
                            notice="the file is not UTF-8: its text was read as cp1252 (Windows-1252), every "
                                   "note kept; if accented letters look wrong, pass the right --encoding")
        except UnicodeDecodeError as exc:
            raise refuse("UTF-8 or cp1252", exc) from None
    # mostly UTF-8 with some cp1252 pasted in: convert each run, marked so that its rows can be named
    pieces, last = [], 0
    for m in runs:
        raw = bytes(ord(ch) - 0xDC00 for ch in m.group())
        try:
            fixed = raw.decode("cp1252")
        except UnicodeDecodeError:
            offset = len(text[:m.start()].encode("utf-8", errors="surrogateescape"))
            raise refuse("UTF-8 or cp1252", UnicodeDecodeError("cp1252", data, offset, offset + 1, "")) from None
        pieces += [text[last:m.start()], _MARK_OPEN, fixed, _MARK_CLOSE]
        last = m.end()
    pieces.append(text[last:])
    return _Decoded("".join(pieces), "utf-8, some cells cp1252")


_UNDECODED = re.compile("[\udc80-\udcff]+")
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # private-use characters around text converted from cp1252


def _read_csv(path: Path, encoding: str | None) -> tuple[pd.DataFrame, _Decoded]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"could not be opened ({_short(exc)}).", "could not be opened.") from None
    if data.startswith(b"PAR1"):
        raise _fail(path, "not Parquet/CSV: the content is Parquet but the name ends in .csv; "
                          "rename it to .parquet.")
    decoded = _decode_csv(path, data, encoding)
    first = decoded.text.split("\n", 1)[0]
    # Excel's "Unicode text" (UTF-16) is tab-separated; every other site CSV is comma-separated
    sep = "\t" if decoded.encoding.startswith("utf-16") and "\t" in first and "," not in first else ","
    try:
        raw = pd.read_csv(io.StringIO(decoded.text), dtype=str, keep_default_na=False, sep=sep)
    except pd.errors.EmptyDataError:
        raise _fail(path, "empty table: the file has no header and no rows.") from None
    except Exception as exc:  # ParserError, csv.Error, ...
        hint = ("; the header looks ';'- or tab-separated, a site CSV must be comma-separated"
                if "," not in first and (";" in first or "\t" in first) else "")
        raise _fail(path, f"not Parquet/CSV: the content could not be parsed as CSV ({_short(exc)})"
                          f"{hint}.", f"not Parquet/CSV: the content could not be parsed as CSV{hint}.") from None
    if _MARK_OPEN in decoded.text:
        for col in raw.columns:
            marked = raw[col].str.contains(_MARK_OPEN, regex=False).to_numpy(dtype=bool)
            if marked.any():
                decoded.converted[str(col).strip().replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")] = marked
                raw[col] = raw[col].str.replace(_MARK_OPEN, "", regex=False).str.replace(_MARK_CLOSE, "",
                                                                                         regex=False)
        raw.columns = [str(c).replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "") for c in raw.columns]
    return raw, decoded


def _read_raw(path: Path, encoding: str | None = None) -> tuple[pd.DataFrame, _Decoded | None]:
    if not path.exists():
        raise _fail(path, "file not found.")
    if path.is_dir():
        raise _fail(path, "is a folder, not a Parquet/CSV file.")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            return pd.read_parquet(path), None
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            unreadable = "not Parquet/CSV: the content could not be read as Parquet"
            raise _fail(path, f"{unreadable} ({_short(exc)}).", f"{unreadable}.") from None
    if suffix in CSV_SUFFIXES:
        return _read_csv(path, encoding)
    raise _fail(path, f"not Parquet/CSV: the file name ends in {path.suffix or '(no extension)'!r}; "
                      "a site table must be .parquet, .pq or .csv.")


# ----------------------------------------------------------------------------------------------------------
# the site's mapping file (docs/data-contract.md, "Mapping file")

# the keys a structured mapping (TOML, or JSON with these keys) may have
MAPPING_KEYS: tuple[str, ...] = ("columns", "values", "binary_values", "date_format", "encoding")
_BINARY_COLUMNS: tuple[str, ...] = (*FLAG_COLUMNS, *OUTCOMES)


@dataclass(frozen=True)
class SiteMapping:
    """How a site's export becomes the contract's table: renames, value recodings, date format, encoding."""

    columns: dict[str, str] = field(default_factory=dict)  # site column -> contract column
    values: dict[str, dict[str, str]] = field(default_factory=dict)  # contract column -> {site value: value}
    date_format: str | None = None  # strftime codes of arrival_date as the file writes it
    encoding: str | None = None  # the CSV's text encoding (default: detected)
    label: str = ""  # how messages name the mapping


def _mapping_text(v: Any) -> str | None:
    """A recoding target as the text the contract reads ("" for missing); None if not a plain value."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int) or (isinstance(v, float) and v == int(v)):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    return v.strip() if isinstance(v, str) else None


def _parse_structured(data: dict, label: str) -> SiteMapping:
    unknown = sorted(set(data) - set(MAPPING_KEYS))
    if unknown:
        raise EdfedError(f"{label}: unknown key(s) {', '.join(map(repr, unknown))}; a mapping has only "
                         f"{', '.join(MAPPING_KEYS)} (docs/data-contract.md, 'Mapping file').")
    columns = data.get("columns", {})
    if not isinstance(columns, dict):
        raise EdfedError(f"{label}: 'columns' must be a table of site column = contract column.")
    for key in ("date_format", "encoding"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise EdfedError(f"{label}: '{key}' must be text, e.g. " +
                             ("'%Y-%m-%d %H:%M:%S'." if key == "date_format" else "'cp1252'."))
    encoding = data.get("encoding") or None
    if encoding:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise EdfedError(f"{label}: unknown encoding {encoding!r} (e.g. utf-8, cp1252, utf-16).") from None
    recodings: dict[str, Any] = {}
    binary = data.get("binary_values")
    if binary is not None:
        if not isinstance(binary, dict):
            raise EdfedError(f"{label}: 'binary_values' must be a table of site value = 0 or 1.")
        recodings.update({c: dict(binary) for c in _BINARY_COLUMNS})
    values = data.get("values", {})
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise EdfedError(f"{label}: 'values' must hold one table per column, e.g. [values.sex] F = \"female\".")
    for col, table in values.items():
        target = columns.get(col, col)  # a site column name is taken for the contract column it maps to
        if target not in CONTRACT_COLUMNS or target in NOTE_COLUMNS:
            raise EdfedError(f"{label}: [values.{col}]: not a contract column that can be recoded (notes never "
                             "are); name the contract column, e.g. [values.sex].")
        recodings[target] = {**recodings.get(target, {}), **table}
    checked: dict[str, dict[str, str]] = {}
    for col, table in recodings.items():
        allowed = (("", *SEX_VALUES) if col == "sex" else ("", "0", "1") if col in _BINARY_COLUMNS else None)
        out = {}
        for site_value, value in table.items():
            text = _mapping_text(value)
            if text is None or (allowed is not None and text not in allowed):
                what = "'female', 'male' or ''" if col == "sex" else "0, 1 or ''" if allowed else "a value"
                raise EdfedError(f"{label}: recodes {site_value!r} in column '{col}' to {value!r}; it must "
                                 f"become {what} ('' for missing).")
            out[str(site_value).strip()] = text
        checked[col] = out
    return SiteMapping(dict(columns), checked, data.get("date_format") or None, encoding, label)


def _load_mapping(mapping: Path | str | dict | SiteMapping | None, path: Path) -> SiteMapping:
    """The mapping file (TOML, JSON or two-column CSV) or dict, parsed and checked against the contract."""
    if mapping is None:
        return SiteMapping()
    if isinstance(mapping, SiteMapping):
        spec = mapping
    elif isinstance(mapping, dict):
        spec = _mapping_from_dict(mapping, "the column mapping")
    else:
        mpath = Path(mapping)
        label = f"mapping file {mpath}"
        if not mpath.is_file():
            raise EdfedError(f"{label}: file not found (given for {path}).")
        suffix = mpath.suffix.lower()
        try:
            if suffix == ".toml":
                data = tomllib.loads(mpath.read_text(encoding="utf-8-sig"))
                spec = _parse_structured(data, label)
            elif suffix == ".json":
                data = json.loads(mpath.read_text(encoding="utf-8-sig"))
                if not isinstance(data, dict):
                    raise ValueError('the JSON must be one object {"site_column": "contract_column", ...}')
                spec = _mapping_from_dict(data, label)
            elif suffix == ".csv":
                spec = SiteMapping(_csv_pairs(mpath), label=label)
            else:
                raise ValueError("a mapping file must be .toml, .json or .csv")
        except (OSError, UnicodeDecodeError, ValueError, csv.Error, tomllib.TOMLDecodeError) as exc:
            raise EdfedError(f"{label}: unreadable ({_short(exc)}).") from None
    _check_columns(spec.columns, spec.label)
    return spec


def _mapping_from_dict(data: dict, label: str) -> SiteMapping:
    """A flat {"AGE_YEARS": "age"} (the original format) or a structured one (any table value, or only
    structured keys)."""
    if any(isinstance(v, dict) for v in data.values()) or (data and set(data) <= set(MAPPING_KEYS)):
        return _parse_structured(data, label)
    return SiteMapping(dict(data), label=label)


def _csv_pairs(mpath: Path) -> dict[str, str]:
    with mpath.open(newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if any(cell.strip() for cell in r)]
    header = [c.strip() for c in rows[0]] if rows else []
    if header == ["contract_column", "site_column"]:
        raise ValueError("the header is reversed: a mapping CSV is 'site_column,contract_column', each line the "
                         "site's name first")
    if header != ["site_column", "contract_column"]:
        raise ValueError("the CSV must have the header 'site_column,contract_column'")
    pairs: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise ValueError(f"line {n} has {len(row)} fields, not 2")
        if row[0].strip() in pairs:
            raise ValueError(f"line {n} maps site column {row[0].strip()!r} a second time")
        pairs[row[0].strip()] = row[1].strip()
    return pairs


def _check_columns(pairs: dict, label: str) -> None:
    bad = [f"{k!r}: {v!r}" for k, v in pairs.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise EdfedError(f"{label}: every entry must map a site column name to a contract column name "
                         f"(both text); not: {', '.join(bad[:5])}.")
    unknown = sorted({v for v in pairs.values() if v not in CONTRACT_COLUMNS})
    if unknown:
        backwards = [k for k, v in pairs.items() if v in unknown and k in CONTRACT_COLUMNS]
        hint = (f" The mapping looks reversed: {', '.join(map(repr, backwards[:3]))} "
                f"{'is a contract column' if len(backwards) == 1 else 'are contract columns'} on the left. Each "
                f"entry is site column -> contract column, e.g. {{\"{pairs[backwards[0]]}\": \"{backwards[0]}\"}}."
                if backwards and len(backwards) * 2 >= len(unknown) else "")
        raise EdfedError(f"{label}: unknown target column name(s) {', '.join(map(repr, unknown))}; "
                         f"a target must be a column of the data contract (e.g. 'age', 'note_triage').{hint}")
    targets = pd.Series(list(pairs.values()), dtype=object)
    doubled = sorted(set(targets[targets.duplicated()]))
    if doubled:
        raise EdfedError(f"{label}: several site columns map to {', '.join(map(repr, doubled))}.")


def _apply_mapping(raw: pd.DataFrame, spec: SiteMapping, path: Path, labels: bool = True) -> pd.DataFrame:
    pairs, label = spec.columns, spec.label
    if pairs:
        present = set(raw.columns)
        # visits to predict have no outcomes yet: the site's one mapping still names its outcome columns
        absent = [k for k in pairs if k not in present and (labels or pairs[k] not in OUTCOMES)]
        if absent:
            backwards = [k for k in absent if k in CONTRACT_COLUMNS and pairs[k] in present]
            hint = (" It looks reversed: each entry is site column -> contract column, "
                    f"e.g. {{\"{pairs[backwards[0]]}\": \"{backwards[0]}\"}}." if backwards else "")
            raise EdfedError(f"{label}: maps site column(s) {', '.join(map(repr, absent))} that {path} "
                             f"does not have.{hint}")
        clash = [v for k, v in pairs.items() if v != k and v in present and v not in pairs]
        if clash:
            raise EdfedError(f"{label}: maps a site column onto {', '.join(map(repr, clash))}, which {path} "
                             "already has under that name; map or rename one of them.")
        raw = raw.rename(columns=pairs)
    for col, table in spec.values.items():
        if col not in raw.columns or not table or pd.api.types.is_bool_dtype(raw[col].dtype):
            continue  # a Parquet bool column is already 0/1
        text = _as_text(raw[col])
        recoded = text.str.strip().map(table)  # unmapped cells stay as they are; the contract judges them
        raw[col] = recoded.where(recoded.notna(), text).astype("string")
    return raw


# ----------------------------------------------------------------------------------------------------------
# cell conversion (all vectorised)


def _as_text(s: pd.Series) -> pd.Series:
    """Any column as a pandas "string" series (pd.NA for missing); bytes are decoded as UTF-8 with U+FFFD."""
    if pd.api.types.is_float_dtype(s.dtype):  # e.g. numeric ids: 17.0 -> "17"
        vals = s.to_numpy(dtype=float, na_value=np.nan)
        known = vals[~np.isnan(vals)]
        if np.isfinite(known).all() and np.all(known == np.round(known)):
            s = s.astype("Int64")
    elif s.dtype == object:
        if s.map(lambda v: isinstance(v, bytes | bytearray)).any():
            s = s.map(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else v)
    return s.astype("string")


def _missing_mask(text: pd.Series) -> np.ndarray:
    return (text.isna() | text.str.strip().isin(_NA_TOKENS)).to_numpy(dtype=bool, na_value=True)


def _as_number(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float64 with NaN for missing, missing mask, not-a-number mask)."""
    if pd.api.types.is_bool_dtype(s.dtype) or (
        pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_complex_dtype(s.dtype)
    ):
        vals = s.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        missing = np.isnan(vals)
        return vals, missing, np.zeros(len(s), dtype=bool)
    text = _as_text(s).str.strip()
    missing = _missing_mask(text)
    num = pd.to_numeric(text.where(~missing), errors="coerce")
    vals = num.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    bad = ~missing & np.isnan(vals)
    return vals, missing, bad


def _as_date(s: pd.Series, date_format: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(datetime64[ns] values, missing mask, not-a-date mask): YYYY-MM-DD, or the mapping's `date_format`
    (a time of day in it is dropped: the contract keeps the date)."""
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        d = pd.Series(s)
        if getattr(d.dt, "tz", None) is not None:
            d = d.dt.tz_localize(None)
        missing = d.isna().to_numpy()
        return _date_range_checked(d.dt.normalize(), missing, np.zeros(len(s), dtype=bool))
    is_date = np.zeros(len(s), dtype=bool)
    if s.dtype == object:  # Parquet date32 arrives as datetime.date objects
        is_date = s.map(lambda v: isinstance(v, _dt.date)).to_numpy(dtype=bool)
    text = _as_text(s.where(~is_date, None)).str.strip()
    missing = _missing_mask(text) & ~is_date
    if date_format:
        parsed = pd.to_datetime(text.where(pd.Series(~missing, index=s.index)), format=date_format, errors="coerce")
    else:
        well_formed = text.str.fullmatch(r"\d{4}-\d{2}-\d{2}").fillna(False).to_numpy(dtype=bool)
        parsed = pd.to_datetime(text.where(pd.Series(well_formed, index=s.index)), format="%Y-%m-%d",
                                errors="coerce")
    if is_date.any():
        parsed = parsed.where(~is_date, pd.to_datetime(s.where(is_date), errors="coerce"))
    bad = ~missing & parsed.isna().to_numpy()
    return _date_range_checked(parsed.dt.normalize(), missing, bad)


def _date_range_checked(d: pd.Series, missing: np.ndarray, bad: np.ndarray):
    """Dates outside 1900-2100 count as bad (sentinels such as 1900-01-01 excluded), then cast to ns."""
    outside = ((d < _DATE_MIN) | (d > _DATE_MAX)).to_numpy(dtype=bool, na_value=False)
    d = d.where(~pd.Series(outside, index=d.index))
    return d.astype("datetime64[ns]").to_numpy(), missing, bad | outside


# ----------------------------------------------------------------------------------------------------------
# validation


class _Problems:
    """Collects rule violations; each names the column, the rule and the first offending rows.

    `items` (local) also quote each row's visit_id and value; `offsite` holds the same problems with row
    numbers only.
    """

    def __init__(self, visit_ids: np.ndarray | None) -> None:
        self.items: list[str] = []
        self.offsite: list[str] = []
        self.visit_ids = visit_ids

    def where(self, mask: np.ndarray, values: np.ndarray | None = None, show_values: bool = True,
              offsite: bool = False) -> str:
        idx = np.flatnonzero(mask)
        parts = []
        for i in idx[:_MAX_ROWS_SHOWN]:
            ref = f"row {i + 1}"
            vid = self.visit_ids[i] if self.visit_ids is not None and not offsite else None
            if isinstance(vid, str) and vid:
                ref += f" (visit_id {_clip(vid)})"
            if show_values and values is not None and not offsite:
                ref += f": {_show(values[i])}"
            parts.append(ref)
        more = f"; and {len(idx) - _MAX_ROWS_SHOWN} more" if len(idx) > _MAX_ROWS_SHOWN else ""
        noun = "row" if len(idx) == 1 else "rows"
        return f"{len(idx)} {noun}: " + "; ".join(parts) + more

    def add_rows(self, column: str, rule: str, mask: np.ndarray, values: np.ndarray | None = None,
                 show_values: bool = True) -> None:
        if mask.any():
            self.items.append(f"{column}: {rule} in {self.where(mask, values, show_values)}")
            self.offsite.append(f"{column}: {rule} in {self.where(mask, offsite=True)}")

    def add(self, text: str) -> None:
        """A problem that names columns and rules only (no row, no value)."""
        self.items.append(text)
        self.offsite.append(text)


def _clip(text: str, width: int = 24) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _show(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "empty"
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    text = str(value).strip()
    if len(text) > 16 or any(ch.isspace() for ch in text):
        # could be free text (e.g. a note mapped onto the wrong column): never echo it
        return f"text of {len(text)} characters, not shown"
    return repr(text)


def _blank_bad_notes(df: pd.DataFrame, col: str, warnings: list[str], problems: _Problems) -> pd.Series:
    text = _as_text(df[col])
    empty = (text.isna() | (text.str.strip() == "")).to_numpy(dtype=bool, na_value=True)
    garbled = text.str.contains(_REPLACEMENT_CHAR, regex=False).to_numpy(dtype=bool, na_value=False)
    if garbled.any():
        # row numbers and visit_ids only: the note text itself never goes into a message
        warnings.append(f"column '{col}': unreadable text (bad encoding, not UTF-8) in "
                        f"{problems.where(garbled, show_values=False)}; these notes were blanked")
    out = text.where(~pd.Series(empty | garbled, index=df.index), "")
    return out.astype(str)


def _validate(df: pd.DataFrame, path: Path, renamed: dict[str, str], spec: SiteMapping | None = None,
              converted: dict[str, np.ndarray] | None = None, labels: bool = True) -> pd.DataFrame:
    # labels=False: new visits to predict, whose outcomes are not known yet (a label given must still be 0/1)
    required_cols = REQUIRED_COLUMNS if labels else tuple(c for c in REQUIRED_COLUMNS if c not in OUTCOMES)
    required_values = _REQUIRED_VALUES if labels else tuple(c for c in _REQUIRED_VALUES if c not in OUTCOMES)
    def name(col: str) -> str:  # a mapped column is named both ways
        return f"column '{col}' (site column '{renamed[col]}')" if col in renamed else f"column '{col}'"

    if not isinstance(df.index, pd.RangeIndex) and any(n is not None for n in df.index.names):
        df = df.reset_index()  # a Parquet file written with e.g. visit_id as its index
    df = df.reset_index(drop=True)
    cols = [str(c) for c in df.columns]
    df.columns = cols
    vid_raw = None
    if "visit_id" in df.columns and not pd.Index(cols).duplicated().any():
        vt = _as_text(df["visit_id"]).str.strip()
        vid_raw = vt.where(~pd.Series(_missing_mask(vt), index=df.index), "").fillna("").to_numpy(
            dtype=object)
    problems = _Problems(vid_raw)
    warnings: list[str] = []

    doubled = sorted(set(pd.Index(cols)[pd.Index(cols).duplicated()]))
    for col in doubled:
        problems.add(f"{name(col)}: appears more than once in the header")
    missing_cols = [c for c in required_cols if c not in df.columns]
    if missing_cols:
        hint = ""
        if len(cols) == 1 and (";" in cols[0] or "\t" in cols[0]):
            hint = " (the header looks ';'- or tab-separated; the file must be comma-separated)"
        problems.add(f"missing required column(s): {', '.join(map(repr, missing_cols))}{hint}"
                     + ("; map differently named columns with --mapping" if not renamed else ""))
    if len(df) == 0:
        problems.add("empty table: the file has a header but no data rows")
    if problems.items and (doubled or len(df) == 0):
        _raise(path, problems)

    n = len(df)
    out: dict[str, Any] = {}
    # identifiers
    for col in ID_COLUMNS:
        if col not in df.columns:
            continue
        text = _as_text(df[col]).str.strip()
        miss = _missing_mask(text)
        problems.add_rows(name(col), "missing value in required column", miss, show_values=False)
        out[col] = text.where(pd.Series(~miss, index=df.index), "").astype(str)
    if vid_raw is not None:
        filled = vid_raw != ""
        dup = pd.Series(vid_raw).duplicated(keep=False).to_numpy() & filled
        problems.add_rows(name("visit_id"), "duplicate visit_id (must be unique within the file)",
                          dup, show_values=False)
    spec = spec or SiteMapping()

    def recode_hint(col: str, table: str) -> str:  # where the fix lives: a mapping's recoding, unless it has one
        return "" if col in spec.values else f"; a mapping recodes the site's values: {table}"
    # arrival date
    if "arrival_date" in df.columns:
        vals, miss, bad = _as_date(df["arrival_date"], spec.date_format)
        problems.add_rows(name("arrival_date"), "missing value in required column", miss,
                          show_values=False)
        raw_dates = _as_text(df["arrival_date"]).to_numpy(dtype=object, na_value=None)
        if spec.date_format:
            rule = f"not a date in the mapping's date_format {spec.date_format!r} (1900-01-02 to 2100-12-31)"
        else:
            timestamps = bad.any() and any(isinstance(v, str) and re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}[ T]\d.*", v)
                                           for v in raw_dates[bad][:50])
            rule = ("not a valid YYYY-MM-DD date (1900-01-02 to 2100-12-31" +
                    ('; for timestamps set date_format = "%Y-%m-%d %H:%M:%S" in the mapping)' if timestamps else ")"))
        problems.add_rows(name("arrival_date"), rule, bad, raw_dates)
        out["arrival_date"] = pd.Series(vals, index=df.index, dtype="datetime64[ns]")
    # numbers
    for col, (lo, hi) in NUMERIC_RANGES.items():
        if col not in df.columns:
            out[col] = pd.Series(np.nan, index=df.index, dtype="float64")
            continue
        vals, miss, bad = _as_number(df[col])
        raw = _as_text(df[col]).to_numpy(dtype=object, na_value=None)
        if col in _REQUIRED_VALUES:
            problems.add_rows(name(col), "missing value in required column", miss, show_values=False)
        problems.add_rows(name(col), "wrong type: not a number", bad, raw)
        with np.errstate(invalid="ignore"):
            out_of_range = ~np.isnan(vals) & ((vals < lo) | (vals > hi))
        problems.add_rows(name(col),
                          f"value out of range {lo:g}-{hi:g} {NUMERIC_UNITS[col]} (a missing value is an "
                          "empty cell, never a sentinel like -1 or 999)", out_of_range, vals)
        out[col] = pd.Series(np.where(out_of_range, np.nan, vals), index=df.index, dtype="float64")
    # sex
    if "sex" in df.columns:
        text = _as_text(df["sex"]).str.strip()
        miss = _missing_mask(text)
        ok = text.isin(SEX_VALUES).to_numpy(dtype=bool, na_value=False)
        problems.add_rows(name("sex"), "missing value in required column", miss, show_values=False)
        problems.add_rows(name("sex"), f"not 'female'/'male' (lower case{recode_hint('sex', '[values.sex]')})",
                          ~miss & ~ok, text.to_numpy(dtype=object, na_value=None))
        out["sex"] = text.where(pd.Series(ok, index=df.index), "").astype(str)
    # 0/1 flags and labels
    for col in (*FLAG_COLUMNS, *OUTCOMES):
        if col not in df.columns:
            out[col] = pd.Series(np.nan, index=df.index, dtype="float64")
            continue
        vals, miss, bad = _as_number(df[col])
        not01 = ~miss & ~np.isin(vals, (0.0, 1.0))
        kind = "flag" if col in FLAG_COLUMNS else "label"
        if col in required_values:
            problems.add_rows(name(col), "missing required label (must be 0 or 1 on every row)",
                              miss, show_values=False)
        allowed = "0, 1 or empty" if col not in required_values else "0 or 1"
        hint = recode_hint(col, "[binary_values] (e.g. yes = 1, no = 0)")
        problems.add_rows(name(col), f"{kind} not 0/1 (allowed: {allowed}{hint})", not01,
                          _as_text(df[col]).to_numpy(dtype=object, na_value=None))
        out[col] = pd.Series(np.where(not01, np.nan, vals), index=df.index, dtype="float64")
    for col, rows in (converted or {}).items():  # cells not in UTF-8 that the reader converted: say where
        warnings.append(f"{name(col)}: text that is not UTF-8 was read as cp1252 (Windows-1252) in "
                        f"{problems.where(rows, show_values=False)}; check these cells, or pass --encoding")
    # notes
    for col in NOTE_COLUMNS:
        if col not in df.columns:
            out[col] = pd.Series("", index=df.index, dtype=str)
            continue
        out[col] = _blank_bad_notes(df, col, warnings, problems)

    if problems.items:
        _raise(path, problems)

    absent = [c for c in CONTRACT_COLUMNS if c not in df.columns]
    if absent:
        warnings.append(f"optional column(s) absent, treated as all missing: {', '.join(absent)}")
    both = (out["mortality_30d"].to_numpy() == 1) & (out["safe_discharge"].to_numpy() == 1)
    if both.any():
        warnings.append("mortality_30d = 1 and safe_discharge = 1 on the same visit (contradictory by "
                        f"definition) in {problems.where(both, show_values=False)}")

    clean = pd.DataFrame({c: out[c] for c in CONTRACT_COLUMNS}, index=pd.RangeIndex(n))
    extras = [c for c in df.columns if c not in CONTRACT_COLUMNS]
    if extras:
        clean = pd.concat([clean, df[extras].reset_index(drop=True)], axis=1)
    clean.attrs["warnings"] = warnings
    clean.attrs["source"] = str(path)
    return clean


def _raise(path: Path, problems: _Problems) -> None:
    def text(name: str, items: list[str]) -> str:
        shown = items[:_MAX_PROBLEMS_SHOWN]
        lines = [f"{name} does not follow the data contract ({len(items)} "
                 f"problem{'s' if len(items) != 1 else ''}):"]
        lines += [f"  - {p}" for p in shown]
        if len(items) > len(shown):
            lines.append(f"  - ... and {len(items) - len(shown)} more problems")
        lines.append("Row numbers count data rows from 1 (the header is not a row); "
                     "`edfed data check FILE` re-checks a fixed file.")
        return "\n".join(lines)

    raise EdfedError(text(str(path), problems.items), offsite=text(path.name, problems.offsite))


def load_site(path: Path | str | pd.DataFrame, mapping: Path | str | dict | SiteMapping | None = None,
              encoding: str | None = None, labels: bool = True) -> pd.DataFrame:
    """Read, map and validate one site table; the clean frame (contract dtypes) or an `EdfedError`.

    `mapping`: a mapping file (TOML, JSON or CSV; docs/data-contract.md) or its dict. `encoding`: the CSV's
    text encoding, over the mapping's `encoding` and detection. The frame has every contract column (an
    absent optional column is all-missing), in the contract's order, followed by any extra columns as read.
    `attrs["warnings"]` lists row-level problems that did not stop the load (e.g. text read as cp1252);
    `attrs["source"]` is the path, `attrs["encoding"]` how a CSV's text was read.

    `path` may also be a table already read (a DataFrame, named "table" in messages), as the Python API takes it.
    `labels=False`: visits to predict, whose outcome columns may be absent or empty.
    """
    table = path if isinstance(path, pd.DataFrame) else None
    path = Path("table") if table is not None else Path(path)
    spec = _load_mapping(mapping, path)
    if encoding:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise EdfedError(f"--encoding {encoding!r}: unknown text encoding (e.g. utf-8, cp1252, utf-16).") from None
    raw, decoded = (table.copy(), None) if table is not None else _read_raw(path, encoding or spec.encoding)
    raw.columns = [str(c).strip().lstrip("\ufeff") for c in raw.columns]
    raw = _apply_mapping(raw, spec, path, labels)
    renamed = {v: k for k, v in spec.columns.items() if k != v}
    converted = {spec.columns.get(c, c): rows for c, rows in decoded.converted.items()} if decoded else {}
    clean = _validate(raw, path, renamed, spec, converted, labels)
    if decoded:
        clean.attrs["encoding"] = decoded.encoding
        if decoded.notice:
            clean.attrs["warnings"].insert(0, decoded.notice)
    return clean


# ----------------------------------------------------------------------------------------------------------
# profile


def _share(part: float, whole: float) -> float:
    return float(part) / float(whole) if whole else 0.0


def profile_site(df: pd.DataFrame) -> dict:
    """Summary of a clean site frame (from `load_site`); plain Python numbers, JSON-serialisable.

    Keys: rows, patients, visits_per_patient {max, mean, share_multi}, arrival_date {min, max},
    prevalence {outcome: {positive, n, rate, empty}} (rate over non-empty rows), missingness {column: share}
    over the contract columns (a note counts as missing when empty), notes {column: {median_words,
    p90_words, share_empty}} (word counts over non-empty notes), warnings [str].
    """
    n = len(df)
    per_patient = df["patient_id"].value_counts()
    dates = pd.to_datetime(df["arrival_date"])
    prof: dict[str, Any] = {
        "rows": n,
        "patients": int(per_patient.size),
        "visits_per_patient": {
            "max": int(per_patient.max()) if n else 0,
            "mean": float(per_patient.mean()) if n else 0.0,
            "share_multi": _share((per_patient > 1).sum(), per_patient.size),
        },
        "arrival_date": {
            "min": dates.min().strftime("%Y-%m-%d") if dates.notna().any() else None,
            "max": dates.max().strftime("%Y-%m-%d") if dates.notna().any() else None,
        },
    }
    prevalence = {}
    for col in OUTCOMES:
        vals = pd.to_numeric(df[col], errors="coerce")
        known = int(vals.notna().sum())
        pos = int((vals == 1).sum())
        prevalence[col] = {"positive": pos, "n": known, "rate": _share(pos, known), "empty": n - known}
    prof["prevalence"] = prevalence
    missing = {}
    for col in CONTRACT_COLUMNS:
        if col not in df.columns:
            missing[col] = 1.0
        elif col in NOTE_COLUMNS or col in ("visit_id", "patient_id", "sex"):
            missing[col] = _share((df[col].fillna("").astype(str).str.strip() == "").sum(), n)
        else:
            missing[col] = _share(df[col].isna().sum(), n)
    prof["missingness"] = missing
    notes = {}
    for col in NOTE_COLUMNS:
        text = df[col].fillna("").astype(str) if col in df.columns else pd.Series("", index=df.index)
        words = text.str.count(r"\S+")
        filled = words[words > 0]
        notes[col] = {
            "median_words": float(filled.median()) if len(filled) else 0.0,
            "p90_words": float(filled.quantile(0.9)) if len(filled) else 0.0,
            "share_empty": _share((words == 0).sum(), n),
        }
    prof["notes"] = notes
    prof["warnings"] = list(df.attrs.get("warnings", []))
    return prof


def print_profile(df: pd.DataFrame, path: Path | str) -> None:
    """Print the profile of a clean site frame with rich tables, headed by an OK line."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    prof = profile_site(df)
    console = Console(highlight=False)
    console.print(Text(f"OK: {path} follows the data contract ({prof['rows']} visits, "
                       f"{prof['patients']} patients)", style="bold green"), soft_wrap=True)

    vpp, dates = prof["visits_per_patient"], prof["arrival_date"]
    summary = Table(title="Site", show_header=False, box=None, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("visits (rows)", f"{prof['rows']:,}")
    summary.add_row("patients", f"{prof['patients']:,}")
    summary.add_row("visits per patient", f"max {vpp['max']}, mean {vpp['mean']:.2f}, "
                                          f"{vpp['share_multi']:.1%} of patients have more than one")
    summary.add_row("arrival dates", f"{dates['min']} to {dates['max']}")
    if df.attrs.get("encoding"):
        summary.add_row("text encoding", df.attrs["encoding"])
    console.print(summary)

    outcomes = Table(title="Outcomes", title_justify="left")
    for head in ("outcome", "positive", "known", "prevalence", "empty"):
        outcomes.add_column(head, justify="left" if head == "outcome" else "right")
    for col, p in prof["prevalence"].items():
        outcomes.add_row(col, f"{p['positive']:,}", f"{p['n']:,}", f"{p['rate']:.1%}", f"{p['empty']:,}")
    console.print(outcomes)

    notes = Table(title="Notes (words, over non-empty notes)", title_justify="left")
    for head in ("column", "median", "90th pct", "empty"):
        notes.add_column(head, justify="left" if head == "column" else "right")
    for col, p in prof["notes"].items():
        notes.add_row(col, f"{p['median_words']:.0f}", f"{p['p90_words']:.0f}", f"{p['share_empty']:.1%}")
    console.print(notes)

    gaps = {c: s for c, s in prof["missingness"].items() if s > 0 and c not in NOTE_COLUMNS}
    if gaps:
        miss = Table(title="Missing values", title_justify="left")
        miss.add_column("column")
        miss.add_column("missing", justify="right")
        for col, share in sorted(gaps.items(), key=lambda kv: -kv[1]):
            miss.add_row(col, f"{share:.1%}")
        console.print(miss)
    else:
        console.print("Missing values: none outside the notes.")

    for warning in prof["warnings"]:
        console.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)
