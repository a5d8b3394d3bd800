"""A real deployment on loopback: a TLS SuperLink with node authentication and six hospital SuperNodes.

Every process is a real Flower process started the way docs/deployment.md tells a hospital to
start it (tiny encoder, 60 visits per site, so it fits CI). One test walks through the story:
an unregistered site is refused; a site dies during round 1 of a three-round run and rounds 1 and 2
complete with the other five; the coordinator then crashes, restarts and resumes the run from round
2's checkpoint, and the site that died has come back and trains in round 3; no log holds note text.
Every process the test starts is stopped by the test (process trees, not just the parents).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from edfed.cli.main import main as edfed
from edfed.simulations.cohort import generate_cohort

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = range(1, 7)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Processes:
    """The processes this test started, each with its own log file; stopped with all descendants."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.running: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "a") as log:
            proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=REPO, start_new_session=True)
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.running.pop(name)
        try:  # SuperExec and app processes are detached children: collect the tree before it breaks up
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=15)
        for p in alive:
            p.kill()
        proc.wait(timeout=15)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


@pytest.fixture
def deployment(tmp_path, tiny_encoder):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr_home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
    processes = Processes(tmp_path / "logs", env)
    try:
        yield tmp_path, processes, env
    finally:
        processes.stop_all()


def _flwr(env: dict, *args: str, timeout: float = 120) -> str:
    done = subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"flwr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


_ONE_SITE_ROUND = """
import sys
from pathlib import Path

import edfed.client.client_app  # noqa: F401  (what flwr-clientapp imports before it handles a message)
from edfed.client.site import check_site, settings_from_configs, train_round
from edfed.common.model import build_model
from edfed.common.config import RUN_DEFAULTS, train_config_from
from edfed.common.privacy import PrivacyLedger

data, encoder, scratch = sys.argv[1:4]
PrivacyLedger.init(Path(scratch) / "ledger.json")
settings = settings_from_configs({"data-path": data, "epsilon": 8.0, "delta": 1e-5, "site-name": "calibration",
                                  "ledger-path": f"{scratch}/ledger.json", "cache-dir": f"{scratch}/cache",
                                  "model-path": encoder, "declared-patients": 50}, {})
config = train_config_from({**RUN_DEFAULTS, "model": encoder, "lr": 0.01})
check_site(settings, config)
train_round(settings, config, build_model(config).trainable_state(), run_id="calibration", server_round=1,
            num_rounds=3, local_epochs=1)
"""


def _round_timeout(data: Path, encoder: Path, scratch: Path, sites: int) -> tuple[float, float]:
    """(one site's first round alone, the round timeout derived from it) on this machine.

    One site's first round runs in a fresh interpreter as a SuperNode runs it (imports, data check, model,
    frozen-layer cache, noise plan, DP step). Round 1 starts all sites' processes at once on this machine's
    cores, so it takes about that times sites / cores; the timeout allows three times that, plus the minute a
    SuperLink takes to declare a killed node offline.
    """
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", _ONE_SITE_ROUND, str(data), str(encoder), str(scratch)], cwd=REPO,
                   check=True, capture_output=True, timeout=900)
    alone = time.monotonic() - started
    return alone, 3 * alone * math.ceil(sites / (os.cpu_count() or 1)) + 60


