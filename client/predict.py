"""`edfed predict MODEL_DIR --data SITE_FILE --out predictions.csv`: each visit's three risks, at the site.

MODEL_DIR is the folder of the model a site deployed (client.model_folder) or a run folder (its global model). The
risks are the Python API's (`edfed.load_model(MODEL_DIR).predict_proba(table)`): both call the same code. The
output holds visit ids and risks, patient data: written owner-only, whole or not at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edfed.client.model_folder import load_model
from edfed.common.display import make_console
from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write


def run_predict(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise EdfedError(f"--out {out}: predictions are written as CSV; name the file *.csv")
    if out.exists() and out.resolve() == Path(args.data).resolve():
        raise EdfedError(f"--out {out}: that is the input table; name another file")
    if out.is_dir():
        raise EdfedError(f"--out {out}: is a folder; name the CSV file to write")
    # refuses another encoder (or an absent GPU) before reading any visit
    model = load_model(args.model_dir, encoder=args.model, device=args.device)
    risks = model.predict_proba(args.data, mapping=args.mapping, encoding=args.encoding)
    # repr-exact floats: reading the file back gives the API's numbers to the last bit
    atomic_write(out, lambda tmp: risks.to_csv(tmp, index=False))
    make_console().print(f"wrote {out}: {len(risks)} visits' risks of {', '.join(risks.columns[1:])}")
    return out
