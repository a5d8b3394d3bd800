"""The hardened deployment on loopback: what code a hospital runs, and who can make it run something.

Real processes, started the way docs/deployment.md ("Perimeter") tells the coordinator and the hospitals
to start them: the SuperLink on loopback behind nginx (TLS, Fleet API only), the ServerApp's SuperExec
with an auth secret, and six hospitals whose SuperNodes run in process isolation with their own
SuperExec, whose ClientApp runner is edfed-clientapp (site trust file, consortium-signed releases).
Every process the test starts is stopped (process trees).
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from test_deployment import BIN, REPO, Processes, _free_port, _wait_for

from edfed.cli.main import main as edfed
from edfed.client.runner import proc_hides_processes
from edfed.simulations.cohort import generate_cohort

SITES = range(1, 7)
NGINX = Path("/usr/sbin/nginx")
TAMPER = '''import os as _os
import pathlib as _pathlib

# Tampered: any import of this package writes a marker (stands for reading the site's data or key),
# named after the process that ran it (EDFED_TEST_WHO: the test sets it per process).
_pathlib.Path({marker!r}).mkdir(parents=True, exist_ok=True)
(_pathlib.Path({marker!r}) / f"{{_os.environ.get('EDFED_TEST_WHO', 'unknown')}}.{{_os.getpid()}}").write_text("ran")
'''


class SiteProcesses(Processes):
    """Processes, each with its own environment where given (a hospital's PATH and FLWR_HOME)."""

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "a") as log:  # umask 077, as the runbook starts every role
            proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                    env=env or self.env, cwd=REPO, start_new_session=True, umask=0o077)
        self.running[name] = proc
        return proc


