"""Signed releases, the site's trust file, the runner's hook into Flower and the proxy's path list (fast)."""

from __future__ import annotations

import base64
import inspect
import io
import json
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from edfed.cli.main import main
from edfed.client.release import (
    TASK_COMMANDS,
    consortium_key,
    load_trust,
    sign_release,
    verify_file,
    verify_release,
    write_site_runner,
    write_trust,
)
from edfed.common.errors import EdfedError
from edfed.server.proxy import FLEET_PATHS, write_proxy_config


def _fab(path: Path, version: str = "0.1.0", code: str = "app = None\n") -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", f'[project]\nname = "edfed"\nversion = "{version}"\n')
        archive.writestr("client/client_app.py", code)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def consortium(tmp_path):
    private, public = consortium_key(tmp_path / "consortium")
    return private, public, write_trust(tmp_path / "trust.toml", [public], "0.1.0")


def test_a_signed_release_verifies_and_names_its_version(tmp_path, consortium):
    private, _, trust = consortium
    fab = _fab(tmp_path / "edfed.fab")
    release = verify_file(fab, trust, sign_release(fab, private))
    assert release.version == "0.1.0" and len(release.sha256) == 64
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_tampered_unsigned_unknown_key_and_old_releases_are_refused(tmp_path, consortium):
    private, _, trust_path = consortium
    trust = load_trust(trust_path)
    fab = _fab(tmp_path / "edfed.fab")
    token = sign_release(fab, private).read_text()
    tampered = _fab(tmp_path / "tampered.fab", code="import os\napp = None\n").read_bytes()
    with pytest.raises(EdfedError, match="is not the signed release"):
        verify_release(tampered, token, trust)
    with pytest.raises(EdfedError, match="no release signature"):
        verify_release(fab.read_bytes(), "", trust)
    with pytest.raises(EdfedError, match="not an edfed release token"):
        verify_release(fab.read_bytes(), "bm90IGEgdG9rZW4=", trust)
    rogue_private, _ = consortium_key(tmp_path / "rogue")
    with pytest.raises(EdfedError, match="not in this site's trust file"):
        verify_release(fab.read_bytes(), sign_release(fab, rogue_private, tmp_path / "rogue.sig").read_text(), trust)
    # A forged signature under the consortium's key id.
    claim = json.loads(base64.urlsafe_b64decode(token))
    claim["version"] = "9.9.9"
    with pytest.raises(EdfedError, match="does not verify"):
        verify_release(fab.read_bytes(), base64.urlsafe_b64encode(json.dumps(claim).encode()).decode(), trust)
    # An older release, genuinely signed, cannot be replayed past the site's min-version.
    old = _fab(tmp_path / "old.fab", version="0.0.9")
    with pytest.raises(EdfedError, match="older than this site's min-version 0.1.0"):
        verify_release(old.read_bytes(), sign_release(old, private).read_text(), trust)


def test_cli_release_errors_exit_2_and_never_print_the_private_key(tmp_path, consortium, capsys):
    private, public, trust = consortium
    fab = _fab(tmp_path / "edfed.fab")
    assert main(["release", "sign", str(fab), "--key", str(private)]) == 0
    assert main(["release", "verify", str(fab), "--trust", str(trust)]) == 0
    _fab(fab, code="tampered = True\n")
    assert main(["release", "verify", str(fab), "--trust", str(trust)]) == 2
    assert main(["release", "sign", str(fab), "--key", str(public)]) == 2  # a public key is no signing key
    assert main(["deploy", "consortium-key", "--out", str(tmp_path / "consortium")]) == 2  # never overwritten
    (tmp_path / "bad.toml").write_text("keys = []\n")
    assert main(["release", "verify", str(fab), "--trust", str(tmp_path / "bad.toml")]) == 2
    out = capsys.readouterr()
    assert "PRIVATE KEY" not in out.out + out.err and "is not the signed release" in out.err


@pytest.mark.slow
def test_release_build_is_deterministic(tmp_path):
    app = tmp_path / "edfed"
    (app / "client").mkdir(parents=True)
    (app / "client" / "client_app.py").write_text("app = None\n")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "edfed"\nversion = "0.1.0"\ndescription = "x"\nlicense = "Apache-2.0"\n'
        'dependencies = []\n\n[tool.flwr.app]\npublisher = "edfed"\n\n[tool.flwr.app.components]\n'
        'serverapp = "client.client_app:app"\nclientapp = "client.client_app:app"\n\n[tool.flwr.app.config]\n'
        'x = 1\n')
    assert main(["release", "build", "--app", str(app), "--out", str(tmp_path / "a")]) == 0
    assert main(["release", "build", "--app", str(app), "--out", str(tmp_path / "b")]) == 0
    (fab_a,), (fab_b,) = (tmp_path / "a").glob("*.fab"), (tmp_path / "b").glob("*.fab")
    assert fab_a.read_bytes() == fab_b.read_bytes()
    digests = [(tmp_path / d / f"{f.name}.sha256").read_text() for d, f in (("a", fab_a), ("b", fab_b))]
    assert digests[0] == digests[1]


