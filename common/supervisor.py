"""What `edfed site start` and `edfed coordinator start` share: the checks of a party's credentials, the
supervisor that starts and restarts its Flower processes, its status file, and its systemd unit.

A party's whole configuration is checked before any process starts; every problem found is collected and
reported at once (one EdfedError, exit 2), so an operator fixes them in one pass instead of one per start.
The supervisor runs each child in its own process group (a SuperExec's app processes are in that group
too), with an environment it builds itself, never the operator's PATH; a child that exits is started again
after a backoff that doubles up to a minute; SIGTERM or SIGINT stops every group and then the supervisor.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write_text, private_dir

BIN = Path(sys.executable).parent  # the installed edfed's own Flower commands, whatever PATH says
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# What a child keeps of the supervisor's environment: locale, temp folder, thread counts, the precision choice.
PASSED_ENV = ("HOME", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "EDFED_PRECISION", "TZ")
MAX_BACKOFF_S = 60.0
STABLE_S = 60.0  # a child that ran this long before exiting starts again after 1 s, not the doubled backoff


class Problems(list):
    """The problems found in one party's configuration; `raise_if_any` reports them all at once."""

    def raise_if_any(self, what: str, outcome: str = "nothing was started") -> None:
        if self:
            listed = "\n".join(f"  - {p}" for p in self)
            raise EdfedError(f"{what}: {len(self)} problem(s), {outcome}:\n{listed}")


def read_toml(path: Path, what: str) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise EdfedError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdfedError(f"{what} {path}: not valid TOML ({exc})") from None


