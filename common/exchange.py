"""What crosses between a site and the server: trainable arrays, checked; and the encoder's fingerprint.

Only the trainable state (LoRA adapters, structured tower, fusion, heads) is ever sent. The base
encoder stays at each site; the server sends its fingerprint so a site with a different encoder
refuses to train instead of silently averaging adapters made for another model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack")
# A site's `refused` metric when it sends no update: why it did not train the round (its budget or the run's cap,
# a round it already trained, its cap on what it spends in 24 hours).
REFUSED_BUDGET, REFUSED_REPEAT, REFUSED_RATE = 1, 2, 3
_FINGERPRINTS: dict[tuple, str] = {}


def encoder_fingerprint(encoder_dir: Path) -> str:
    """sha256 over the encoder's config and weight files (cached per process by size and mtime)."""
    encoder_dir = Path(encoder_dir)
    files = sorted(p for p in encoder_dir.iterdir()
                   if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    key = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


def frozen_init_fingerprint(model) -> str:
    """sha256 of the seeded matrices that never train or travel (FFA-LoRA's A; compact: also text projection, fusion).

    Each site rebuilds them from the run's seed; a different torch could draw other numbers, and the
    averaged B matrices would then be wrong at that site without any error. The server sends this.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if not param.requires_grad and ("lora_" in name or not name.startswith("encoder.")):
            digest.update(name.encode())
            digest.update(param.detach().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def update_problem(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why an update cannot be aggregated (wrong keys, wrong shapes, NaN/Inf), or None if it is fine."""
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != tuple(shape):
            return f"wrong shape for {name}: {tuple(arrays[name].shape)} instead of {tuple(shape)}"
        if not np.isfinite(arrays[name]).all():
            return f"NaN or Inf in {name}"
    return None


def state_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
