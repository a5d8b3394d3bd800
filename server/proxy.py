"""The coordinator's public face: an nginx config that forwards only the Fleet API to the SuperLink.

In Flower 1.42 one HTTP app on the SuperLink's --host/--port serves the Fleet API (SuperNodes), the
Control API (`flwr run/ls/log/stop`, node registration: /v1/control/*), the Runtime API the ServerApp
and SuperExec use (/v1/runtime/*), /health and the API docs (/docs, /openapi.json)
(flwr/superlink/main.py:create_app). The SuperLink therefore listens on loopback only, and nginx, on the
public port, terminates TLS and passes on exactly the Fleet routes, POST only; every other path is 403.
"""

from __future__ import annotations

from pathlib import Path

from edfed.common.errors import EdfedError
from edfed.common.files import SHARED_FILE_MODE, atomic_write_text

# flwr/superlink/routers/fleet/router.py (prefix /v1/fleet), as Flower's SuperNode calls them
# (flwr/supernode/fleet_http_client.py); tests/test_perimeter.py checks this against the installed flwr.
FLEET_PATHS = (
    "/v1/fleet/register-node", "/v1/fleet/activate-node", "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node", "/v1/fleet/send-node-heartbeat", "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages", "/v1/fleet/get-run", "/v1/fleet/get-fab", "/v1/fleet/push-object",
    "/v1/fleet/pull-object", "/v1/fleet/confirm-message-received",
)


def _location(path: str) -> str:
    # An exact-match location whose proxy_pass names the same path: the SuperLink only ever receives one of
    # these twelve URIs, whatever encoding or dot segments the client used to match it.
    return (f"    location = {path} {{\n        limit_except POST {{ deny all; }}\n"
            f"        proxy_pass https://edfed_superlink{path};\n    }}\n")


def server_block(listen: str, cert: Path, key: Path, ca: Path, superlink: str, upstream_name: str) -> str:
    """The `server {}` (plus its upstream) to include in nginx's http {} context, e.g. /etc/nginx/conf.d/."""
    return (
        "# Written by `edfed deploy proxy-config`: the public port of the edfed coordinator.\n"
        "# Only the Fleet API (what a hospital's SuperNode calls) is forwarded; Control and Runtime APIs, /health\n"
        "# and the API docs answer 403 here and are reachable only on the coordinator host itself.\n"
        f"upstream edfed_superlink {{\n    server {superlink};\n    keepalive 16;\n}}\n\n"
        "server {\n"
        f"    listen {listen} ssl;\n"
        f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
        "    ssl_protocols TLSv1.2 TLSv1.3;\n"
        "    server_tokens off;\n"
        "    client_max_body_size 64m;        # a FAB is at most 10 MB; model updates are far smaller\n"
        "    proxy_request_buffering off;\n    proxy_buffering off;\n"
        "    proxy_read_timeout 600s;\n    proxy_send_timeout 600s;\n"
        "    proxy_http_version 1.1;\n    proxy_set_header Connection \"\";\n"
        "    # The SuperLink keeps its own TLS (SuperNode authentication requires it); nginx checks its certificate.\n"
        f"    proxy_ssl_trusted_certificate {ca};\n    proxy_ssl_verify on;\n"
        f"    proxy_ssl_name {upstream_name};\n    proxy_ssl_server_name on;\n\n"
        + "".join(_location(p) for p in FLEET_PATHS)
        + "\n    location / {\n        default_type text/plain;\n"
        "        return 403 \"edfed coordinator: only the Fleet API is served on this port\\n\";\n    }\n}\n")


def standalone_config(out: Path, include: Path) -> str:
    """A whole nginx.conf around the server block (own pid, logs and temp folders in OUT): the rehearsal
    and the tests run it with `nginx -c OUT/nginx.conf`; a production host includes the block instead."""
    return (
        "# Written by `edfed deploy proxy-config`: a self-contained nginx for the rehearsal and the tests.\n"
        "daemon off;                 # runs in the foreground of the shell or test that started it\n"
        "master_process off;         # one process, as the user who started it (rehearsal only)\n"
        f"pid {out / 'nginx.pid'};\n"
        f"error_log {out / 'error.log'} warn;\n"
        "events {\n    worker_connections 256;\n}\n"
        "http {\n"
        f"    access_log {out / 'access.log'};\n"
        + "".join(f"    {kind}_temp_path {out / 'tmp' / kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"    include {include};\n}}\n")


def write_proxy_config(out: Path, listen: str, cert: Path, key: Path, ca: Path, superlink: str,
                       upstream_name: str = "localhost") -> tuple[Path, Path]:
    """OUT/edfed-fleet.conf (the server block) and OUT/nginx.conf (standalone, including it)."""
    host, _, port = superlink.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit():
        raise EdfedError(f"--superlink {superlink}: give the SuperLink's loopback address, e.g. 127.0.0.1:9091 "
                         "(it must not listen on a public interface)")
    for what, path in (("--ssl-certfile", cert), ("--ssl-keyfile", key), ("--ssl-ca-certfile", ca)):
        if not path.is_file():
            raise EdfedError(f"{what} {path}: no such file")
    from edfed.common.supervisor import Problems, certificate_names, has_name, load_certificate

    problems = Problems()
    found = load_certificate(cert, "--ssl-certfile", problems)
    problems.raise_if_any("proxy-config", "nothing was written")
    if not has_name(found, upstream_name):  # else nginx answers every SuperNode with 502 Bad Gateway
        raise EdfedError(f"{cert} does not hold the name {upstream_name!r} nginx will check (--upstream-name); it "
                         f"holds {', '.join(certificate_names(found)) or 'none'}: issue it with `edfed deploy init`, "
                         "which always adds localhost and 127.0.0.1")
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (out / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    block, main = out / "edfed-fleet.conf", out / "nginx.conf"
    for path, text in ((block, server_block(listen, cert.resolve(), key.resolve(), ca.resolve(), superlink,
                                            upstream_name)),
                       (main, standalone_config(out, block))):
        atomic_write_text(path, text, SHARED_FILE_MODE)  # nginx may read it as another user (root)
    return block, main
