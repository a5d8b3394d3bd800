"""edfed's Python API: a site's deployed model (or a run's global model) on a table of visits.

    from edfed import load_model
    model = load_model("runs/personalized-site-4/site-4/model")   # or a run folder
    risks = model.predict_proba(table)   # visit_id, risk_mortality_30d, risk_safe_discharge, risk_readmission_30d

The same numbers as `edfed predict` (docs/using-a-model.md).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd

# edfed's parts are the packages edfed.common, .client, .server, .simulations and .cli. An installed wheel holds them
# inside this folder; a source checkout (and the Flower app bundle built from it) keeps them beside it, as the
# repository's top-level folders, so there the package's path takes in the folder above.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).resolve().parent / "common").is_dir() and (_SOURCE_ROOT / "common" / "contract.py").is_file():
    __path__.append(str(_SOURCE_ROOT))

try:
    __version__ = version("edfed")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load_model", "read_table"]


def load_model(path: str | Path, encoder: str | Path | None = None, device: str | None = None):
    """A deployed model folder or a run folder, ready to `predict_proba(table, mapping=None)`; `encoder`: the run's
    text encoder folder (default: the packaged one); `device`: auto, cpu or cuda (default: pyproject's `device`).
    Raises `EdfedError` on a folder it cannot trust."""
    from edfed.client.model_folder import load_model as _load

    return _load(path, encoder, device)


def read_table(path: str | Path, mapping: str | Path | dict | None = None, encoding: str | None = None) -> pd.DataFrame:
    """A site file read and checked as `edfed predict --data FILE --mapping MAP` reads it (outcomes not needed)."""
    from edfed.common.contract import load_site

    return load_site(path, mapping=mapping, encoding=encoding, labels=False)