def take(data: dict, key: str, kind: type | tuple, default: object, problems: Problems, where: str,
         required: bool = False) -> object:
    """`data[key]` if present and of `kind`; the default (and a problem when required or mistyped) otherwise."""
    if key not in data:
        if required:
            problems.append(f"{where}: `{key}` is missing (required)")
        return default
    value = data[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        problems.append(f"{where}: `{key}` must be a number, got {value!r}")
        return default
    if not isinstance(value, kind):
        problems.append(f"{where}: `{key}` must be {getattr(kind, '__name__', 'a number')}, got {value!r}")
        return default
    return value


def unknown_keys(data: dict, known: dict, problems: Problems, where: str) -> None:
    for key in data:
        if key not in known:
            problems.append(f"{where}: unknown key `{key}` (known: {', '.join(sorted(known))})")


# --- credentials -------------------------------------------------------------------------------------------


def private_file_problem(path: Path, what: str) -> str | None:
    """Why `path` is not a private key (or secret) this party may use: missing, or readable by others."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        return f"{what} {path}: cannot be read ({exc.strerror})"
    if mode & 0o077:
        return (f"{what} {path} is readable or writable by other users (mode {mode:04o}); a private key is "
                f"owner-only: chmod 600 {path}")
    if not os.access(path, os.R_OK):
        return f"{what} {path}: not readable by this user"
    return None


def load_certificate(path: Path, what: str, problems: Problems) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        problems.append(f"{what} {path}: cannot be read ({exc.strerror})")
    except ValueError:
        problems.append(f"{what} {path}: not a PEM certificate")
    return None


def certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*alt.get_values_for_type(x509.DNSName), *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))]


def has_name(cert: x509.Certificate, name: str) -> bool:
    """Whether TLS clients that dial `name` accept `cert` (subject alternative names, as browsers and gRPC check)."""
    try:
        wanted = ipaddress.ip_address(name)
        return any(str(wanted) == n for n in certificate_names(cert))
    except ValueError:
        return name.lower() in (n.lower() for n in certificate_names(cert))


def days_left(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def expiry_problem(cert: x509.Certificate, what: str, path: Path) -> str | None:
    if days_left(cert) <= 0:
        return f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > dt.datetime.now(dt.UTC):
        return f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)"
    return None


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends: not issued by it
        return False


def key_matches(cert: x509.Certificate, key_path: Path) -> bool:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return False
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    return (key.public_key().public_bytes(serialization.Encoding.PEM, public)
            == cert.public_key().public_bytes(serialization.Encoding.PEM, public))


def split_address(address: str, what: str, problems: Problems) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"{what} {address!r}: give host:port, e.g. fl.example-hospital.org:443")
        return None
    return host, int(port)


def tls_probe(host: str, port: int, ca: Path, timeout: float = 5.0) -> tuple[str, str, x509.Certificate | None]:
    """("ok" | "unreachable" | "refused-certificate", detail, the peer's certificate when the handshake got it).

    The handshake checks the peer's certificate against `ca` and `host` exactly as the SuperNode's TLS does."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
                return "ok", "TLS handshake verified", x509.load_der_x509_certificate(der) if der else None
    except ssl.SSLCertVerificationError as exc:
        return "refused-certificate", exc.verify_message or str(exc), _peer_certificate(host, port, timeout)
    except (OSError, ssl.SSLError) as exc:
        return "unreachable", str(exc) or type(exc).__name__, None


def _peer_certificate(host: str, port: int, timeout: float) -> x509.Certificate | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only to name what is wrong with it
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
                return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ssl.SSLError, ValueError):
        return None


def expiry_line(cert: x509.Certificate, what: str, warn_days: int) -> tuple[str, bool]:
    """A status line for a certificate's expiry, and whether it is a warning (within `warn_days`)."""
    left = days_left(cert)
    when = f"{cert.not_valid_after_utc:%Y-%m-%d}"
    if left <= 0:
        return f"{what}: EXPIRED on {when}", True
    if left <= warn_days:
        return f"{what}: WARNING expires on {when}, in {left:.0f} days: rotate it (docs/deployment.md)", True
    return f"{what}: valid until {when} ({left:.0f} days)", False


# --- the supervisor ----------------------------------------------------------------------------------------


@dataclass
class Child:
    """One supervised process: its command (absolute executable path), its environment, its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 1.0
    restart_at: float | None = None
    last_exit: int | None = None
    notes: list[str] = field(default_factory=list)


def _end_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so a crashed supervisor leaves no Flower process behind to block its restart."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: systemd's KillMode=mixed still stops the children with the unit


def child_env(flwr_home: Path, path_first: list[Path] | None = None) -> dict[str, str]:
    """A child's whole environment: PATH is edfed's own bin folder (after `path_first`) and the system's."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update({"PATH": os.pathsep.join([*(str(p) for p in path_first or []), str(BIN), SYSTEM_PATH]),
                "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    return env


class Supervisor:
    """Starts `children` in order, restarts any that exits (1 s, doubling to MAX_BACKOFF_S), and stops them
    all on SIGTERM/SIGINT. Writes STATE/status.json on every change, read by `status`."""

    def __init__(self, party: str, children: list[Child], state_dir: Path, say: Callable[[str], None] | None = None,
                 start_gap_s: float = 2.0) -> None:
        self.party, self.children, self.state_dir = party, children, Path(state_dir)
        self.say = say or (lambda line: print(line, flush=True))  # the journal gets each line as it happens
        self.logs = private_dir(self.state_dir / "logs")
        self.start_gap_s = start_gap_s
        self.stopping = False

    def _start(self, child: Child) -> None:
        fd = os.open(self.logs / f"{child.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            child.proc = subprocess.Popen(child.argv, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=child.env, cwd=self.state_dir, start_new_session=True, umask=0o077,
                                          preexec_fn=_end_with_parent)
        finally:
            os.close(fd)
        child.started, child.restart_at = time.monotonic(), None
        self.say(f"edfed {self.party}: started {child.name} (pid {child.proc.pid}; log {self.logs / child.name}.log)")

    def write_status(self) -> None:
        status = {"party": self.party, "supervisor-pid": os.getpid(), "stopping": self.stopping,
                  "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "children": {c.name: {"pid": c.proc.pid if c.proc and c.proc.poll() is None else None,
                                        "restarts": c.restarts, "last-exit": c.last_exit,
                                        "command": c.argv[0]} for c in self.children}}
        atomic_write_text(self.state_dir / "status.json", json.dumps(status, indent=1))

    def run(self, poll_s: float = 0.5) -> None:
        def stop(signum: int, _frame: object) -> None:
            self.stopping = True

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i, child in enumerate(self.children):
                if self.stopping:
                    break
                self._start(child)
                if i < len(self.children) - 1:
                    time.sleep(self.start_gap_s)  # the next one connects to this one
            self.write_status()
            while not self.stopping:
                self._tick()
                time.sleep(poll_s)
        finally:
            self.stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _tick(self) -> None:
        now, changed = time.monotonic(), False
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
                    changed = True
                continue
            code = child.proc.poll() if child.proc else None
            if code is None:
                continue
            ran = now - child.started
            child.backoff = 1.0 if ran >= STABLE_S else min(child.backoff * 2, MAX_BACKOFF_S)
            child.last_exit, child.restart_at = code, now + child.backoff
            self._kill_group(child, signal.SIGKILL)  # what it left behind (app processes) goes with it
            self.say(f"edfed {self.party}: {child.name} exited with {code} after {ran:.0f} s; starting it again in "
                     f"{child.backoff:.0f} s (its log: {self.logs / child.name}.log)")
            changed = True
        if changed:
            self.write_status()

    @staticmethod
    def _kill_group(child: Child, sig: int) -> None:
        if child.proc is None:
            return
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self, grace_s: float = 15.0) -> None:
        self.stopping = True
        running = [c for c in reversed(self.children) if c.proc is not None]
        for child in running:
            self._kill_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in running:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._kill_group(child, signal.SIGKILL)  # the group's stragglers, or the child itself
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.say(f"edfed {self.party}: stopped {', '.join(c.name for c in running) or 'nothing'}")
        try:
            self.write_status()
        except OSError:
            pass