def test_tls_authenticated_federation_survives_a_dead_site_and_a_coordinator_restart(deployment, tiny_encoder):
    root, processes, env = deployment
    timings: dict[str, float] = {}
    data = generate_cohort(root / "data", visits_per_site=60, seed=1)
    creds = root / "creds"
    assert edfed(["deploy", "init", "--out", str(creds)]) == 0
    for name in [*(f"ed-site-{k}" for k in SITES), "unregistered"]:
        assert edfed(["deploy", "site-key", name, "--out", str(creds)]) == 0
    # The coordinator signs every message; each site lists its public key and signs its replies with its own key.
    signing, site_keys = root / "signing", root / "site-keys"
    assert edfed(["deploy", "coordinator-key", "--out", str(signing)]) == 0
    site_keys.mkdir()
    for k in SITES:
        (site_keys / f"ed-site-{k}.pub").write_bytes((creds / f"ed-site-{k}.pub").read_bytes())

    # Coordinator: the SuperLink with TLS and SuperNode authentication, state kept on disk.
    port = _free_port()
    superlink = ("flower-superlink", "--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile",
                 str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key"), "--enable-supernode-auth",
                 "--port", str(port), "--database", str(root / "superlink.db"),
                 "--disable-runtime-dependency-installation")
    processes.start("superlink", *superlink)
    _wait_for("the SuperLink", lambda: "Uvicorn running" in processes.log("superlink"), 60)
    (root / "flwr_home").mkdir(exist_ok=True)
    (root / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "edfed"\n\n[superlink.edfed]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n')
    for k in SITES:
        _flwr(env, "supernode", "register", str(creds / f"ed-site-{k}.pub"), "edfed", "--name", f"ed-site-{k}")

    def start_site(k: int) -> None:
        ledger = root / "hospital" / f"site-{k}.ledger.json"
        if not ledger.exists():  # once per site: a restarted site keeps its ledger
            assert edfed(["ledger", "init", str(ledger)]) == 0
        node_config = (f'data-path="{data / f"site-{k}.parquet"}" epsilon=8.0 delta=1e-5 release-metrics=true '
                       f'declared-patients=50 ledger-path="{ledger}" '
                       f'cache-dir="{root / "hospital" / f"cache-{k}"}" model-path="{tiny_encoder}" '
                       f'coordinator-key="{signing / "coordinator.pub"}" site-key="{creds / f"ed-site-{k}.key"}"')
        processes.start(f"site-{k}", "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                        str(creds / "ca.crt"), "--auth-supernode-private-key", str(creds / f"ed-site-{k}.key"),
                        "--port", str(_free_port()), "--node-config", node_config)

    for k in SITES:
        start_site(k)

    # A SuperNode whose key was never registered is refused and exits.
    started = time.monotonic()
    rogue = processes.start("unregistered", "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                            "--root-certificates", str(creds / "ca.crt"), "--auth-supernode-private-key",
                            str(creds / "unregistered.key"), "--port", str(_free_port()), "--node-config",
                            f'data-path="{data / "site-1.parquet"}"')
    assert rogue.wait(timeout=120) != 0
    timings["unregistered node refused"] = time.monotonic() - started
    assert "Failed to activate SuperNode" in processes.log("unregistered")
    processes.running.pop("unregistered")

    # Not a fixed number: a round on a slow 2-core CPU takes several times what it takes on a fast one.
    timings["one site's round 1 alone"], round_timeout = _round_timeout(data / "site-1.parquet", tiny_encoder,
                                                                       root / "calibration", len(SITES))
    run_config = (f'num-server-rounds=3 model="{tiny_encoder}" data-dir="" lr=0.01 round-timeout={round_timeout:.0f} '
                  f'join-timeout=120 min-sites=3 run-dir="{root / "run"}" '
                  f'coordinator-key="{signing / "coordinator.key"}" site-keys="{site_keys}"')
    run_dir, run_ids = root / "run", []

    def start_run(extra: str = "") -> None:
        out = _flwr(env, "run", ".", "edfed", "--run-config", f"{run_config} {extra}")
        run_ids.append(re.search(r"run (\d+)", out).group(1))

    def wait_for_file(name: str, timeout: float = 600) -> Path:
        try:
            return _wait_for(name, lambda: (run_dir / name).exists() and run_dir / name, timeout, every=0.5)
        except AssertionError as exc:  # show what the ServerApp said
            raise AssertionError(f"{exc}\n{_flwr(env, 'log', run_ids[-1], 'edfed', '--show')[-6000:]}") from None

    # Site-6 dies as soon as it is asked to train in round 1; rounds 1 and 2 go on with the other five.
    started = time.monotonic()
    start_run()
    _wait_for("site-6's first train message", lambda: "Receiving: train message" in processes.log("site-6"), 300)
    processes.stop("site-6", signal.SIGKILL)
    wait_for_file("checkpoints/round-2.safetensors")
    timings["rounds 1-2 with site-6 killed in round 1"] = time.monotonic() - started

    # The coordinator crashes; it restarts, site-6 comes back, and the run resumes from round 2's checkpoint.
    started = time.monotonic()
    processes.stop("superlink", signal.SIGKILL)
    processes.start("superlink", *superlink)
    _wait_for("the restarted SuperLink", lambda: processes.log("superlink").count("Uvicorn running") == 2, 60)
    start_site(6)
    start_run("resume=true")
    summary = json.loads(wait_for_file("summary.json").read_text())
    timings["coordinator restart, resume and round 3"] = time.monotonic() - started

    assert json.loads((run_dir / "run.json").read_text())["resumed"] == 1
    assert (run_dir / "checkpoints" / "round-3.safetensors").exists() and summary["num_rounds"] == 3
    five, six = {f"site-{k}" for k in range(1, 6)}, {f"site-{k}" for k in SITES}
    reports = summary["site_reports"]
    assert set(reports["1"]) == five and set(reports["2"]) == five and set(reports["3"]) == six  # site-6 rejoined
    node_6 = summary["sites"]["site-6"]["node"]
    assert any(r["round"] == 1 and r.get("node") == node_6 for r in summary["rejected_updates"])
    assert set(summary["sites"]) == six and not summary["refused_sites"] and not summary["forged_replies"]
    assert set(summary["per_site"]) == six
    # The sites train with DP, so the run's model is the DP-GLM (architecture auto): its arrays, no LoRA adapter.
    assert summary["config"]["train"]["architecture"] == "glm"
    assert (run_dir / "adapter" / "edfed_heads.safetensors").exists()
    for k in SITES:  # DP at every site, accounted in the site's own ledger across the restart
        ledger = json.loads((root / "hospital" / f"site-{k}.ledger.json").read_text())
        assert ledger["history"] and 0 < summary["privacy"][f"site-{k}"]["epsilon"] <= 8.0 + 1e-6

    # No note text in any process's log, the ServerApp's included.
    server_logs = "".join(_flwr(env, "log", run_id, "edfed", "--show") for run_id in run_ids)
    logs = server_logs + "".join(p.read_text(errors="replace") for p in processes.logs.glob("*.log"))
    notes = pd.concat([pd.read_parquet(data / f"site-{k}.parquet")[["note_triage", "note_physician",
                                                                    "note_assessment_plan"]] for k in SITES])
    lines = {line for note in notes.stack().dropna() for line in str(note).splitlines() if len(line) > 30}
    assert lines and not [line for line in lines if line in logs]
    print(f"deployment timings (s; round-timeout {round_timeout:.0f} s):", {k: round(v, 1) for k, v in timings.items()})


def test_a_secure_round_over_tls_aborts_when_a_site_dies_and_every_site_is_charged_for_what_it_sent(
        deployment, tiny_encoder):
    """Secure aggregation (docs/secure-aggregation.md) with real processes: TLS, node authentication, every message
    signed. With t = 6 of six sites, site-6 is killed once it has recorded its first secure step (its masked vector
    is then out, or about to be): that step cannot be unmasked and aborts, the next one aborts at its setup, the
    global model stays as it was, and each site's ledger holds what it released in the aborted step."""
    root, processes, env = deployment
    data = generate_cohort(root / "data", visits_per_site=60, seed=1)
    creds, signing, site_keys = root / "creds", root / "signing", root / "site-keys"
    assert edfed(["deploy", "init", "--out", str(creds)]) == 0
    for k in SITES:
        assert edfed(["deploy", "site-key", f"ed-site-{k}", "--out", str(creds)]) == 0
    assert edfed(["deploy", "coordinator-key", "--out", str(signing)]) == 0
    site_keys.mkdir()
    for k in SITES:
        (site_keys / f"ed-site-{k}.pub").write_bytes((creds / f"ed-site-{k}.pub").read_bytes())
    port = _free_port()
    processes.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile",
                    str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key"), "--enable-supernode-auth",
                    "--port", str(port), "--database", str(root / "superlink.db"),
                    "--disable-runtime-dependency-installation")
    _wait_for("the SuperLink", lambda: "Uvicorn running" in processes.log("superlink"), 60)
    (root / "flwr_home").mkdir(exist_ok=True)
    (root / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "edfed"\n\n[superlink.edfed]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n')
    ledgers = {k: root / "hospital" / f"site-{k}.ledger.json" for k in SITES}
    for k in SITES:
        _flwr(env, "supernode", "register", str(creds / f"ed-site-{k}.pub"), "edfed", "--name", f"ed-site-{k}")
        assert edfed(["ledger", "init", str(ledgers[k])]) == 0
        node_config = (f'data-path="{data / f"site-{k}.parquet"}" epsilon=8.0 delta=1e-5 declared-patients=50 '
                       f'ledger-path="{ledgers[k]}" cache-dir="{root / "hospital" / f"cache-{k}"}" '
                       f'model-path="{tiny_encoder}" coordinator-key="{signing / "coordinator.pub"}" '
                       f'site-key="{creds / f"ed-site-{k}.key"}" secure-aggregation=true min-secagg-sites=6 '
                       'max-epsilon-without-secagg=100.0')
        processes.start(f"site-{k}", "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                        str(creds / "ca.crt"), "--auth-supernode-private-key", str(creds / f"ed-site-{k}.key"),
                        "--port", str(_free_port()), "--node-config", node_config)

    _, round_timeout = _round_timeout(data / "site-1.parquet", tiny_encoder, root / "calibration", len(SITES))
    run_dir = root / "run"
    out = _flwr(env, "run", ".", "edfed", "--run-config",
                f'num-server-rounds=1 glm-steps=2 architecture="glm" epsilon=8.0 secure-aggregation=true '
                f'secagg-sites=6 model="{tiny_encoder}" data-dir="" round-timeout={round_timeout:.0f} '
                f'join-timeout=120 min-sites=3 run-dir="{run_dir}" '
                f'coordinator-key="{signing / "coordinator.key"}" site-keys="{site_keys}"')
    run_id = re.search(r"run (\d+)", out).group(1)

    def recorded(k: int) -> list[dict]:
        return json.loads(ledgers[k].read_text())["history"] if ledgers[k].exists() else []

    _wait_for("site-6's first secure step in its ledger", lambda: recorded(6), 900, every=0.2)
    processes.stop("site-6", signal.SIGKILL)
    try:
        summary = json.loads(_wait_for("summary.json", lambda: (run_dir / "summary.json").exists()
                                       and run_dir / "summary.json", 1200, every=1.0).read_text())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_flwr(env, 'log', run_id, 'edfed', '--show')[-6000:]}") from None

    aborted = [r for r in summary["rejected_updates"] if r.get("why") == "secure round aborted"]
    assert [r["step"] for r in aborted] == [1, 2]  # neither step was unmasked: no sum of fewer than six shares
    from safetensors.torch import load_file

    before, after = (load_file(run_dir / "checkpoints" / f"round-{r}.safetensors") for r in (0, 1))
    assert all(bool((before[n] == after[n]).all()) for n in before)  # the global model stayed as it was
    for k in SITES:  # what each site released in step 1 is charged, though the step aborted; step 2 spent nothing
        history = recorded(k)
        assert [h["round"] for h in history] == [1], (k, history)
        assert history[0]["secagg-sites"] == 6 and history[0]["share-noise"] < history[0]["noise"]
    # Every site joined the secure run after checking it against its bounds; none was refused.
    assert set(summary["sites"]) == {f"site-{k}" for k in SITES} and not summary["refused_sites"]
    assert not summary["forged_replies"]
