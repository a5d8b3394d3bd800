"""Signed edfed releases: what a hospital's SuperNode agrees to run.

A release is the app's FAB exactly as `flwr build` writes it (builds are deterministic, so anyone can
rebuild it from the same tree and get the same sha256) plus a one-line signature token: the FAB's sha256
and the edfed version it carries, signed with the consortium's Ed25519 key. The token travels with a run
in the run config (`release-signature`), since Flower 1.42 has no field for it outside Flower Hub.
A site verifies the token against the keys in its own trust file and against its minimum version, so
an older signed release cannot be replayed once the site has moved its pin past it.

Made with `cryptography` (no hand-rolled crypto); the private key is written owner-only and never printed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edfed.common.errors import EdfedError
from edfed.common.files import SHARED_FILE_MODE, atomic_write_text

FORMAT = "edfed-release-v1"
SIGNATURE_KEY = "release-signature"  # the run-config key the coordinator's operator passes the token in
_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")


@dataclass(frozen=True)
class Release:
    """What a valid signature vouches for."""

    sha256: str
    version: str
    key_id: str


@dataclass(frozen=True)
class Trust:
    """A site's trust file: the keys whose releases it runs, and the oldest version it still runs."""

    keys: dict[str, ed25519.Ed25519PublicKey]
    min_version: str


