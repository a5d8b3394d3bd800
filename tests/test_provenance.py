"""Every summary.json says what made it (code, libraries, machine, date), and the report shows it."""

from __future__ import annotations

import json
import re
from importlib.metadata import version

from edfed.common.evaluation import write_summary
from edfed.common.provenance import PACKAGES
from edfed.server.report import write_report


def test_summary_has_provenance_and_the_report_shows_it(tmp_path):
    summary = {"kind": "central", "config": {"seed": 0},
               "final": {"mortality_30d": {"auroc": 0.8, "auprc": 0.3, "brier": 0.1, "ece": 0.02, "n": 100,
                                           "events": 12}}}
    write_summary(tmp_path, summary)
    written = json.loads((tmp_path / "summary.json").read_text())
    p = written["provenance"]
    assert p["edfed"] == version("edfed")
    assert set(p["packages"]) == set(PACKAGES) and p["packages"]["torch"] == version("torch")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["date_utc"])
    assert p["python"].count(".") == 2 and p["cpu"] and isinstance(p["avx512_bf16"], bool)
    assert p["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["git_commit"])

    report = write_report(tmp_path).read_text()
    assert "## Provenance" in report and f"edfed {p['edfed']}" in report and p["date_utc"] in report


def test_a_rewritten_summary_keeps_its_provenance(tmp_path):
    write_summary(tmp_path, {"kind": "central"})
    first = json.loads((tmp_path / "summary.json").read_text())
    first["provenance"]["date_utc"] = "2020-01-01T00:00:00Z"
    write_summary(tmp_path, {**first, "local_only": {}})  # e.g. an experiment adding its baselines later
    assert json.loads((tmp_path / "summary.json").read_text())["provenance"]["date_utc"] == "2020-01-01T00:00:00Z"
