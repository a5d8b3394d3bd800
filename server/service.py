"""`edfed coordinator start|check|status|add-site|remove-site --config coordinator.toml`.

The coordinator's whole configuration is checked first (its certificate is issued by its CA, holds every
public name the hospitals dial and the loopback names nginx and the operator use, matches its key; private
keys owner-only; the signing key; the registered sites' keys; nginx); then the supervisor (common.supervisor)
starts the SuperLink on loopback (TLS, node authentication, process isolation, SuperExec secret, database),
its SuperExec, and nginx with the config `edfed deploy proxy-config` writes, from the OS package.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edfed.common.errors import EdfedError
from edfed.common.files import SHARED_FILE_MODE, atomic_write_text, private_dir
from edfed.common.supervisor import (
    BIN,
    Child,
    Problems,
    Supervisor,
    certificate_names,
    child_env,
    expiry_line,
    expiry_problem,
    has_name,
    issued_by,
    key_matches,
    load_certificate,
    private_file_problem,
    read_toml,
    running_children,
    take,
    tls_probe,
    unknown_keys,
)

LOOPBACK_NAMES = ("localhost", "127.0.0.1")  # nginx checks `localhost`; the operator's flwr dials 127.0.0.1

# Every key of coordinator.toml: (default, meaning). docs/deployment.md documents each.
COORDINATOR_KEYS: dict[str, tuple[object, str]] = {
    "public-names": (None, "required: the names (or IPs) hospitals dial; each must be in server.pem"),
    "credentials": (None, "required: the folder of `edfed deploy init` (ca.crt, server.pem, server.key)"),
    "signing-key": (None, "required: coordinator.key of `edfed deploy coordinator-key` (owner-only)"),
    "site-keys": (None, "required: folder of the registered sites' .pub files (replies are checked against them)"),
    "listen": ("443", "nginx's public port, or address:port"),
    "superlink-port": (9091, "the SuperLink's port on 127.0.0.1 (Control, Runtime and Fleet APIs)"),
    "state-dir": ("/var/lib/edfed/coordinator", "database, SuperExec secret, nginx config, flwr_home, logs, status"),
    "nginx": ("/usr/sbin/nginx", "the nginx executable (OS package)"),
    "expiry-warning-days": (30, "status warns when a certificate expires within this many days"),
}


@dataclass(frozen=True)
class CoordinatorService:
    public_names: list[str]
    credentials: Path
    signing_key: Path
    site_keys: Path
    listen: str
    superlink_port: int
    state_dir: Path
    nginx: Path
    warn_days: int

    @property
    def flwr_home(self) -> Path:
        return self.state_dir.expanduser().resolve() / "flwr_home"

    @property
    def public_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def load_coordinator_config(path: Path) -> tuple[CoordinatorService, Problems]:
    data, problems, where = read_toml(path, "coordinator config"), Problems(), str(path)
    unknown_keys(data, COORDINATOR_KEYS, problems, where)

    def get(key: str, kind: type | tuple = str) -> object:
        default, meaning = COORDINATOR_KEYS[key]
        return take(data, key, kind, default, problems, where, required=meaning.startswith("required"))

    names = get("public-names", list) or []
    if not all(isinstance(n, str) and n for n in names):
        problems.append(f"{where}: `public-names` must be a list of names, e.g. [\"fl.example-hospital.org\"]")
        names = []
    listen = str(get("listen", (str, int)))
    if not listen.rpartition(":")[2].isdigit():
        problems.append(f"{where}: `listen` = {listen!r}: give a port or address:port")
        listen = "443"
    return CoordinatorService(
        public_names=list(names), credentials=Path(str(get("credentials") or "")),
        signing_key=Path(str(get("signing-key") or "")), site_keys=Path(str(get("site-keys") or "")),
        listen=listen, superlink_port=int(get("superlink-port", int)), state_dir=Path(str(get("state-dir"))),
        nginx=Path(str(get("nginx"))), warn_days=int(get("expiry-warning-days", int))), problems


def check_coordinator(service: CoordinatorService, problems: Problems) -> Problems:
    creds = service.credentials
    if creds.parts:
        ca = load_certificate(creds / "ca.crt", "CA certificate", problems)
        cert = load_certificate(creds / "server.pem", "SuperLink certificate", problems)
        if (problem := private_file_problem(creds / "server.key", "SuperLink key")):
            problems.append(problem)
        elif cert is not None and not key_matches(cert, creds / "server.key"):
            problems.append(f"{creds / 'server.key'} is not the key of {creds / 'server.pem'}")
        if ca is not None and (problem := expiry_problem(ca, "CA certificate", creds / "ca.crt")):
            problems.append(problem)
        if cert is not None:
            if (problem := expiry_problem(cert, "SuperLink certificate", creds / "server.pem")):
                problems.append(problem)
            if ca is not None and not issued_by(cert, ca):
                problems.append(f"{creds / 'server.pem'} is not issued by {creds / 'ca.crt'} (the CA the sites trust)")
            missing = [n for n in [*service.public_names, *LOOPBACK_NAMES] if not has_name(cert, n)]
            if missing:
                problems.append(f"{creds / 'server.pem'} does not hold the name(s) {', '.join(missing)} (it holds "
                                f"{', '.join(certificate_names(cert)) or 'none'}): hospitals dial the public names, "
                                "nginx and the operator the loopback ones; issue it again with `edfed deploy init "
                                + " ".join(f"--host {n}" for n in service.public_names) + "`")
    if service.signing_key.parts:
        if (problem := private_file_problem(service.signing_key, "coordinator signing key (`signing-key`)")):
            problems.append(problem)
        else:
            from edfed.common.signing import load_coordinator_key

            try:
                load_coordinator_key(service.signing_key)
            except EdfedError as exc:
                problems.append(str(exc))
    if service.site_keys.parts and not service.site_keys.is_dir():
        problems.append(f"`site-keys` {service.site_keys}: no such folder (mkdir it; `edfed coordinator add-site` "
                        "puts each registered site's .pub there)")
    if not (service.nginx.is_file() and os.access(service.nginx, os.X_OK)):
        problems.append(f"`nginx` {service.nginx}: not an executable (apt-get install nginx)")
    if service.public_port == service.superlink_port:
        problems.append(f"`listen` and `superlink-port` are both {service.superlink_port}")
    return problems


def coordinator_children(service: CoordinatorService) -> list[Child]:
    from edfed.common.credentials import superexec_secret
    from edfed.server.proxy import write_proxy_config

    state = private_dir(service.state_dir.expanduser().resolve())
    creds = service.credentials.expanduser().resolve()
    secret = state / "superexec.secret"
    if not secret.exists():
        superexec_secret(secret)
    superlink = f"127.0.0.1:{service.superlink_port}"
    _, nginx_conf = write_proxy_config(state / "proxy", service.listen, creds / "server.pem", creds / "server.key",
                                       creds / "ca.crt", superlink, "localhost")
    write_flwr_config(service)
    env = child_env(service.flwr_home)
    return [
        Child("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds / "ca.crt"),
                            "--ssl-certfile", str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key"),
                            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(service.superlink_port),
                            "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                            "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"],
              env),
        Child("superexec", [str(BIN / "flower-superexec"), "--runtime-api-address", superlink,
                            "--root-certificates", str(creds / "ca.crt"), "--superexec-auth-secret-file", str(secret)],
              env),
        Child("nginx", [str(service.nginx), "-c", str(nginx_conf)], env),
    ]


def write_flwr_config(service: CoordinatorService) -> Path:
    """FLWR_HOME/config.toml for the operator's `flwr` on this host: the SuperLink on loopback, this CA."""
    home = private_dir(service.flwr_home)
    ca = service.credentials.expanduser().resolve() / "ca.crt"
    return atomic_write_text(home / "config.toml", f'[superlink]\ndefault = "edfed"\n\n[superlink.edfed]\n'
                             f'address = "127.0.0.1:{service.superlink_port}"\nroot-certificates = "{ca}"\n',
                             SHARED_FILE_MODE)


