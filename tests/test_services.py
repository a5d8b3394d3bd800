"""`edfed site|coordinator check|start|status` and `edfed deploy units`, without Flower processes.

A party's configuration is checked whole before anything starts: each broken setting is named in one message
(exit 2) and no process is started. The supervisor restarts a child that exits and stops every process group
on SIGTERM. The units pass `systemd-analyze verify`. Every TOML key is documented in docs/deployment.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edfed.cli.main import main as edfed
from edfed.client.release import consortium_key, public_key_id, write_site_runner
from edfed.client.service import SITE_KEYS, load_site_config, site_children
from edfed.common import supervisor
from edfed.common.credentials import init_coordinator, site_key
from edfed.common.privacy import PrivacyLedger
from edfed.common.signing import coordinator_key
from edfed.server.service import COORDINATOR_KEYS, coordinator_children, load_coordinator_config
from edfed.simulations.cohort import generate_cohort

REPO = Path(__file__).resolve().parents[1]


def _toml(data: dict) -> str:
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]\n" + _toml(value))
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value!r}")
        elif isinstance(value, list):
            lines.append(f"{key} = {json.dumps(value)}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n" + "".join(tables)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    """Credentials, a trust file, a ledger and a table: what a coordinator and one site hold."""
    root = tmp_path_factory.mktemp("parties")
    creds = root / "coordinator"
    init_coordinator(creds, ["fl.example.org"])
    consortium_key(root / "consortium")
    consortium_key(root / "rogue")
    coordinator_key(root / "coordinator" / "signing")
    site_key("ed-site-1", root / "site-1")
    write_site_runner(root / "site-1" / "runner", [root / "consortium" / "consortium.pub"], "0.1.0",
                      [root / "coordinator" / "signing" / "coordinator.pub"])
    PrivacyLedger.init(root / "site-1" / "ledger.json")
    data = generate_cohort(root / "data", n_sites=1, visits_per_site=60, seed=1)
    (root / "site-keys").mkdir()
    return root, data


def _site_config(root: Path, data: Path, tmp: Path, **changes) -> Path:
    node = {"data-path": str(data / "site-1.parquet"), "epsilon": 8.0, "delta": 1e-5, "declared-patients": 50,
            "ledger-path": str(root / "site-1" / "ledger.json"), "cache-dir": str(tmp / "cache")}
    config = {"name": "site-1", "coordinator": f"127.0.0.1:{changes.pop('port', _free_port())}",
              "ca": str(root / "coordinator" / "ca.crt"), "key": str(tmp / "ed-site-1.key"),
              "trust": str(root / "site-1" / "runner" / "trust.toml"),
              "consortium-key-id": public_key_id(root / "consortium" / "consortium.pub"),
              "state-dir": str(tmp / "state"), "node-config": node}
    shutil.copy(root / "site-1" / "ed-site-1.key", tmp / "ed-site-1.key")
    os.chmod(tmp / "ed-site-1.key", 0o600)
    for key, value in changes.items():
        if key.startswith("drop_"):
            node.pop(key[5:].replace("_", "-"))
        else:
            config[key.replace("_", "-")] = value
    path = tmp / "site.toml"
    path.write_text(_toml(config))
    return path


class _NoProcess:
    def __init__(self, *args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")


def _refused(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setattr(supervisor.subprocess, "Popen", _NoProcess)
    assert edfed(list(argv)) == 2
    return capsys.readouterr().err


def test_a_valid_site_config_passes_and_its_superexec_runs_the_runner_whatever_path_says(parties, tmp_path,
                                                                                          monkeypatch):
    root, data = parties
    config = _site_config(root, data, tmp_path)
    assert edfed(["site", "check", "--config", str(config)]) == 0  # the coordinator is down: not a problem
    monkeypatch.setenv("PATH", "/somewhere/else:/usr/bin")  # the operator's PATH plays no part
    service, problems = load_site_config(config)
    assert not problems
    supernode, superexec = site_children(service)
    assert supernode.argv[0] == str(supervisor.BIN / "flower-supernode")
    assert ["--isolation", "process"] == supernode.argv[supernode.argv.index("--isolation"):][:2]
    assert "--auth-supernode-private-key" in supernode.argv and "--superexec-auth-secret-file" in superexec.argv
    shim = Path(shutil.which("flwr-clientapp", path=superexec.env["PATH"]))
    assert shim == (tmp_path / "state" / "runner" / "bin" / "flwr-clientapp").resolve()
    assert "edfed-clientapp" in shim.read_text() and str(root / "site-1" / "runner" / "trust.toml") in shim.read_text()
    assert "/somewhere/else" not in superexec.env["PATH"] + supernode.env["PATH"]
    node_file = Path(supernode.argv[supernode.argv.index("--node-config") + 1])
    from flwr.common.config import parse_config_args

    node = parse_config_args([str(node_file)])  # as flower-supernode reads it
    assert node["site-name"] == "site-1" and node["epsilon"] == 8.0 and node["site-key"].endswith("ed-site-1.key")
    assert os.stat(tmp_path / "state" / "superexec.secret").st_mode & 0o077 == 0


def test_a_site_start_names_every_problem_and_starts_nothing(parties, tmp_path, capsys, monkeypatch):
    root, data = parties
    # A coordinator that answers with a certificate from the right CA but without the name the site dials.
    ca_key = serialization.load_pem_private_key((root / "coordinator" / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((root / "coordinator" / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("elsewhere.example.org")]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    (tmp_path / "wrong.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "wrong.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "wrong.pem", tmp_path / "wrong.key")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        for _ in range(4):
            try:
                conn, _ = server.accept()
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                continue

    threading.Thread(target=serve, daemon=True).start()
    config = _site_config(root, data, tmp_path, port=port, drop_epsilon=True,
                          consortium_key_id=public_key_id(root / "rogue" / "consortium.pub"))
    os.chmod(tmp_path / "ed-site-1.key", 0o644)
    err = _refused(capsys, monkeypatch, "site", "start", "--config", str(config))
    server.close()
    assert "4 problem(s), nothing was started" in err, err
    assert "`epsilon` is missing" in err
    assert f"{tmp_path / 'ed-site-1.key'} is readable or writable by other users (mode 0644)" in err
    assert "untrusted consortium key" in err and public_key_id(root / "rogue" / "consortium.pub") in err
    assert "does not hold the name 127.0.0.1 this site dials" in err and "elsewhere.example.org" in err
    assert not (tmp_path / "state").exists()  # nothing written either


def test_a_site_table_that_breaks_the_contract_and_a_missing_ledger_are_named(parties, tmp_path, capsys,
                                                                             monkeypatch):
    root, data = parties
    (tmp_path / "bad.csv").write_text("visit_id,age\n1,40\n")
    config = _site_config(root, data, tmp_path)
    text = config.read_text().replace(str(data / "site-1.parquet"), str(tmp_path / "bad.csv"))
    config.write_text(text.replace(str(root / "site-1" / "ledger.json"), str(tmp_path / "none.json")))
    err = _refused(capsys, monkeypatch, "site", "check", "--config", str(config))
    assert "2 problem(s)" in err and "site table:" in err and f"privacy ledger {tmp_path / 'none.json'}" in err


def _coordinator_config(root: Path, tmp: Path, **changes) -> Path:
    config = {"public-names": ["fl.example.org"], "credentials": str(root / "coordinator"),
              "signing-key": str(root / "coordinator" / "signing" / "coordinator.key"),
              "site-keys": str(root / "site-keys"), "listen": f"127.0.0.1:{_free_port()}",
              "superlink-port": _free_port(), "state-dir": str(tmp / "state"), "nginx": "/bin/true"}
    config.update({k.replace("_", "-"): v for k, v in changes.items()})
    path = tmp / "coordinator.toml"
    path.write_text(_toml(config))
    return path


def test_a_coordinator_config_is_checked_whole_and_starts_the_hardened_processes(parties, tmp_path, capsys,
                                                                                 monkeypatch):
    root, _ = parties
    good = _coordinator_config(root, tmp_path)
    assert edfed(["coordinator", "check", "--config", str(good)]) == 0
    service, problems = load_coordinator_config(good)
    superlink, superexec, nginx = coordinator_children(service)
    at = superlink.argv.index("--host")
    assert superlink.argv[at:at + 2] == ["--host", "127.0.0.1"] and "--enable-supernode-auth" in superlink.argv
    assert "--superexec-auth-secret-file" in superlink.argv and "--superexec-auth-secret-file" in superexec.argv
    assert "proxy_ssl_name localhost;" in (tmp_path / "state" / "proxy" / "edfed-fleet.conf").read_text()
    assert nginx.argv == ["/bin/true", "-c", str(tmp_path / "state" / "proxy" / "nginx.conf")]

    (tmp_path / "bad").mkdir()
    bad = _coordinator_config(root, tmp_path / "bad", public_names=["fl.other.org"], nginx="/nonexistent/nginx",
                              signing_key=str(root / "site-1" / "ed-site-1.pub"))
    err = _refused(capsys, monkeypatch, "coordinator", "start", "--config", str(bad))
    assert "3 problem(s), nothing was started" in err, err
    assert "does not hold the name(s) fl.other.org" in err and "--host fl.other.org" in err
    assert "/nonexistent/nginx: not an executable" in err
    assert f"{root / 'site-1' / 'ed-site-1.pub'} is readable or writable by other users" in err


def test_proxy_config_refuses_a_certificate_without_the_name_nginx_checks(parties, tmp_path, capsys):
    root, _ = parties
    assert edfed(["deploy", "proxy-config", "--out", str(tmp_path / "proxy"), "--credentials",
                  str(root / "coordinator"), "--upstream-name", "superlink.internal"]) == 2
    assert "does not hold the name 'superlink.internal' nginx will check" in capsys.readouterr().err
    assert not (tmp_path / "proxy").exists()


_SUPERVISED = """
import sys, time
from pathlib import Path
from edfed.common.supervisor import Child, Supervisor, child_env