def test_site_runner_shims_cover_every_task_type_flower_can_start(tmp_path, consortium):
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    _, public, _ = consortium
    assert set(TASK_COMMANDS) == set(TASK_TYPE_TO_COMMAND.values())
    written = write_site_runner(tmp_path / "runner", [public], "0.1.0")
    shims = {p.name: p.read_text() for p in written[1:]}
    assert set(shims) == set(TASK_COMMANDS)
    assert "--trust" in shims["flwr-clientapp"]
    assert all(f"--refuse {name}" in text for name, text in shims.items() if name != "flwr-clientapp")
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o111 for p in written[1:])


def test_the_release_check_sits_before_flower_installs_or_imports_the_fab():
    from flwr.supernode.runtime import run_clientapp

    source = inspect.getsource(run_clientapp.run_clientapp)
    pull, install, load = (source.index(s) for s in ("pull_task_input(client)", "install_from_fab(",
                                                     "load_client_app_fn("))
    assert pull < install < load


def test_the_runner_refuses_on_another_flower_version(monkeypatch, tmp_path):
    import flwr.supercore.version

    from edfed.client import runner

    monkeypatch.setattr(flwr.supercore.version, "package_version", "1.43.0")
    with pytest.raises(SystemExit, match="written for flwr 1.42.0"):
        runner.main(["--trust", str(tmp_path / "trust.toml"), "--token", "x"])


def test_proxy_forwards_exactly_the_fleet_api_of_the_installed_flower(tmp_path):
    from flwr.superlink.routers.fleet.router import router

    assert set(FLEET_PATHS) == {route.path for route in router.routes}
    from edfed.common.credentials import init_coordinator

    init_coordinator(tmp_path / "creds", ["localhost", "127.0.0.1"])
    creds = tmp_path / "creds"
    with pytest.raises(EdfedError, match="loopback"):
        write_proxy_config(tmp_path / "p", "443", creds / "server.pem", creds / "server.key", creds / "ca.crt",
                           "0.0.0.0:9091")
    block, standalone = write_proxy_config(tmp_path / "p", "127.0.0.1:9443", creds / "server.pem",
                                           creds / "server.key", creds / "ca.crt", "127.0.0.1:9091")
    text = block.read_text()
    assert text.count("location = /v1/fleet/") == len(FLEET_PATHS) and "/v1/control" not in text
    nginx = Path("/usr/sbin/nginx")
    if nginx.exists():  # the config is one nginx accepts
        done = subprocess.run([str(nginx), "-t", "-c", str(standalone)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("task", ["flwr-agentapp", "flwr-model", "flwr-connector", "flwr-serverapp"])
def test_other_task_types_are_finished_failed_without_running_anything(monkeypatch, task):
    """The --refuse stand-in: it installs and imports nothing, finishes the task FAILED, and answers the
    SuperNode's message with an error where the task holds one (an agent app's), so the SuperNode goes on."""
    import importlib

    import flwr.app
    import flwr.supercore.runtime
    from flwr.common.constant import SubStatus

    from edfed.client import runner

    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    calls: list[tuple] = []

    class FakeClient:
        def close(self):
            calls.append(("close",))

    monkeypatch.setattr(flwr.supercore.runtime.RuntimeHttpClient, "from_server_address",
                        classmethod(lambda cls, **kwargs: FakeClient()))
    monkeypatch.setattr(runtime, "pull_task_input", lambda client: calls.append(("pull",)) or ("msg", "ctx", 0, 0))
    monkeypatch.setattr(runtime, "push_message",
                        lambda client, reply, ctx: calls.append(("reply", reply.has_error(), reply.error.reason)))
    monkeypatch.setattr(runtime, "push_task_output", lambda client, ctx, status, why: calls.append(("done", status)))
    monkeypatch.setattr(runtime, "install_from_fab", lambda *a, **k: calls.append(("install",)))
    monkeypatch.setattr(flwr.app, "Message", lambda error, reply_to: _ErrorReply(error))
    with pytest.raises(SystemExit):
        runner.main(["--refuse", task, "--runtime-api-address", "127.0.0.1:1", "--token", "t", "--insecure"])
    names = [c[0] for c in calls]
    assert "install" not in names and names[-2:] == ["done", "close"] and calls[-2][1] == SubStatus.FAILED
    if task == "flwr-agentapp":
        assert names[:2] == ["pull", "reply"] and calls[1][1] and "refused" in calls[1][2]
    else:
        assert "pull" not in names and "reply" not in names  # never takes a message meant for another task


class _ErrorReply:
    def __init__(self, error):
        self.error = error

    def has_error(self) -> bool:
        return True