def _run(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _ok(env: dict, *args: str) -> str:
    done = _run(env, *args)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _http(url: str, ca: Path, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _http_status(url: str, ca: Path, method: str = "GET") -> int:
    return _http(url, ca, method)[0]


def _acquire_task(address: str, ca: Path) -> str:
    """What the SuperLink at ADDRESS answers a ServerApp-task claim without the coordinator's secret."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(server_address=address, insecure=False,
                                                   root_certificates=ca.read_bytes(),
                                                   interceptors=[RuntimeVersionHttpInterceptor("SuperExec")])
    try:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
        return f"granted: {res}"
    except Exception as exc:  # noqa: BLE001 - any refusal will do; a grant is what must not happen
        return f"refused: {exc}"
    finally:
        client.close()


def _flwr_home(path: Path, address: str, ca: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(f'[superlink]\ndefault = "edfed"\n\n[superlink.edfed]\naddress = "{address}"\n'
                                      f'root-certificates = "{ca}"\n')
    return path


@pytest.mark.slow
@pytest.mark.skipif(not NGINX.exists(), reason="needs nginx from the OS packages (apt-get install nginx)")
def test_only_signed_releases_run_and_only_the_coordinator_starts_them(tmp_path, tiny_encoder):
    root, timings = tmp_path, {}
    base_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "PYTHONUNBUFFERED": "1"}
    operator_env = {**base_env, "FLWR_HOME": str(root / "coordinator" / "flwr_home"), "EDFED_TEST_WHO": "operator"}
    outsider_env = {**base_env, "FLWR_HOME": str(root / "outsider" / "flwr_home"), "EDFED_TEST_WHO": "outsider"}
    processes = SiteProcesses(root / "logs", operator_env)
    try:
        started = time.monotonic()
        creds, keys, rogue = root / "coordinator" / "creds", root / "consortium", root / "rogue"
        assert edfed(["deploy", "init", "--out", str(creds)]) == 0
        for k in SITES:
            assert edfed(["deploy", "site-key", f"ed-site-{k}", "--out", str(root / f"site-{k}")]) == 0
        assert edfed(["deploy", "consortium-key", "--out", str(keys)]) == 0
        assert edfed(["deploy", "consortium-key", "--out", str(rogue)]) == 0
        signing, site_keys = root / "coordinator" / "signing", root / "coordinator" / "site-keys"
        assert edfed(["deploy", "coordinator-key", "--out", str(signing)]) == 0
        site_keys.mkdir(parents=True)
        for k in SITES:  # the public keys the coordinator registered, for checking the sites' replies
            (site_keys / f"ed-site-{k}.pub").write_bytes((root / f"site-{k}" / f"ed-site-{k}.pub").read_bytes())
        ca = creds / "ca.crt"

        # The consortium's release, and a tampered copy of it (same code, plus a marker in client/__init__.py).
        assert edfed(["release", "build", "--app", str(REPO), "--out", str(root / "release")]) == 0
        (fab,) = (root / "release").glob("*.fab")
        assert edfed(["release", "sign", str(fab), "--key", str(keys / "consortium.key")]) == 0
        token = fab.with_name(fab.name + ".sig").read_text().strip()
        fab_sha = fab.with_name(fab.name + ".sha256").read_text().split()[0]
        genuine, tampered, marker = root / "genuine" / "edfed", root / "tampered" / "edfed", root / "marker"
        for folder in (genuine, tampered):
            with zipfile.ZipFile(fab) as archive:
                archive.extractall(folder)
        (tampered / "client" / "__init__.py").write_text(TAMPER.format(marker=str(marker)))
        assert edfed(["release", "build", "--app", str(tampered), "--out", str(root / "tampered-release")]) == 0
        (bad_fab,) = (root / "tampered-release").glob("*.fab")
        assert edfed(["release", "sign", str(bad_fab), "--key", str(rogue / "consortium.key")]) == 0
        rogue_token = bad_fab.with_name(bad_fab.name + ".sig").read_text().strip()
        # The tampered code really does write the marker when imported; then start from a clean slate.
        subprocess.run([str(BIN / "python"), "-c", "import client"], cwd=tampered, check=True,
                       env={**base_env, "EDFED_TEST_WHO": "control"})
        assert list(marker.iterdir())
        for made in marker.iterdir():
            made.unlink()
        timings["credentials and releases"] = time.monotonic() - started

        # Coordinator: SuperLink on loopback (process isolation, SuperExec secret), its SuperExec, nginx.
        started = time.monotonic()
        internal, public = _free_port(), _free_port()
        secret = root / "coordinator" / "superexec.secret"
        assert edfed(["deploy", "superexec-secret", str(secret)]) == 0
        processes.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile",
                        str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key"),
                        "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(internal),
                        "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                        "--database", str(root / "coordinator" / "superlink.db"),
                        "--disable-runtime-dependency-installation")
        _wait_for("the SuperLink", lambda: "Uvicorn running" in processes.log("superlink"), 90)
        processes.start("superexec", "flower-superexec", "--runtime-api-address", f"127.0.0.1:{internal}",
                        "--root-certificates", str(ca), "--superexec-auth-secret-file", str(secret))
        assert edfed(["deploy", "proxy-config", "--out", str(root / "proxy"), "--listen", f"127.0.0.1:{public}",
                      "--superlink", f"127.0.0.1:{internal}", "--credentials", str(creds)]) == 0
        processes.start("nginx", str(NGINX), "-c", str(root / "proxy" / "nginx.conf"))
        def nginx_up() -> bool:
            try:
                return _http_status(f"https://127.0.0.1:{public}/", ca) == 403
            except urllib.error.URLError:
                return False

        _wait_for("nginx", nginx_up, 30, every=0.5)
        _flwr_home(root / "coordinator" / "flwr_home", f"127.0.0.1:{internal}", ca)
        _flwr_home(root / "outsider" / "flwr_home", f"127.0.0.1:{public}", ca)
        for k in SITES:
            _ok(operator_env, "flwr", "supernode", "register", str(root / f"site-{k}" / f"ed-site-{k}.pub"), "edfed",
                "--name", f"ed-site-{k}")

        # From outside (the public port): no Control API, no Runtime API, no API docs; no one claims the ServerApp.
        for path in ("/docs", "/openapi.json", "/redoc", "/health"):
            assert _http_status(f"https://127.0.0.1:{public}{path}", ca) == 403, path
        for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/control/register-node",
                     "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input", "/v1/fleet/../control/list-runs",
                     "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleetx/get-run"):
            assert _http_status(f"https://127.0.0.1:{public}{path}", ca, "POST") == 403, path
        assert _http_status(f"https://127.0.0.1:{public}/v1/fleet/get-run", ca, "GET") == 403
        fleet_status, fleet_body = _http(f"https://127.0.0.1:{public}/v1/fleet/get-run", ca, "POST")
        assert "<html>" not in fleet_body and "only the Fleet API" not in fleet_body  # answered by the SuperLink
        assert fleet_status != 403 and '"code"' in fleet_body, (fleet_status, fleet_body)  # (wants protobuf)
        assert _acquire_task(f"127.0.0.1:{public}", ca).startswith("refused")
        assert _acquire_task(f"127.0.0.1:{internal}", ca).startswith("refused")  # on the host, without the secret
        anonymous_ls = _run(outsider_env, "flwr", "ls", "edfed")
        anonymous_run = _run(outsider_env, "flwr", "run", str(genuine), "edfed", "--run-config",
                             f'release-signature="{token}"')
        assert anonymous_ls.returncode != 0 and anonymous_run.returncode != 0
        assert "403" in anonymous_ls.stdout + anonymous_ls.stderr + anonymous_run.stdout + anonymous_run.stderr
        assert "Successfully started run" not in anonymous_run.stdout + anonymous_run.stderr
        timings["coordinator up, outsiders refused"] = time.monotonic() - started

        # Six hospitals: SuperNode in process isolation + the site's own SuperExec, edfed-clientapp on its PATH.
        started = time.monotonic()
        data = generate_cohort(root / "data", visits_per_site=60, seed=1)
        for k in SITES:
            site = root / f"site-{k}"
            assert edfed(["deploy", "site-runner", "--consortium-key", str(keys / "consortium.pub"),
                          "--coordinator-key", str(signing / "coordinator.pub"), "--min-version", "0.1.0",
                          "--out", str(site / "runner")]) == 0
            assert edfed(["deploy", "superexec-secret", str(site / "superexec.secret")]) == 0
            runtime = _free_port()
            env = {**base_env, "FLWR_HOME": str(site / "flwr_home"), "OMP_NUM_THREADS": "1",
                   "EDFED_TEST_WHO": f"site-{k}", "PATH": f"{site / 'runner' / 'bin'}{os.pathsep}{base_env['PATH']}"}
            assert edfed(["ledger", "init", str(site / "privacy-ledger.json")]) == 0
            node_config = (f'data-path="{data / f"site-{k}.parquet"}" epsilon=8.0 delta=1e-5 release-metrics=true '
                           f'declared-patients=50 '
                           f'ledger-path="{site / "privacy-ledger.json"}" cache-dir="{site / "cache"}" '
                           f'model-path="{tiny_encoder}" site-key="{site / f"ed-site-{k}.key"}" '
                           'max-epsilon-per-run=4.0')  # budget left for the attacked run below
            processes.start(f"site-{k}", "flower-supernode", "--superlink", f"127.0.0.1:{public}",
                            "--root-certificates", str(ca), "--auth-supernode-private-key",
                            str(site / f"ed-site-{k}.key"), "--isolation", "process", "--superexec-auth-secret-file",
                            str(site / "superexec.secret"), "--port", str(runtime), "--node-config", node_config,
                            env=env)
            processes.start(f"site-{k}-superexec", "flower-superexec", "--runtime-api-address",
                            f"127.0.0.1:{runtime}", "--insecure", "--superexec-auth-secret-file",
                            str(site / "superexec.secret"), env=env)
        _wait_for("six SuperNodes online", lambda: _ok(operator_env, "flwr", "supernode", "ls", "edfed").count(
            "online") >= 6, 180, every=3)

        # Three runs of the tampered FAB: with the genuine release's token, unsigned, signed by an unknown key.
        base_config = (f'model="{tiny_encoder}" data-dir="" lr=0.01 round-timeout=600 '
                       f'coordinator-key="{signing / "coordinator.key"}" site-keys="{site_keys}"')
        genuine_config = f"{base_config} num-server-rounds=2 min-sites=6 join-timeout=300"
        refused = {}
        for case, signature in (("tampered", token), ("unsigned", ""), ("unknown key", rogue_token)):
            out = _ok(operator_env, "flwr", "run", str(tampered), "edfed", "--run-config",
                      f'{genuine_config} run-dir="{root / "runs" / case.replace(" ", "-")}" '
                      f'release-signature="{signature}"')
            refused[case] = re.search(r"Successfully started run (\d+)", out).group(1)

        def refusals() -> bool:
            logs = [processes.log(f"site-{k}-superexec") for k in SITES]
            return all(f"refused run {run_id}:" in log for log in logs for run_id in refused.values())

        _wait_for("every site refusing the three tampered runs", refusals, 600, every=2)
        timings["three tampered runs refused at six sites"] = time.monotonic() - started
        for k in SITES:
            log = processes.log(f"site-{k}-superexec")
            assert "is not the signed release" in log and "comes with no release signature" in log
            assert "which is not in this site's trust file" in log
            assert not (root / f"site-{k}" / "flwr_home" / "apps").exists()  # nothing from the FAB was written

        # The genuine signed release: two rounds, six sites, TLS through nginx and node authentication.
        started = time.monotonic()
        run_dir = root / "runs" / "genuine"
        out = _ok(operator_env, "flwr", "run", str(genuine), "edfed", "--run-config",
                  f'{genuine_config} run-dir="{run_dir}" release-signature="{token}"')
        run_id = re.search(r"Successfully started run (\d+)", out).group(1)
        try:
            _wait_for("the genuine run's summary.json", lambda: (run_dir / "summary.json").exists(), 900, every=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_run(operator_env, 'flwr', 'log', run_id, 'edfed', '--show').stdout[-6000:]}"
                                 ) from None
        timings["genuine release: two rounds at six sites"] = time.monotonic() - started
        summary = json.loads((run_dir / "summary.json").read_text())
        six = {f"site-{k}" for k in SITES}
        assert summary["num_rounds"] == 2 and set(summary["sites"]) == six and not summary["refused_sites"]
        assert set(summary["site_reports"]["1"]) == six and set(summary["site_reports"]["2"]) == six
        assert set(summary["per_site"]) == six and summary["forged_replies"] == []  # every message signed
        for k in SITES:
            log = processes.log(f"site-{k}-superexec")
            assert f"run {run_id} is the signed release edfed 0.1.0" in log
            # (c) The runner checks at every start whether other local users can read its task token.
            assert ("is not mounted with hidepid=2" in log) != proc_hides_processes()
            installed = [p.name for p in (root / f"site-{k}" / "flwr_home" / "apps").iterdir()]
            assert installed == [f"edfed.edfed.0.1.0.{fab_sha[:8]}"], installed  # only the release was installed
        # The tampered code never ran at a site, nor in the ServerApp. (Flower 1.42's `flwr run DIR` itself
        # imports DIR's component packages, client/__init__.py included, while validating the app
        # (flwr/supercore/object_ref.py:validate, find_spec): the operator's own CLI ran it, which is why the
        # runbook has the operator run only the unpacked signed release.)
        ran = {p.name.split(".")[0] for p in marker.iterdir()}
        assert ran <= {"operator"}, ran
        db = root / "coordinator" / "superlink.db"  # node ids and per-round epsilon: the operator's only
        assert [f.name for f in db.parent.glob("superlink.db*") if stat.S_IMODE(f.stat().st_mode) != 0o600] == []

        # Issue 27: site-1 attacks site-2 with its own registered key, through the public port only (a separate
        # process, tests/fleet_attacker.py). Node ids are in summary.json; the instruction id in SuperNode logs.
        started = time.monotonic()
        node_of = {name: info["node"] for name, info in summary["sites"].items()}
        attack = [str(BIN / "python"), str(REPO / "tests" / "fleet_attacker.py"), "--superlink", f"127.0.0.1:{public}",
                  "--ca", str(ca), "--key", str(root / "site-1" / "ed-site-1.key"), "--node", str(node_of["site-1"]),
                  "--model", str(tiny_encoder)]
        attacker_env = {**base_env, "EDFED_TEST_WHO": "attacker"}

        # (a) A train instruction to site-2 during a running signed run (one that waits for a seventh site).
        ledger_2 = root / "site-2" / "privacy-ledger.json"
        spent = ledger_2.read_bytes()
        out = _ok(operator_env, "flwr", "run", str(genuine), "edfed", "--run-config",
                  f'{base_config} num-server-rounds=1 num-sites=7 min-sites=6 join-timeout=900 '
                  f'run-dir="{root / "runs" / "waiting"}" '
                  f'release-signature="{token}"')
        waiting = re.search(r"Successfully started run (\d+)", out).group(1)
        seen = len(processes.log("site-2-superexec"))
        injected = subprocess.run([*attack, "--run", waiting, "inject", "--to", str(node_of["site-2"])],
                                  env=attacker_env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert injected.returncode == 0 and "pushed" in injected.stdout, injected.stdout + injected.stderr
        _wait_for("site-2 refusing the injected instruction", lambda: "carries no signature by the coordinator" in
                  processes.log("site-2-superexec")[seen:], 300, every=2)
        assert ledger_2.read_bytes() == spent  # refused before any epsilon was spent (or the ledger read)
        _ok(operator_env, "flwr", "stop", waiting, "edfed")

        # (b) A reply in site-2's name to its train instruction, pushed before site-2's own: dropped and reported.
        attacked = root / "runs" / "attacked"
        seen, instruction_id = len(processes.log("site-2")), root / "attacked-instruction-id"
        out = _ok(operator_env, "flwr", "run", str(genuine), "edfed", "--run-config",
                  f'{base_config} num-server-rounds=1 min-sites=5 join-timeout=300 run-dir="{attacked}" '
                  f'release-signature="{token}"')
        attacked_run = re.search(r"Successfully started run (\d+)", out).group(1)
        forger = subprocess.Popen([*attack, "--run", attacked_run, "forge", "--as-node", str(node_of["site-2"]),
                                   "--message-id-file", str(instruction_id)], env=attacker_env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = _wait_for("site-2's train instruction", lambda: re.search(
            r"Receiving: train message \(ID: (\w+)\)", processes.log("site-2")[seen:]), 600, every=0.2)
        instruction_id.write_text(found.group(1))
        forged_out, _ = forger.communicate(timeout=300)
        assert forger.returncode == 0 and "pushed" in forged_out, forged_out
        _wait_for("the attacked run's summary.json", lambda: (attacked / "summary.json").exists(), 900, every=2)
        attacked_summary = json.loads((attacked / "summary.json").read_text())
        assert [(f["node"], f["site-key"], f["message_type"]) for f in attacked_summary["forged_replies"]] == [
            (node_of["site-2"], "ed-site-2", "train")]
        assert set(attacked_summary["site_reports"]["1"]) == six - {"site-2"}  # not aggregated
        # The other five trained and were averaged (only site-2 is missing), so the round did aggregate.
        assert [r.get("node") for r in attacked_summary["rejected_updates"]] == [node_of["site-2"]]
        global_1 = load_file(attacked / "checkpoints" / "round-1.safetensors")
        assert max(float(v.abs().max()) for v in global_1.values()) < 100  # nothing of the forged 1e3 arrays
        timings["issue 27: injected instruction and forged reply"] = time.monotonic() - started
        print("perimeter timings (s):", {k: round(v, 1) for k, v in timings.items()})
    finally:
        _stop_everything(processes)


def _stop_everything(processes: Processes) -> None:
    """Stop every process tree the test started, even when one is slow to stop (a loaded machine)."""
    tree = []
    for proc in processes.running.values():
        try:
            tree += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for name in list(processes.running):
        try:
            processes.stop(name)
        except (subprocess.TimeoutExpired, psutil.Error):
            pass  # killed below
    for p in tree:  # what outlived a stop: app processes a SuperExec started, a process too slow to exit
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
