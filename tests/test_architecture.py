"""docs/architecture.md's import rules hold: each of its grep commands, run as written, prints nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _rules() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("Each of these prints nothing:", 1)[1].split("```", 2)[1]
    rules = [line for line in block.splitlines()[1:] if line.strip()]
    assert len(rules) >= 5, "the import rules' block moved: update this test"
    return rules


@pytest.mark.parametrize("rule", _rules())
def test_the_documented_import_rule_holds(rule: str) -> None:
    done = subprocess.run(["bash", "-c", rule], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout == "" and done.stderr == "", f"`{rule}` found:\n{done.stdout}{done.stderr}"