def coordinator_check(config: Path) -> CoordinatorService:
    service, problems = load_coordinator_config(config)
    check_coordinator(service, problems)
    problems.raise_if_any(f"coordinator config {config}")
    return service


def coordinator_start(config: Path) -> None:
    service = coordinator_check(config)
    Supervisor("coordinator", coordinator_children(service), service.state_dir.expanduser().resolve()).run()


def coordinator_status(config: Path) -> tuple[list[str], bool]:
    service, problems = load_coordinator_config(config)
    problems.raise_if_any(f"coordinator config {config}")
    status, lines = running_children(service.state_dir.expanduser().resolve())
    healthy = status is not None and all("not running" not in line for line in lines)
    ca = service.credentials / "ca.crt"
    for what, port in (("SuperLink (loopback)", service.superlink_port), ("public port (nginx)", service.public_port)):
        outcome, detail, _ = tls_probe("127.0.0.1", port, ca)
        lines.append(f"{what} 127.0.0.1:{port}: {'answers TLS' if outcome == 'ok' else outcome + ' (' + detail + ')'}")
        healthy &= outcome == "ok"
    for name, path in (("CA", ca), ("SuperLink certificate", service.credentials / "server.pem")):
        cert = load_certificate(path, name, problems)
        if cert is not None:
            line, warn = expiry_line(cert, f"{name} {path}", service.warn_days)
            lines.append(line)
            healthy &= not warn
    if service.flwr_home.exists():
        done = _flwr(service, "supernode", "ls", "edfed", check=False)
        lines.append("registered sites (flwr supernode ls):\n" + (done.stdout or done.stderr).strip())
    lines += problems
    return lines, healthy and not problems


