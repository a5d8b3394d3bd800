"""Which float format the frozen encoder layers run in: a property of the machine, decided where it runs.

bf16 halves the frozen pass's memory traffic and, on CPUs with native bf16 instructions (AVX-512 BF16,
AMX), runs its matrix products several times faster than fp32. Without them oneDNN emulates bf16, and a
bf16 matrix product runs ~30x slower than fp32 (measured on an AVX2-only AMD EPYC). So `auto` picks bf16
only where the CPU has the instructions; the server never decides it for a site.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

from edfed.common.errors import EdfedError

PRECISIONS = ("auto", "bf16", "fp32")
# The site's choice when none is given on the command line or in its node config.
PRECISION_ENV = "EDFED_PRECISION"
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux); empty where it reports none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache  # the CPU does not change while the process runs; every model build asks
def native_bf16() -> bool:
    """True where bf16 matrix products run natively: the CPU has the instructions and oneDNN uses them."""
    import torch

    flags = cpu_flags()
    return (any(f in flags for f in _NATIVE_BF16_FLAGS) and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def resolve_precision(requested: str | None = None) -> str:
    """"bf16" or "fp32": the explicit choice, else $EDFED_PRECISION, else what this CPU runs natively."""
    choice = (requested or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if choice not in PRECISIONS:
        source = "precision" if requested else f"${PRECISION_ENV}"
        raise EdfedError(f"{source} must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    if choice == "auto":
        return "bf16" if native_bf16() else "fp32"
    return choice


def autocast(precision: str):
    """The context the frozen layers run in."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def machine_facts() -> dict[str, str | bool]:
    """What a timing is only meaningful next to: the CPU and whether it has native bf16."""
    return {"cpu": cpu_name(), "native_bf16": native_bf16(), "cores": os.cpu_count() or 0}