state = Path(sys.argv[1])
py = sys.executable
# "steady" starts a grandchild in its own group (as a SuperExec starts an app process); "flaky" dies at once.
sleeper = "import time; time.sleep(600)"
steady = [py, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); {sleeper}"]
flaky = [py, "-c", "import sys; sys.exit(3)"]
env = child_env(state / "home")
Supervisor("test", [Child("steady", steady, env), Child("flaky", flaky, env)], state, start_gap_s=0.1).run(poll_s=0.1)
"""


@pytest.mark.slow
def test_the_supervisor_restarts_a_child_that_exits_and_stops_every_process_on_sigterm(tmp_path):
    import psutil

    sup = subprocess.Popen([sys.executable, "-c", _SUPERVISED, str(tmp_path)], cwd=REPO, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        status = {}
        while time.monotonic() < deadline:
            if (tmp_path / "status.json").exists():
                status = json.loads((tmp_path / "status.json").read_text())
                if status["children"]["flaky"]["restarts"] >= 2:
                    break
            time.sleep(0.2)
        assert status["children"]["flaky"]["restarts"] >= 2 and status["children"]["flaky"]["last-exit"] == 3
        steady = psutil.Process(status["children"]["steady"]["pid"])
        _wait = time.monotonic() + 20
        while not steady.children() and time.monotonic() < _wait:
            time.sleep(0.1)
        tree = [steady, *steady.children(recursive=True)]
        assert len(tree) == 2
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=60)
        assert sup.returncode == 0, out
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, alive
        assert "flaky exited with 3" in out and "stopped flaky, steady" in out
        assert "starting it again in 2 s" in out  # backoff doubles while it keeps dying
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)


def test_deploy_units_pass_systemd_analyze_verify(tmp_path, parties):
    root, data = parties
    site, coordinator = _site_config(root, data, tmp_path), _coordinator_config(root, tmp_path)
    import getpass

    assert edfed(["deploy", "units", "--out", str(tmp_path / "units"), "--site-config", str(site),
                  "--coordinator-config", str(coordinator), "--user", getpass.getuser()]) == 0
    units = sorted((tmp_path / "units").glob("*.service"))
    assert [u.name for u in units] == ["edfed-coordinator.service", "edfed-site.service"]
    assert f"ExecStart={supervisor.BIN / 'edfed'} site start --config {site}" in units[1].read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (no systemd): the units were written but not verified")
    done = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "edfed-" in line]
    assert not problems, problems



def test_every_toml_key_is_documented_in_the_runbook():
    text = (REPO / "docs" / "deployment.md").read_text()
    missing = [key for key in [*SITE_KEYS, *COORDINATOR_KEYS] if f"| `{key}` |" not in text]
    assert not missing, f"docs/deployment.md has no table row for: {missing}"


@pytest.mark.slow
def test_a_supervisor_killed_outright_leaves_no_child_behind(tmp_path):
    import psutil

    sup = subprocess.Popen([sys.executable, "-c", _SUPERVISED, str(tmp_path)], cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, pid = time.monotonic() + 60, None
        while time.monotonic() < deadline and pid is None:
            if (tmp_path / "status.json").exists():
                pid = json.loads((tmp_path / "status.json").read_text())["children"]["steady"]["pid"]
            time.sleep(0.2)
        steady = psutil.Process(pid)
        sup.kill()  # SIGKILL: no handler runs; the children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
        sup.wait(timeout=30)
        steady.wait(timeout=20)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
        if pid is not None:  # the grandchild (an app process's stand-in) is its parent's to stop: stop it here
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_add_site_takes_only_a_site_key_and_never_twice(parties, tmp_path, capsys, monkeypatch):
    root, _ = parties
    config = _coordinator_config(root, tmp_path)
    monkeypatch.setattr(supervisor.subprocess, "Popen", _NoProcess)  # refused before flwr is called
    assert edfed(["coordinator", "add-site", "--config", str(config), "ed-site-9",
                  str(root / "consortium" / "consortium.pub")]) == 2
    assert "not the EC P-384 key `edfed deploy site-key` writes" in capsys.readouterr().err
    (root / "site-keys" / "ed-site-1.pub").write_bytes((root / "site-1" / "ed-site-1.pub").read_bytes())
    try:
        assert edfed(["coordinator", "add-site", "--config", str(config), "ed-site-1",
                      str(root / "site-1" / "ed-site-1.pub")]) == 2
        assert "ed-site-1 is registered already" in capsys.readouterr().err
    finally:
        (root / "site-keys" / "ed-site-1.pub").unlink()