def _flwr(service: CoordinatorService, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "flwr"), *args], env=child_env(service.flwr_home), capture_output=True,
                          text=True, timeout=120)
    if check and done.returncode != 0:
        raise EdfedError(f"flwr {' '.join(args)} failed:\n{(done.stdout + done.stderr).strip()[-2000:]}")
    return done


def add_site(config: Path, name: str, public_key: Path) -> str:
    """Register a hospital's SuperNode key with the SuperLink and keep its .pub in `site-keys`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    service = coordinator_check(config)
    if not name or any(ch in name for ch in "/\\ \t") or name.startswith("."):
        raise EdfedError(f"site name {name!r}: use letters, digits, '-' or '_'")
    kept = service.site_keys / f"{name}.pub"
    if kept.exists():
        raise EdfedError(f"{kept} exists: {name} is registered already (remove-site first to replace its key)")
    try:
        key = serialization.load_ssh_public_key(public_key.read_bytes())
    except (OSError, ValueError) as exc:
        raise EdfedError(f"{public_key}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EdfedError(f"{public_key}: not the EC P-384 key `edfed deploy site-key` writes")
    out = _flwr(service, "supernode", "register", str(public_key.resolve()), "edfed", "--name", name)
    atomic_write_text(kept, public_key.read_text(), SHARED_FILE_MODE)
    return (out.stdout + out.stderr).strip()


def remove_site(config: Path, node_id: str, name: str) -> str:
    """Unregister a hospital's node and drop its .pub from `site-keys` (its replies are no longer counted)."""
    service = coordinator_check(config)
    kept = service.site_keys / f"{name}.pub"
    if not kept.exists():
        raise EdfedError(f"{kept}: no such registered site key")
    out = _flwr(service, "supernode", "unregister", node_id, "edfed")
    kept.unlink()
    return (out.stdout + out.stderr).strip()