def fab_sha256(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    """A short, stable name for a public key (first 16 hex digits of the sha256 of its raw bytes)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _version_tuple(version: str, what: str) -> tuple[int, ...]:
    if not _VERSION.match(version):
        raise EdfedError(f"{what}: version {version!r} is not of the form 1.2.3")
    return tuple(int(part) for part in version.split("."))


def _signed_bytes(sha256: str, version: str) -> bytes:
    return f"{FORMAT}\nsha256={sha256}\nversion={version}\n".encode()


def fab_version(fab: bytes, what: str = "FAB") -> str:
    """The edfed version a FAB carries ([project].version of its pyproject.toml), read without extracting."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            project = tomllib.loads(archive.read("pyproject.toml").decode())["project"]
        if project["name"] != "edfed":
            raise EdfedError(f"{what} is the app {project['name']!r}, not edfed")
        return str(project["version"])
    except (zipfile.BadZipFile, KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdfedError(f"{what} is not a Flower app bundle with a pyproject.toml naming its version") from exc


# --- consortium side --------------------------------------------------------------------------------------


def consortium_key(out: Path) -> tuple[Path, Path]:
    """The consortium's Ed25519 signing key: `consortium.key` (PKCS#8 PEM, 0600) and `consortium.pub` (OpenSSH)."""
    from edfed.common.credentials import ed25519_key_pair

    return ed25519_key_pair(out, "consortium")


def build_release(app: Path, out: Path) -> tuple[Path, Path]:
    """`flwr build` the app folder into OUT; returns the FAB and its `.sha256` file (sha256sum format)."""
    app = app.expanduser().resolve()
    if not (app / "pyproject.toml").exists():
        raise EdfedError(f"{app}: no pyproject.toml; give the edfed source folder to build")
    flwr = Path(sys.executable).parent / "flwr"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        done = subprocess.run([str(flwr if flwr.exists() else "flwr"), "build", "--app", str(app)], cwd=tmp,
                              capture_output=True, text=True)
        fabs = list(Path(tmp).glob("*.fab"))
        if done.returncode != 0 or len(fabs) != 1:
            raise EdfedError(f"flwr build --app {app} failed:\n{(done.stdout + done.stderr).strip()[-2000:]}")
        fab_bytes = fabs[0].read_bytes()
        fab_version(fab_bytes, f"the FAB built from {app}")
        fab = out / fabs[0].name
        digest = out / f"{fab.name}.sha256"
        atomic_write_text(digest, f"{fab_sha256(fab_bytes)}  {fab.name}\n", SHARED_FILE_MODE)
        os.replace(fabs[0], fab)  # flwr build's own file (its mode kept), moved out of the build folder
    return fab, digest


def _load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise EdfedError(f"{path}: not a readable, unencrypted PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdfedError(f"{path}: not an Ed25519 key (make one with `edfed deploy consortium-key`)")
    return key


def sign_release(fab: Path, key_path: Path, out: Path | None = None) -> Path:
    """Sign the FAB's sha256 and edfed version; writes the one-line token to OUT (default FAB.sig)."""
    content = fab.read_bytes()
    sha256, version = fab_sha256(content), fab_version(content, str(fab))
    _version_tuple(version, str(fab))
    digest_file = fab.with_name(f"{fab.name}.sha256")
    if digest_file.exists() and digest_file.read_text().split()[:1] != [sha256]:
        raise EdfedError(f"{fab} does not match {digest_file}: the FAB changed after `edfed release build`")
    key = _load_private_key(key_path)
    signature = key.sign(_signed_bytes(sha256, version))
    token = {"format": FORMAT, "sha256": sha256, "version": version, "key": key_id(key.public_key()),
             "signature": base64.b64encode(signature).decode()}
    out = out or fab.with_name(f"{fab.name}.sig")
    token_text = base64.urlsafe_b64encode(json.dumps(token, sort_keys=True).encode()).decode() + "\n"
    return atomic_write_text(out, token_text, SHARED_FILE_MODE)  # it travels to every site with the FAB


# --- site side --------------------------------------------------------------------------------------------


def _load_public_key(text: str, where: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError) as exc:
        raise EdfedError(f"{where}: {text.strip()[:40]!r}… is not an OpenSSH public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise EdfedError(f"{where}: the key {text.strip()[:40]!r}… is not Ed25519")
    return key


def public_key_id(path: Path) -> str:
    """The key id of an OpenSSH Ed25519 public key file, as release signatures name it."""
    return key_id(_load_public_key(path.read_text(), str(path)))


def write_trust(path: Path, keys: list[Path], min_version: str,
                coordinator_keys: list[Path] | None = None) -> Path:
    """A site's trust file (TOML): the consortium's public key(s), the oldest release version it runs, and the
    coordinator's public key(s), whose signature every instruction to the site needs (common.signing)."""
    _version_tuple(min_version, "--min-version")
    lines = []
    for key_file in keys:
        text = key_file.read_text().strip()
        _load_public_key(text, str(key_file))
        lines.append(text)
    if not lines:
        raise EdfedError("give at least one --consortium-key (the consortium's consortium.pub)")
    from edfed.common.signing import coordinator_public_key

    coordinators = []
    for key_file in coordinator_keys or []:
        text = key_file.read_text().strip()
        coordinator_public_key(text, str(key_file))
        coordinators.append(text)
    body = ("# edfed site trust file: this site runs only edfed releases signed by one of these keys,\n"
            "# and no release older than min-version (raise it to stop an old signed release being replayed).\n"
            f'min-version = "{min_version}"\nkeys = [\n' + "".join(f'    "{line}",\n' for line in lines) + "]\n")
    if coordinators:
        body += ("# It obeys only instructions signed by one of these coordinator keys.\ncoordinator-keys = [\n"
                 + "".join(f'    "{line}",\n' for line in coordinators) + "]\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, body, SHARED_FILE_MODE)  # the SuperExec's user reads it, maybe not its writer


def load_trust(path: Path) -> Trust:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise EdfedError(f"trust file {path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdfedError(f"trust file {path}: not valid TOML ({exc})") from None
    keys_text, min_version = data.get("keys"), data.get("min-version")
    if not isinstance(keys_text, list) or not keys_text or not isinstance(min_version, str):
        raise EdfedError(f"trust file {path}: needs `keys = [\"ssh-ed25519 …\"]` and `min-version = \"X.Y.Z\"`")
    _version_tuple(min_version, f"trust file {path}: min-version")
    keys = [_load_public_key(str(text), f"trust file {path}") for text in keys_text]
    return Trust(keys={key_id(k): k for k in keys}, min_version=min_version)


def verify_release(fab: bytes, token: str, trust: Trust) -> Release:
    """The release `fab` is, if `token` is a valid signature of its sha256 by a trusted key; else EdfedError."""
    sha256 = fab_sha256(fab)
    if not token.strip():
        raise EdfedError(f"FAB {sha256[:12]} comes with no release signature (run config `{SIGNATURE_KEY}`)")
    try:
        claim = json.loads(base64.urlsafe_b64decode(token.strip().encode()))
        fields = {name: str(claim[name]) for name in ("format", "sha256", "version", "key", "signature")}
        signature = base64.b64decode(fields["signature"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise EdfedError(f"FAB {sha256[:12]}: the release signature is not an edfed release token") from None
    if fields["format"] != FORMAT:
        raise EdfedError(f"FAB {sha256[:12]}: release signature format {fields['format']!r}, expected {FORMAT!r}")
    if fields["sha256"] != sha256:
        raise EdfedError(f"FAB {sha256[:12]} is not the signed release {fields['sha256'][:12]} "
                         f"(edfed {fields['version']}): its content differs")
    public = trust.keys.get(fields["key"])
    if public is None:
        raise EdfedError(f"FAB {sha256[:12]} is signed by key {fields['key']}, which is not in this site's trust file")
    try:
        public.verify(signature, _signed_bytes(sha256, fields["version"]))
    except InvalidSignature:
        raise EdfedError(f"FAB {sha256[:12]}: the signature by key {fields['key']} does not verify") from None
    if _version_tuple(fields["version"], "signed release") < _version_tuple(trust.min_version, "min-version"):
        raise EdfedError(f"FAB {sha256[:12]} is the signed release edfed {fields['version']}, older than this "
                         f"site's min-version {trust.min_version}")
    return Release(sha256=sha256, version=fields["version"], key_id=fields["key"])


def verify_file(fab: Path, trust_path: Path, signature: Path | None = None) -> Release:
    """`edfed release verify`: the FAB file against its `.sig` (or SIGNATURE) and a trust file."""
    signature = signature or fab.with_name(f"{fab.name}.sig")
    if not signature.exists():
        raise EdfedError(f"{fab}: no signature file {signature}")
    return verify_release(fab.read_bytes(), signature.read_text(), load_trust(trust_path))


# --- site runner shims ------------------------------------------------------------------------------------

# The commands Flower 1.42's SuperExec starts, by task type (flwr/supercore/constant.py:269
# TASK_TYPE_TO_COMMAND, resolved through PATH by flwr/supercore/superexec/executor/subprocess_executor.py:41).
# A site's SuperExec runs with the shim folder first on PATH: the ClientApp goes through the verifying
# runner, every other task type is refused.
TASK_COMMANDS = ("flwr-clientapp", "flwr-agentapp", "flwr-model", "flwr-connector", "flwr-serverapp",
                 "flwr-simulation")


def write_site_runner(out: Path, keys: list[Path], min_version: str,
                      coordinator_keys: list[Path] | None = None) -> list[Path]:
    """OUT/trust.toml and OUT/bin/<flwr task commands>: shims that start `edfed-clientapp` in its place."""
    out = out.expanduser().resolve()
    _runner_path(out)  # before anything is written
    trust = write_trust(out / "trust.toml", keys, min_version, coordinator_keys)
    return [trust, *write_runner_shims(out / "bin", trust)]


def _runner_path(where: Path) -> Path:
    runner = Path(sys.executable).parent / "edfed-clientapp"
    if not runner.exists():
        raise EdfedError(f"{runner} is missing: reinstall edfed (`bash install.sh`) so its console scripts exist")
    if "'" in str(where) or "'" in str(runner):
        raise EdfedError(f"{where}: choose a folder without a quote (') in its path; it is written into shell scripts")
    return runner


def write_runner_shims(bin_dir: Path, trust: Path) -> list[Path]:
    """BIN_DIR/<flwr task commands>: the ClientApp's runs `edfed-clientapp --trust TRUST`, the others refuse.
    `edfed site start` writes them at every start, from the site's configured trust file."""
    bin_dir, trust = bin_dir.expanduser().resolve(), trust.expanduser().resolve()
    runner = _runner_path(bin_dir)
    _runner_path(trust)
    tmp = bin_dir.parent / f".{bin_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for command in TASK_COMMANDS:
        mode = f"--trust '{trust}'" if command == "flwr-clientapp" else f"--refuse {command}"
        (tmp / command).write_text(
            "#!/bin/sh\n# Written by edfed (site runner): this site's SuperExec starts this instead of "
            f"Flower's {command}.\nexec '{runner}' {mode} \"$@\"\n")
        os.chmod(tmp / command, 0o755)
    shutil.rmtree(bin_dir, ignore_errors=True)
    os.replace(tmp, bin_dir)  # a folder swap, not a file write: every shim is replaced at once
    return [bin_dir / c for c in TASK_COMMANDS]
