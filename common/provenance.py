"""What made a run: the code (edfed version, git commit), the libraries, Python, the CPU and the date.

Every summary.json carries it (`common.evaluation.write_summary`), so a number in a report can be traced to the
code and machine that produced it, and two runs compared only where those match.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# the libraries whose versions change what a run computes (distribution names, as pip knows them)
PACKAGES: tuple[str, ...] = ("torch", "flwr", "transformers", "peft", "opacus", "dp-accounting", "scikit-learn")
_SOURCE = Path(__file__).resolve().parents[1]


def _version_of(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_SOURCE), *args], capture_output=True, text=True, timeout=10,
                              check=True)
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed wheel)
        return None
    return done.stdout.strip()


@functools.cache  # the code, libraries and CPU do not change while the process runs
def _static() -> dict[str, Any]:
    from edfed.common.precision import cpu_flags, cpu_name

    commit = _git("rev-parse", "HEAD") if (_SOURCE / ".git").exists() else None
    changed = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "edfed": _version_of("edfed"),
        "git_commit": commit,
        # uncommitted changes to tracked files: the commit alone does not say what ran
        "git_dirty": bool(changed) if changed is not None else None,
        "packages": {name: _version_of(name) for name in PACKAGES},
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
    }


def provenance() -> dict[str, Any]:
    """edfed version, git commit (None outside a checkout), library versions, Python, CPU, UTC date."""
    return {**_static(), "packages": dict(_static()["packages"]),
            "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