def running_children(state_dir: Path) -> tuple[dict | None, list[str]]:
    """The last status.json of a supervisor and one line per child: running (pid) or not."""
    path = Path(state_dir) / "status.json"
    if not path.exists():
        return None, [f"no supervisor has run with state-dir {state_dir} (no status.json)"]
    status = json.loads(path.read_text())
    lines = []
    alive = _alive(status.get("supervisor-pid"))
    lines.append(f"supervisor: {'running' if alive and not status.get('stopping') else 'not running'} "
                 f"(pid {status.get('supervisor-pid')}, status of {status.get('updated')})")
    for name, child in status.get("children", {}).items():
        up = alive and _alive(child.get("pid"))
        lines.append(f"{name}: {'running, pid ' + str(child['pid']) if up else 'not running'}; "
                     f"restarts {child.get('restarts', 0)}"
                     + (f", last exit {child['last-exit']}" if child.get("last-exit") is not None else ""))
    return status, lines


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- systemd -----------------------------------------------------------------------------------------------


def systemd_unit(party: str, config: Path, user: str) -> str:
    """The unit that runs `edfed PARTY start --config CONFIG` as USER: restarted if the supervisor itself dies,
    stopped with SIGTERM (the supervisor stops its children), its state and logs owner-only."""
    edfed = BIN / "edfed"
    what = {"site": "a hospital's SuperNode and SuperExec", "coordinator": "the SuperLink, its SuperExec and nginx"}
    extra = ("# nginx listens on the public port (443): allow a non-root user to bind it.\n"
             "AmbientCapabilities=CAP_NET_BIND_SERVICE\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
             if party == "coordinator" else "CapabilityBoundingSet=\n")
    return (f"# Written by `edfed deploy units`: {what[party]}, supervised by `edfed {party} start`.\n"
            "[Unit]\n"
            f"Description=edfed {party} ({what[party]})\n"
            "Wants=network-online.target\nAfter=network-online.target\n\n"
            "[Service]\n"
            "Type=simple\n"
            f"User={user}\n"
            f"ExecStartPre={edfed} {party} check --config {config}\n"
            f"ExecStart={edfed} {party} start --config {config}\n"
            "KillMode=mixed\nKillSignal=SIGTERM\nTimeoutStopSec=60\n"
            "Restart=on-failure\nRestartSec=10\n"
            "# exit 2 is a configuration problem: restarting does not fix it.\n"
            "RestartPreventExitStatus=2\n"
            "UMask=0077\n"
            "NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=full\n"
            "# /proc with hidepid: other users cannot read the ClientApp's task token (docs/deployment.md).\n"
            "ProtectProc=invisible\nProtectKernelTunables=yes\nProtectControlGroups=yes\n"
            + extra + "\n"
            "[Install]\nWantedBy=multi-user.target\n")


def write_units(out: Path, site_config: Path | None, coordinator_config: Path | None, user: str) -> list[Path]:
    if site_config is None and coordinator_config is None:
        raise EdfedError("give --site-config or --coordinator-config (or both): the unit names the TOML it starts")
    if any(ch.isspace() for ch in user) or not user:
        raise EdfedError(f"--user {user!r}: give a user name without spaces")
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for party, config in (("site", site_config), ("coordinator", coordinator_config)):
        if config is None:
            continue
        config = config.expanduser().resolve()
        if any(ch.isspace() for ch in str(config)):
            raise EdfedError(f"{config}: choose a config path without spaces (it is written into a unit file)")
        written.append(atomic_write_text(out / f"edfed-{party}.service", systemd_unit(party, config, user), 0o644))
    return written
