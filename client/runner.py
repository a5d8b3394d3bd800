"""`edfed-clientapp`: the hospital's own stand-in for Flower's `flwr-clientapp`.

The site's SuperExec (Flower's, in process isolation, with an auth secret) finds this through the shims
`edfed deploy site-runner` writes (client.release.write_site_runner) ahead of Flower's commands on its
PATH. It runs Flower's ClientApp process unchanged, except that the FAB is checked right after it is pulled
from the SuperNode and before anything from it is installed or imported: its sha256 must be signed, in the
run config's `release-signature`, by a key in the site's trust file, at no less than the trust file's
min-version. Otherwise the site answers with an error reply and nothing from the FAB is written or imported.
`--refuse NAME` stands in for every other task type (agent, model, connector apps): it refuses the task.

Relies on Flower 1.42.0 internals (flwr is pinned exactly in pyproject.toml, and checked in main()): in
flwr/supernode/runtime/run_clientapp.py, `run_clientapp` looks up the module-level `pull_task_input` at call
time (line 151) and only then calls `install_from_fab` (line 155) and loads the app (line 188); this module
replaces those two names there. `push_message` / `push_task_output` of that module send the refusals.

Flower's SuperExec starts every task process with its one-time task token on the command line (`--token`,
flwr/supercore/superexec/executor/subprocess_executor.py); no option of its subprocess executor passes it
otherwise. Any local user who can read /proc/PID/cmdline can then use the token on the SuperNode's loopback
Runtime API. So at every start the runner checks that /proc hides other users' processes (`hidepid=2`) and warns
in the site's log when it does not (docs/deployment.md, section 7, says what such a user can and cannot do).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
from logging import ERROR, INFO, WARNING
from pathlib import Path

FLOWER_VERSION = "1.42.0"  # the run_clientapp layout below was read in this version
_EDFED_PACKAGES = ("edfed",)
_NO_DEPENDENCY_INSTALL = "--allow-runtime-dependency-installation"


def _flower_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours = argparse.ArgumentParser(prog="edfed-clientapp", add_help=False)
    mode = ours.add_mutually_exclusive_group(required=True)
    mode.add_argument("--trust", type=Path, help="the site's trust file (edfed deploy site-runner)")
    mode.add_argument("--refuse", metavar="TASK", help="refuse this task type (agent, model, connector apps)")
    args, rest = ours.parse_known_args(argv)
    # The site installs edfed's dependencies itself; nothing a FAB asks for is installed at run time.
    return args, [a for a in rest if a != _NO_DEPENDENCY_INSTALL]


def proc_hides_processes(mountinfo: str | None = None) -> bool:
    """Whether /proc is mounted so that a user cannot read other users' /proc/PID/cmdline (hidepid=1 or 2)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return False
    hidden = False
    for line in mountinfo.splitlines():  # the last mount on /proc is the one processes see
        fields = line.split()
        if len(fields) < 5 or fields[4] != "/proc" or " - proc " not in line:
            continue
        options = line.split(" - proc ", 1)[1].split()[-1].split(",")  # the superblock's options
        hidden = any(o in ("hidepid=1", "hidepid=2", "hidepid=noaccess", "hidepid=invisible") for o in options)
    return hidden


TOKEN_WARNING = ("edfed: /proc on this host is not mounted with hidepid=2, so every local user can read this "
                 "ClientApp's one-time task token on its command line and use it on the SuperNode's Runtime API (to "
                 "read this task's input: the global model, the run config and the node config's paths, no data). "
                 "Run the site under its own user and mount /proc with hidepid=2 (docs/deployment.md, sections 1 "
                 "and 7)")


