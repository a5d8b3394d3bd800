"""How long validating one site file takes (the check runs before every training round).

    python benchmarks/contract_speed.py [--rows 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edfed.common.contract import load_site, profile_site
from edfed.simulations.cohort import generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(Path(tmp) / "c", n_sites=1, visits_per_site=args.rows)
        path = Path(tmp) / "c" / "site-1.parquet"
        csv = path.with_suffix(".csv")
        load_site(path).to_csv(csv, index=False)
        for file in (path, csv):
            load_site(file)
            started = time.perf_counter()
            table = load_site(file)
            validated = time.perf_counter() - started
            started = time.perf_counter()
            profile_site(table)
            print(f"{file.suffix}: {len(table)} rows validated in {validated:.3f} s, "
                  f"profiled in {time.perf_counter() - started:.3f} s")


if __name__ == "__main__":
    main()
