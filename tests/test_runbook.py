"""The runbook is the test: docs/deployment.md's rehearsal, run as written.

The bash blocks of section 2 are taken from the document and run in order as one script, with one change: the
first block's settings (the folder, the cohort size, the ports) and the encoder are this test's (a tiny encoder,
60 visits per site, free ports). So the document cannot drift from what works: a coordinator and six hospitals
start with `edfed coordinator start` / `edfed site start`, one site's service is stopped and started again, the
signed release runs two rounds, and the perimeter refuses an anonymous `flwr run` and a tampered FAB.
Every process the script started is stopped by the script itself (SIGTERM to each service), and, should it
fail midway, by this test (its process group, and any process whose command line names its folder).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = "export P=$PWD/deploy-demo VISITS=300 PUBLIC_PORT=9443 SUPERLINK_PORT=9091 RUNTIME_PORT=9300"
ENCODER = ('export ENCODER=$(python -c "from edfed.common.config import default_encoder_dir; '
           'print(default_encoder_dir())")')


def rehearsal_script() -> str:
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text.split("\n## 2. Rehearsal", 1)[1].split("\n## ", 1)[0]
    script = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    assert SETTINGS in script and ENCODER in script, "the rehearsal's first block changed: update this test's SETTINGS"
    return script


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports() -> tuple[int, int, int]:
    """Two free ports and a base whose next six are free (site k's Runtime API is base + k)."""
    while True:
        base = random.randrange(20000, 60000)
        if all(_free(base + k) for k in range(9)):
            return base + 7, base + 8, base


def _stop_leftovers(session: int, folder: Path) -> None:
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) == session or str(folder) in " ".join(proc.info["cmdline"] or []):
                mine.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    for proc in mine:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(mine, timeout=30)


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="needs nginx from the OS packages")
def test_the_runbooks_rehearsal_runs_as_written(tmp_path, tiny_encoder):
    demo = tmp_path / "demo"
    public, superlink, runtime = _ports()
    script = rehearsal_script().replace(
        SETTINGS, f"export P={demo} VISITS=60 PUBLIC_PORT={public} SUPERLINK_PORT={superlink} RUNTIME_PORT={runtime}")
    script = script.replace(ENCODER, f"export ENCODER={tiny_encoder}")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FLWR_HOME", None)
    log = tmp_path / "rehearsal.log"
    started = time.monotonic()
    with open(log, "w") as out:
        bash = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = bash.wait(timeout=2400)
        took = time.monotonic() - started
        text = log.read_text(errors="replace")
        assert code == 0, f"the rehearsal stopped with {code}:\n{text[-8000:]}"
        # Every service stopped on SIGTERM and took its processes with it (before this test cleans up anything).
        time.sleep(2)
        left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                if str(demo) in " ".join(p.info["cmdline"] or [])]
        assert not left, left
    finally:
        _stop_leftovers(bash.pid, demo)
    print(f"rehearsal as written: {took:.0f} s")

    # Two rounds of the signed release with all six sites, site-3 among them after its service restarted.
    summary = json.loads((demo / "run" / "summary.json").read_text())
    six = {f"site-{k}" for k in range(1, 7)}
    assert summary["num_rounds"] == 2 and set(summary["sites"]) == six
    assert set(summary["site_reports"]["1"]) == six and set(summary["site_reports"]["2"]) == six
    assert not summary["refused_sites"] and not summary["forged_replies"]
    service_3 = (demo / "site-3" / "service.log").read_text()
    assert "stopped superexec, supernode" in service_3 and service_3.count("started supernode") >= 2
    assert "2 rounds, sites" in text
    # The perimeter: nginx answers 403 outside the Fleet API; an anonymous flwr run is refused; the tampered FAB
    # is refused at every site and its code never ran.
    assert re.search(r"^403$", text, re.M) and "anonymous flwr run: refused (403)" in text
    assert "the tampered code never ran" in text and not (demo / "tampered-ran").exists()
    for k in range(1, 7):
        superexec = (demo / f"site-{k}" / "state" / "logs" / "superexec.log").read_text(errors="replace")
        assert "is the signed release edfed" in superexec
        assert re.search(r"refused run \d+: FAB \w+ is not the signed release \w+ .*its content differs", superexec)
    for status in [demo / "coordinator-state" / "status.json", *demo.glob("site-*/state/status.json")]:
        assert json.loads(status.read_text())["stopping"] is True  # each service recorded its own stop
