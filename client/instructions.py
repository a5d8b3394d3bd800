"""Which messages this site obeys, and the signature on what it answers (common.signing holds the format).

A deployed site (its node config has `data-path`) runs an instruction only if the coordinator's key signed it
for this node, this run, this round and this content, within its validity window, and only once: before the
arrays are read or the ledger is touched. The coordinator's public key comes from the site itself: its node
config (`coordinator-key`) or the trust file its site runner checks releases with (`coordinator-keys`, found
through EDFED_TRUST_FILE, which edfed-clientapp sets). Without one the site refuses everything, unless its node
config says `unsigned-messages=true` (tests and trials only). Its replies are signed with its SuperNode key
(`site-key`). A simulated site (node config `partition-id`) checks signatures only when given a key.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from filelock import FileLock
from flwr.app import Message
from flwr.common.logger import log

from edfed.common.errors import EdfedError
from edfed.common.files import FILE_MODE, atomic_write_text
from edfed.common.signing import (
    CLOCK_SKEW,
    coordinator_public_key,
    key_id,
    load_site_key,
    sign_reply,
    verify_instruction,
)

TRUST_ENV = "EDFED_TRUST_FILE"  # set by edfed-clientapp to the trust file it verified this run's release with


@dataclass(frozen=True)
class Guard:
    keys: dict[str, ed25519.Ed25519PublicKey]  # the coordinator's; empty: unsigned instructions are accepted
    site_key: ec.EllipticCurvePrivateKey | None  # signs the replies; None: replies go unsigned
    seen_path: Path | None  # the instructions already run (nonce -> expiry), to refuse a replay

    def accept(self, msg: Message, node_id: int) -> None:
        """Raise EdfedError unless this site may run `msg`; records its nonce so it runs only once."""
        if not self.keys:
            return
        signed = verify_instruction(msg, node_id, self.keys)
        if self.seen_path is not None:
            _remember_once(self.seen_path, signed.nonce, signed.expires)

    def sign(self, reply: Message, msg: Message, node_id: int) -> Message:
        return sign_reply(reply, msg, node_id=node_id, key=self.site_key) if self.site_key is not None else reply


def _trust_file_keys(path: Path) -> list[str]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EdfedError(f"trust file {path} ({TRUST_ENV}): cannot be read ({exc})") from None
    keys = data.get("coordinator-keys", [])
    if not isinstance(keys, list):
        raise EdfedError(f"trust file {path}: `coordinator-keys` must be a list of \"ssh-ed25519 …\" lines")
    return [str(k) for k in keys]


def _flag(node_config: dict, key: str) -> bool:
    return str(node_config.get(key, "false")).strip().lower() in ("true", "1", "yes")


def _configured_keys(node_config: dict) -> tuple[dict[str, ed25519.Ed25519PublicKey],
                                                  ec.EllipticCurvePrivateKey | None]:
    """The coordinator's public keys (node config `coordinator-key`, trust file `coordinator-keys`) and the site's
    own SuperNode key (`site-key`)."""
    texts: list[tuple[str, str]] = []
    if node_config.get("coordinator-key"):
        path = Path(str(node_config["coordinator-key"]))
        try:
            texts += [(f"node config coordinator-key {path}", line) for line in path.read_text().splitlines()
                      if line.strip()]
        except OSError as exc:
            raise EdfedError(f"node config coordinator-key {path}: cannot be read ({exc.strerror})") from None
    if os.environ.get(TRUST_ENV):
        trust = Path(os.environ[TRUST_ENV])
        texts += [(f"trust file {trust}", line) for line in _trust_file_keys(trust)]
    keys = {key_id(k): k for k in (coordinator_public_key(text, where) for where, text in texts)}
    site_key = load_site_key(Path(str(node_config["site-key"]))) if node_config.get("site-key") else None
    return keys, site_key


def guard_for(node_config: dict) -> Guard:
    """This site's policy, from its node config (and its site runner's trust file)."""
    try:
        keys, site_key = _configured_keys(node_config)
    except EdfedError as exc:  # the site's log names its files; the coordinator hears no path
        raise EdfedError(str(exc), offsite="this site refuses every message until its signing settings are fixed "
                         "(coordinator-key, site-key or trust file; its own log says which)") from None
    deployed = "data-path" in node_config
    if deployed and not _flag(node_config, "unsigned-messages"):
        if not keys:
            raise EdfedError("this site has no coordinator key, so it cannot tell the coordinator's instructions "
                             "from anyone else's: add coordinator-key=\"/etc/edfed/site/coordinator.pub\" to its node "
                             "config (the coordinator.pub of `edfed deploy coordinator-key`; check its key id by "
                             "phone), or give `edfed deploy site-runner` --coordinator-key; refusing every message")
        if site_key is None:
            raise EdfedError("this site has no site-key to sign its replies with, so the coordinator would drop them: "
                             "add site-key=\"/etc/edfed/site/ed-site-K.key\" (the key its SuperNode authenticates "
                             "with) to its node config; refusing every message")
    elif deployed and not keys:
        log(WARNING, "edfed: this site obeys unsigned messages (unsigned-messages=true in its node config): any "
            "registered node can make it train or evaluate")
    seen = None
    if deployed and keys:
        data_path = Path(str(node_config["data-path"]))
        name = node_config.get("site-name", data_path.stem)
        ledger = Path(str(node_config.get("ledger-path", data_path.parent / f"{name}.privacy-ledger.json")))
        seen = ledger.with_name(ledger.name + ".instructions")  # beside the ledger, which it never touches
    return Guard(keys=keys, site_key=site_key, seen_path=seen)


def _remember_once(path: Path, nonce: str, expires: float) -> None:
    """Record `nonce` until its instruction expires; refuse it if it is there already (a replay)."""
    with FileLock(f"{path}.lock", mode=FILE_MODE):
        try:
            seen = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as exc:
            raise EdfedError(f"{path} (the instructions this site ran) cannot be read: {exc}") from None
        if nonce in seen:
            raise EdfedError("refused an instruction this site has already run (the same signed message again: "
                             "a replay)")
        now = time.time()
        seen = {n: t for n, t in seen.items() if float(t) + CLOCK_SKEW >= now}  # expired ones are refused anyway
        seen[nonce] = expires
        atomic_write_text(path, json.dumps(seen))
