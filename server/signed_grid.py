"""The grid as the coordinator uses it: every instruction signed, every reply checked (common.signing).

Run config `coordinator-key` (the coordinator's Ed25519 key, `edfed deploy coordinator-key`) signs every message
the ServerApp sends; `site-keys` (a folder of the registered sites' `ed-site-K.pub`) checks every reply: a reply
counts only if the key the SuperLink registered for its node is one of those files and signed it. Any other reply
is dropped, logged and listed in summary.json (`forged_replies`). Error replies carry no content and pass as
errors (a forger can make a site look absent, which it could by racing its reply anyway, but not answer for it).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid

from edfed.common.errors import EdfedError
from edfed.common.signing import (
    load_coordinator_key,
    load_site_public_keys,
    pem_public_key,
    reply_problem,
    round_of,
    sign_instruction,
)

VALIDITY_MARGIN = 120.0  # seconds an instruction stays valid beyond the coordinator's wait for its reply
UNTIMED_VALIDITY = 3600.0  # the validity of an instruction sent with no timeout


def _der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class SignedGrid:
    """Wraps a Flower grid: `send_and_receive` signs what leaves and keeps only the replies that verify."""

    def __init__(self, grid: Grid, key: ed25519.Ed25519PrivateKey | None,
                 site_keys: dict[str, ec.EllipticCurvePublicKey] | None) -> None:
        self._grid, self.key, self.site_keys = grid, key, site_keys
        self.forged: list[dict] = []  # dropped replies: node, registered site, message type, round, why

    @classmethod
    def from_run_config(cls, grid: Grid, run_config: dict, deployed: bool) -> SignedGrid:
        key_path, keys_dir = str(run_config.get("coordinator-key", "")), str(run_config.get("site-keys", ""))
        if deployed and not key_path:
            log(WARNING, "edfed: no coordinator-key in the run config: messages go unsigned, and a site with a "
                "coordinator key refuses them (docs/deployment.md, section 7)")
        if key_path and not keys_dir:
            raise EdfedError("run config: coordinator-key is set but site-keys is not; name the folder of the "
                             "registered sites' .pub files, so that no site can answer in another's name")
        return cls(grid, load_coordinator_key(Path(key_path)) if key_path else None,
                   load_site_public_keys(Path(keys_dir)) if keys_dir else None)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def _node_keys(self) -> dict[int, tuple[str, ec.EllipticCurvePublicKey]]:
        """Node -> (site key file, key): the key the SuperLink registered for the node, if it is in site-keys."""
        ours = {_der(key): (name, key) for name, key in (self.site_keys or {}).items()}
        found = {}
        for info in self._grid.get_nodes():
            registered = pem_public_key(bytes(getattr(info, "public_key", b"") or b""))
            if registered is not None and _der(registered) in ours:
                found[int(info.node_id)] = ours[_der(registered)]
        return found

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.key is not None:
            run_id = self._grid.run.run_id
            valid_for = (timeout if timeout is not None else UNTIMED_VALIDITY) + VALIDITY_MARGIN
            for msg in messages:
                sign_instruction(msg, run_id=run_id, key=self.key, valid_for=valid_for)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if self.site_keys is None:
            return replies
        sent = {msg.metadata.message_id: msg for msg in messages}  # ids set by the grid when it pushed them
        keys, kept = self._node_keys(), []
        for reply in replies:
            if reply.has_error() or reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                kept.append(reply)
                continue
            node = reply.metadata.src_node_id
            name, public = keys.get(node, ("", None))
            instruction = sent.get(reply.metadata.reply_to_message_id)
            why = reply_problem(reply, instruction, public)
            if why is None:
                kept.append(reply)
                continue
            kind = reply.metadata.message_type
            server_round = round_of(instruction.content) if instruction is not None else ""
            log(WARNING, "edfed: dropped a forged %s reply in the name of node %s (%s): %s", kind, node,
                name or "no registered key", why)
            self.forged.append({"node": node, "site-key": name, "message_type": kind, "round": server_round,
                                "why": why})
        return kept