def _install_guard(install_from_fab, verified: set[str]):
    """Flower's installer, for a FAB whose sha256 the check passed in this process only."""

    def install(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        if hashlib.sha256(content).hexdigest() not in verified:
            raise RuntimeError("edfed: refusing to install a FAB that was not verified in this process")
        return install_from_fab(fab_file, *args, **kwargs)

    return install


def run_verified_clientapp(trust_path: Path, flower_argv: list[str]) -> None:
    """Flower's `flwr-clientapp`, with the release check between pulling the FAB and installing it."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log

    from edfed.client.release import SIGNATURE_KEY, load_trust, verify_release
    from edfed.common.errors import EdfedError

    # The modules themselves (their packages re-export same-named functions).
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    flower_pull, verified = runtime.pull_task_input, set()

    def pull_and_verify(client):
        message, context, run, fab = flower_pull(client)
        try:
            release = verify_release(fab.content, str(context.run_config.get(SIGNATURE_KEY, "")),
                                     load_trust(trust_path))
        except EdfedError as exc:
            reason = f"edfed: this site runs only signed edfed releases; refused run {run.run_id}: {exc}"
            log(ERROR, "%s", reason)
            # Our own error reply; raising then leaves run_clientapp with no message, so it pushes only
            # the task's FAILED status and installs, imports and writes nothing.
            runtime.push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason),
                                                 reply_to=message), context)
            raise RuntimeError(reason) from None
        log(INFO, "edfed: run %s is the signed release edfed %s (sha256 %s, key %s)", run.run_id,
            release.version, release.sha256[:12], release.key_id)
        verified.add(release.sha256)
        # The FAB's own copy of edfed must be what runs, not this runner's: forget edfed's modules so that
        # Flower's loader imports them from the installed FAB folder it puts first on sys.path.
        for name in [m for m in sys.modules if m.split(".")[0] in _EDFED_PACKAGES]:
            del sys.modules[name]
        return message, context, run, fab

    runtime.pull_task_input = pull_and_verify
    runtime.install_from_fab = _install_guard(runtime.install_from_fab, verified)
    # The ClientApp reads the coordinator's public key from the same trust file (client.instructions).
    os.environ["EDFED_TRUST_FILE"] = str(trust_path.expanduser().resolve())
    if not proc_hides_processes():
        log(WARNING, "%s", TOKEN_WARNING)
    if runtime.run_clientapp.__globals__.get("pull_task_input") is not pull_and_verify:
        raise SystemExit("edfed-clientapp: could not place the release check in Flower's ClientApp runtime")
    sys.argv = ["flwr-clientapp", *flower_argv]
    cli.flwr_clientapp()


def refuse_task(task: str, flower_argv: list[str]) -> None:
    """Finish a task this site never runs (agent, model, connector, server apps) as FAILED, with an error
    reply where the task holds the SuperNode's message, so the SuperNode does not wait for it."""
    from flwr.app import Error, Message
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    parser = argparse.ArgumentParser(prog=task)
    parser.add_argument("--runtime-api-address", required=True)
    add_args_flwr_app_common(parser)
    args = parser.parse_args(flower_argv)
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=args.insecure,
        root_certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(try_obtain_flwr_app_token(args))],
        retry_invoker=make_simple_http_retry_invoker())
    reason = f"edfed: this site runs only the ClientApp of a signed edfed release; {task} tasks are refused"
    log(WARNING, "%s", reason)
    try:
        if task == "flwr-agentapp":  # the SuperNode made this task for a message it waits to answer
            message, context, _, _ = runtime.pull_task_input(client)
            runtime.push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason),
                                                 reply_to=message), context)
    finally:
        runtime.push_task_output(client, None, SubStatus.FAILED, reason)
        client.close()
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args, flower_argv = _flower_args(list(sys.argv[1:] if argv is None else argv))
    from flwr.supercore.version import package_version

    if package_version != FLOWER_VERSION:
        raise SystemExit(f"edfed-clientapp: written for flwr {FLOWER_VERSION}, found {package_version}; "
                         "refusing to run anything (reinstall edfed, which pins flwr)")
    if args.refuse:
        refuse_task(args.refuse, flower_argv)
    run_verified_clientapp(args.trust, flower_argv)


if __name__ == "__main__":
    main()
