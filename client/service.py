"""`edfed site start|check|status --config site.toml`: a hospital's SuperNode and SuperExec as one service.

The site's whole configuration is checked first (certificates and the coordinator's name, key permissions,
the trust file and the consortium key the site checked by phone, the ledger, the budget, the table against
the data contract); then the supervisor (common.supervisor) starts the SuperNode (node authentication,
process isolation, node config from a file the supervisor writes) and the site's SuperExec, whose PATH the
supervisor builds: the runner shims it has just written from the trust file, then edfed's own bin folder.
So the ClientApp runs as `edfed-clientapp` whatever the operator's PATH holds.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write_text, private_dir
from edfed.common.supervisor import (
    BIN,
    Child,
    Problems,
    Supervisor,
    child_env,
    expiry_line,
    expiry_problem,
    has_name,
    load_certificate,
    private_file_problem,
    read_toml,
    running_children,
    split_address,
    take,
    tls_probe,
    unknown_keys,
)

# Every key of site.toml: (default, meaning). docs/deployment.md documents each (a test checks it names them).
SITE_KEYS: dict[str, tuple[object, str]] = {
    "name": (None, "required: the site's name in the federation (node config site-name)"),
    "coordinator": (None, "required: host:port of the coordinator's public port, the name its certificate holds"),
    "ca": (None, "required: the coordinator's ca.crt"),
    "key": (None, "required: the SuperNode key of `edfed deploy site-key` (owner-only); also signs replies"),
    "trust": (None, "required: the trust file of `edfed deploy site-runner`"),
    "consortium-key-id": (None, "required: the consortium key id checked by phone; the trust file must hold it"),
    "state-dir": ("/var/lib/edfed/site", "SuperExec secret, runner shims, node config, logs, status"),
    "runtime-port": (9301, "the SuperNode's loopback Runtime API port (its SuperExec connects there)"),
    "expiry-warning-days": (30, "status warns when a certificate expires within this many days"),
    "node-config": ({}, "table: the site's node config (data-path, epsilon, delta, declared-patients, ...)"),
}
# Node config keys the supervisor sets itself from the keys above.
SET_BY_SUPERVISOR = {"site-name": "name", "site-key": "key"}


@dataclass(frozen=True)
class SiteService:
    name: str
    coordinator: str
    ca: Path
    key: Path
    trust: Path
    consortium_key_id: str
    state_dir: Path
    runtime_port: int
    warn_days: int
    node_config: dict


def load_site_config(path: Path) -> tuple[SiteService, Problems]:
    """site.toml read and every key type-checked; the problems found so far (more come from `check_site`)."""
    data, problems, where = read_toml(path, "site config"), Problems(), str(path)
    unknown_keys(data, SITE_KEYS, problems, where)

    def get(key: str, kind: type | tuple = str) -> object:
        default, meaning = SITE_KEYS[key]
        return take(data, key, kind, default, problems, where, required=meaning.startswith("required"))

    node = get("node-config", dict) or {}
    for key, ours in SET_BY_SUPERVISOR.items():
        if key in node:
            problems.append(f"{where}: [node-config] `{key}` is set from `{ours}`; remove it")
    service = SiteService(
        name=str(get("name") or ""), coordinator=str(get("coordinator") or ""), ca=Path(str(get("ca") or "")),
        key=Path(str(get("key") or "")), trust=Path(str(get("trust") or "")),
        consortium_key_id=str(get("consortium-key-id") or ""), state_dir=Path(str(get("state-dir"))),
        runtime_port=int(get("runtime-port", int)), warn_days=int(get("expiry-warning-days", int)),
        node_config={**node, "site-name": str(data.get("name", "")), "site-key": str(data.get("key", ""))})
    return service, problems


def _budget_problems(node: dict, where: str) -> list[str]:
    found = []
    for key in ("epsilon", "delta", "declared-patients", "ledger-path", "data-path"):
        if key not in node:
            found.append(f"{where}: [node-config] `{key}` is missing (required: "
                         + {"epsilon": "the site's own privacy budget; `inf` only with the privacy officer",
                            "delta": "the site's own delta, e.g. 1e-5",
                            "declared-patients": "the public size the site declares",
                            "ledger-path": "the ledger `edfed ledger init` made",
                            "data-path": "the site table"}[key] + ")")
    for key in ("epsilon", "delta", "declared-patients"):
        if key in node:
            try:
                value = float(node[key])
                if not value > 0 or (key != "epsilon" and math.isinf(value)) or (key == "delta" and value >= 1):
                    raise ValueError
            except (TypeError, ValueError):
                found.append(f"{where}: [node-config] `{key}` = {node[key]!r} is not a valid value")
    return found


def check_site(service: SiteService, problems: Problems, where: str, check_data: bool = True) -> Problems:
    """Every check the site can make before it starts: appends to `problems` and returns it."""
    from edfed.client.release import load_trust

    node = service.node_config
    problems.extend(_budget_problems(node, where))
    if service.key.parts:
        problem = private_file_problem(service.key, "SuperNode key (`key`)")
        if problem:
            problems.append(problem)
        else:
            try:
                from edfed.common.signing import load_site_key

                load_site_key(service.key)
            except EdfedError as exc:
                problems.append(str(exc))
    if service.trust.parts:
        try:
            trust = load_trust(service.trust)
            if service.consortium_key_id and service.consortium_key_id not in trust.keys:
                problems.append(f"trust file {service.trust} does not hold the consortium key "
                                f"{service.consortium_key_id} this site checked (`consortium-key-id`); it holds "
                                f"{', '.join(trust.keys)}: an untrusted consortium key; rewrite it with "
                                "`edfed deploy site-runner --consortium-key consortium.pub`")
        except EdfedError as exc:
            problems.append(str(exc))
        if not node.get("coordinator-key") and not _trust_has_coordinator(service.trust):
            problems.append(f"trust file {service.trust} lists no `coordinator-keys` and [node-config] has no "
                            "`coordinator-key`: the site could not tell the coordinator's instructions from anyone's")
    if "ledger-path" in node:
        from edfed.common.privacy import PrivacyLedger

        try:
            PrivacyLedger.open(Path(str(node["ledger-path"])))
        except EdfedError as exc:
            problems.append(str(exc).split(";")[0] + " (create it once with `edfed ledger init`)")
    if node.get("coordinator-key"):
        from edfed.common.signing import coordinator_public_key

        try:
            coordinator_public_key(Path(str(node["coordinator-key"])).read_text().strip(), "coordinator-key")
        except (OSError, EdfedError) as exc:
            problems.append(f"[node-config] coordinator-key {node['coordinator-key']}: {exc}")
    if node.get("model-path") and not Path(str(node["model-path"])).is_dir():
        problems.append(f"[node-config] model-path {node['model-path']}: no such folder")
    for key in node:
        if isinstance(node[key], dict | list):
            problems.append(f"{where}: [node-config] `{key}` must be a string, number or true/false")
    if check_data and "data-path" in node:
        from edfed.common.contract import load_site

        try:  # the contract's own messages: files, columns, rules, row numbers; no cell value
            load_site(Path(str(node["data-path"])), mapping=node.get("mapping") or None)
        except EdfedError as exc:
            problems.append(f"site table: {exc.offsite}")
    _check_coordinator_name(service, problems)
    return problems


def _trust_has_coordinator(trust: Path) -> bool:
    import tomllib

    try:
        return bool(tomllib.loads(trust.read_text()).get("coordinator-keys"))
    except (OSError, tomllib.TOMLDecodeError):
        return False


def _check_coordinator_name(service: SiteService, problems: Problems) -> None:
    """The CA is a valid certificate; and where the coordinator answers, its certificate holds the name the site
    dials and is issued by that CA (as the SuperNode's TLS will check). Unreachable is not a problem here: the
    SuperNode keeps retrying, and `status` reports it."""
    if not service.ca.parts:
        return
    ca = load_certificate(service.ca, "coordinator CA (`ca`)", problems)
    if ca is not None and (problem := expiry_problem(ca, "coordinator CA (`ca`)", service.ca)):
        problems.append(problem)
    address = split_address(service.coordinator, "`coordinator`", problems) if service.coordinator else None
    if ca is None or address is None:
        return
    outcome, detail, cert = tls_probe(*address, service.ca)
    if outcome == "refused-certificate":
        names = ""
        if cert is not None:
            from edfed.common.supervisor import certificate_names

            names = f"; it names {', '.join(certificate_names(cert)) or 'nothing'}"
            if not has_name(cert, address[0]):
                detail = f"its certificate does not hold the name {address[0]} this site dials"
        problems.append(f"coordinator {service.coordinator}: {detail}{names} (a certificate without the "
                        "coordinator's name, or not issued by `ca`)")


def _node_config_toml(node: dict) -> str:
    import json

    lines = []
    for key, value in node.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f'{key} = "inf"' if isinstance(value, float) and math.isinf(value) else f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")  # a TOML basic string
    return "# Written by `edfed site start` from site.toml at every start; do not edit.\n" + "\n".join(lines) + "\n"


def site_children(service: SiteService) -> list[Child]:
    """The SuperNode and its SuperExec, with the files they need written into the state folder."""
    from edfed.client.release import write_runner_shims
    from edfed.common.credentials import superexec_secret

    state = private_dir(service.state_dir.expanduser().resolve())
    secret = state / "superexec.secret"
    if not secret.exists():
        superexec_secret(secret)
    shims = write_runner_shims(state / "runner" / "bin", service.trust)
    node_file = atomic_write_text(state / "node-config.toml", _node_config_toml(service.node_config))
    flwr_home = private_dir(state / "flwr_home")
    env = child_env(flwr_home)
    superexec_env = child_env(flwr_home, path_first=[shims[0].parent])
    found = shutil.which("flwr-clientapp", path=superexec_env["PATH"])
    if found is None or Path(found) != shims[0]:  # by construction; a failure here is a bug, not a setting
        raise EdfedError(f"the site's SuperExec would run {found}, not the runner shim {shims[0]}; nothing started")
    supernode = [str(BIN / "flower-supernode"), "--superlink", service.coordinator, "--root-certificates",
                 str(service.ca.resolve()), "--auth-supernode-private-key", str(service.key.resolve()),
                 "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                 "--port", str(service.runtime_port), "--node-config", str(node_file)]
    superexec = [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{service.runtime_port}",
                 "--insecure", "--superexec-auth-secret-file", str(secret)]
    return [Child("supernode", supernode, env), Child("superexec", superexec, superexec_env)]


def site_check(config: Path, check_data: bool = True) -> SiteService:
    service, problems = load_site_config(config)
    check_site(service, problems, str(config), check_data=check_data)
    problems.raise_if_any(f"site config {config}")
    return service


def site_start(config: Path) -> None:
    service = site_check(config)
    Supervisor("site", site_children(service), service.state_dir.expanduser().resolve()).run()


def site_status(config: Path) -> tuple[list[str], bool]:
    """Lines for `edfed site status`, and whether all is well (running, coordinator reachable, nothing expiring)."""
    service, problems = load_site_config(config)
    problems.raise_if_any(f"site config {config}")
    status, lines = running_children(service.state_dir.expanduser().resolve())
    healthy = status is not None and all("not running" not in line for line in lines)
    probe = Problems()
    address = split_address(service.coordinator, "`coordinator`", probe)
    if address:
        outcome, detail, cert = tls_probe(*address, service.ca)
        lines.append(f"coordinator {service.coordinator}: {'reachable, ' + detail if outcome == 'ok' else outcome}"
                     + ("" if outcome == "ok" else f" ({detail})"))
        healthy &= outcome == "ok"
        if cert is not None:
            line, warn = expiry_line(cert, "coordinator certificate", service.warn_days)
            lines.append(line)
            healthy &= not warn
    ca = load_certificate(service.ca, "coordinator CA", probe)
    if ca is not None:
        line, warn = expiry_line(ca, f"coordinator CA {service.ca}", service.warn_days)
        lines.append(line)
        healthy &= not warn
    lines += probe
    return lines, healthy and not probe
