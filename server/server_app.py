"""The Flower ServerApp: wiring around `server.federation.run_federation`.

`flwr run .` reads pyproject's [tool.flwr.app.config]; the server scores the global model on the
pooled held-out data only when it can read the sites' files, i.e. in simulation.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edfed.server.federation import run_federation

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # the coordinator reports nothing to Flower's telemetry
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    data_dir = str(run_config.get("data-dir", ""))
    run_federation(grid, run_config, pooled=bool(data_dir) and any(Path(data_dir).glob("site-*.*")))
