"""Signed instructions and replies: only the coordinator can instruct a site, only a site can answer for itself.

Flower 1.42 lets any registered node push a message that the SuperLink stores as an instruction (its
`src_node_id` is whatever the sender wrote), and a reply in another node's name. So every message edfed's
ServerApp sends carries an *instruction envelope*: an Ed25519 signature by the coordinator's key over the
Flower run id, the destination node, the message type, the round, a validity window, a one-time nonce and the
digest of the content (arrays and config). A site verifies it before it reads anything else. Every reply a site
sends carries a *reply envelope*: an ECDSA signature by the site's own SuperNode key (the EC P-384 key it
registered with `flwr supernode register`) over the run, its node, the round, the type, the id of the
instruction it answers and the digest of the reply's content; the coordinator checks it with the public key
registered for that node. Made with `cryptography` (no hand-rolled crypto).

The envelope travels as one ConfigRecord (`ENVELOPE`) inside the message's content, since Flower's metadata has
no field for it; the digest covers every other record of the content.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from edfed.common.errors import EdfedError

INSTRUCTION_FORMAT = "edfed-instruction-v1"
REPLY_FORMAT = "edfed-reply-v1"
ENVELOPE = "edfed-signature"  # the content record that holds a message's signature
# How far the coordinator's and a site's clocks may disagree; an instruction is valid from `issued` to `expires`
# (the coordinator's wait for replies plus a margin), widened by this much at each end.
CLOCK_SKEW = 300.0


@dataclass(frozen=True)
class Instruction:
    """What a valid instruction envelope vouches for (the site keeps `nonce` until `expires` to refuse replays)."""

    key_id: str
    nonce: str
    expires: float


def _field(*parts: object) -> bytes:
    """Length-prefixed parts, so no two different field lists hash alike."""
    out = b""
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out += len(data).to_bytes(8, "big") + data
    return out


def _json_value(value: object) -> object:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    raise TypeError(f"{type(value).__name__} is not a Flower record value")


def content_digest(content: RecordDict) -> str:
    """sha256 over every record of a message's content but the envelope: array names, dtypes, shapes and bytes;
    config and metric items (typed, in sorted order)."""
    digest = hashlib.sha256()
    for name in sorted(content.keys()):
        if name == ENVELOPE:
            continue
        record = content[name]
        if isinstance(record, ArrayRecord):
            digest.update(_field("arrays", name))
            for key in sorted(record.keys()):
                array = record[key]
                digest.update(_field(key, array.dtype, array.stype, tuple(array.shape),
                                     hashlib.sha256(array.data).digest()))
        elif isinstance(record, ConfigRecord | MetricRecord):
            kind = "config" if isinstance(record, ConfigRecord) else "metrics"
            items = json.dumps(dict(record.items()), sort_keys=True, default=_json_value)
            digest.update(_field(kind, name, items))
        else:
            raise EdfedError(f"message record {name!r} is a {type(record).__name__}, which edfed does not sign")
    return digest.hexdigest()


def round_of(content: RecordDict) -> str:
    """The round an instruction is for (its config's `server-round`; "" for the check before round 1)."""
    if "config" in content and isinstance(content["config"], ConfigRecord):
        return str(content["config"].get("server-round", ""))
    return ""


def key_id(public: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of the sha256 of its DER form."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


# --- instructions: signed by the coordinator, verified by the site ------------------------------------------


def _instruction_bytes(fields: dict[str, str], digest: str) -> bytes:
    return INSTRUCTION_FORMAT.encode() + _field(fields["run"], fields["dst"], fields["type"], fields["round"],
                                                fields["issued"], fields["expires"], fields["nonce"], digest)


def sign_instruction(msg: Message, *, run_id: int, key: ed25519.Ed25519PrivateKey, valid_for: float,
                     now: float | None = None) -> Message:
    """Add the coordinator's envelope to `msg` (in place; it is also returned).

    The content becomes a RecordDict of its own: Flower's strategies give every site's message the same one.
    """
    issued = time.time() if now is None else now
    content = RecordDict({name: record for name, record in msg.content.items() if name != ENVELOPE})
    fields = {"run": str(run_id), "dst": str(msg.metadata.dst_node_id), "type": msg.metadata.message_type,
              "round": round_of(content), "issued": repr(float(issued)), "expires": repr(float(issued + valid_for)),
              "nonce": secrets.token_hex(16)}
    signature = key.sign(_instruction_bytes(fields, content_digest(content)))
    content[ENVELOPE] = ConfigRecord({"format": INSTRUCTION_FORMAT, "key": key_id(key.public_key()), **fields,
                                      "signature": base64.b64encode(signature).decode()})
    msg.content = content
    return msg


def _envelope(msg: Message, what: str) -> dict[str, str]:
    if not msg.has_content() or ENVELOPE not in msg.content:
        raise EdfedError(f"{what} carries no signature")
    return {k: str(v) for k, v in msg.content[ENVELOPE].items()}


def verify_instruction(msg: Message, node_id: int, keys: dict[str, ed25519.Ed25519PublicKey],
                       now: float | None = None) -> Instruction:
    """The envelope of a message to this node, if it is the coordinator's, for this node, run and content, and
    current; else EdfedError naming what failed. Reads nothing of the content but its digest."""
    kind = msg.metadata.message_type
    if msg.metadata.reply_to_message_id:
        raise EdfedError(f"refused a {kind} message: it is a reply, not an instruction")
    try:
        env = _envelope(msg, f"the {kind} message")
    except EdfedError as exc:
        raise EdfedError(f"refused an instruction: {exc} by the coordinator (anyone who reaches the SuperLink "
                         "can push unsigned messages)") from None
    if env.get("format") != INSTRUCTION_FORMAT:
        raise EdfedError(f"refused a {kind} message: signature format {env.get('format')!r}, "
                         f"expected {INSTRUCTION_FORMAT!r}")
    public = keys.get(env.get("key", ""))
    if public is None:
        raise EdfedError(f"refused a {kind} message: signed by key {env.get('key', '')[:16]!r}, which is not this "
                         "site's coordinator key")
    meta = msg.metadata
    expected = {"run": str(meta.run_id), "dst": str(node_id), "type": kind, "round": round_of(msg.content)}
    if str(meta.dst_node_id) != str(node_id):
        raise EdfedError(f"refused a {kind} message: delivered for node {meta.dst_node_id}, this is node {node_id}")
    for name, value in expected.items():
        if env.get(name) != value:
            what = {"run": "run", "dst": "node", "type": "message type", "round": "round"}[name]
            raise EdfedError(f"refused a {kind} message: the coordinator signed it for {what} "
                             f"{env.get(name)!r}, not {value!r}")
    try:
        signature = base64.b64decode(env.get("signature", ""), validate=True)
        issued, expires = float(env["issued"]), float(env["expires"])
        public.verify(signature, _instruction_bytes({**env, **expected}, content_digest(msg.content)))
    except (InvalidSignature, ValueError, KeyError):
        raise EdfedError(f"refused a {kind} message: its coordinator signature does not verify (content or "
                         "fields changed after signing)") from None
    moment = time.time() if now is None else now
    if not issued - CLOCK_SKEW <= moment <= expires + CLOCK_SKEW:
        raise EdfedError(f"refused a {kind} message: signed to be valid from {issued:.0f} to {expires:.0f} "
                         f"(unix time), it is {moment:.0f} here: a delayed or replayed instruction")
    return Instruction(key_id=env["key"], nonce=env["nonce"], expires=expires)


# --- replies: signed by the site, verified by the coordinator -----------------------------------------------


def _reply_bytes(run_id: int, src: int, kind: str, server_round: str, reply_to: str, digest: str) -> bytes:
    return REPLY_FORMAT.encode() + _field(run_id, src, kind, server_round, reply_to, digest)


def sign_reply(reply: Message, instruction: Message, *, node_id: int, key: ec.EllipticCurvePrivateKey) -> Message:
    """Add the site's envelope to its reply (in place). An error reply has no content and goes unsigned: it
    carries nothing to aggregate."""
    if not reply.has_content():
        return reply
    meta = instruction.metadata
    signed = _reply_bytes(meta.run_id, node_id, meta.message_type, round_of(instruction.content),
                          meta.message_id, content_digest(reply.content))
    reply.content[ENVELOPE] = ConfigRecord({"format": REPLY_FORMAT, "key": key_id(key.public_key()),
                                            "signature": base64.b64encode(key.sign(signed, ec.ECDSA(
                                                hashes.SHA384()))).decode()})
    return reply


def reply_problem(reply: Message, instruction: Message | None, public: ec.EllipticCurvePublicKey | None) -> str | None:
    """Why `reply` is not the addressed site's answer to `instruction` (None: it is)."""
    if instruction is None:
        return "it answers no instruction of this call"
    if public is None:
        return f"node {instruction.metadata.dst_node_id} has no key among the coordinator's registered site keys"
    meta = instruction.metadata
    if reply.metadata.src_node_id != meta.dst_node_id or reply.metadata.run_id != meta.run_id:
        return f"it comes from node {reply.metadata.src_node_id}, the instruction went to node {meta.dst_node_id}"
    try:
        env = _envelope(reply, "the reply")
        if env.get("format") != REPLY_FORMAT:
            return f"reply signature format {env.get('format')!r}, expected {REPLY_FORMAT!r}"
        signature = base64.b64decode(env.get("signature", ""), validate=True)
        public.verify(signature, _reply_bytes(meta.run_id, meta.dst_node_id, meta.message_type,
                                              round_of(instruction.content), meta.message_id,
                                              content_digest(reply.content)), ec.ECDSA(hashes.SHA384()))
    except EdfedError as exc:
        return str(exc)
    except (InvalidSignature, ValueError):
        return "its signature is not by the key registered for that node"
    return None


# --- keys ---------------------------------------------------------------------------------------------------


def coordinator_key(out: Path) -> tuple[Path, Path]:
    """The coordinator's Ed25519 signing key: `coordinator.key` (PKCS#8 PEM, 0600) and `coordinator.pub`
    (OpenSSH, for every site's trust file or node config)."""
    from edfed.common.credentials import ed25519_key_pair

    return ed25519_key_pair(out, "coordinator")


def load_coordinator_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise EdfedError(f"coordinator-key {path}: not a readable, unencrypted PEM private key "
                         f"({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdfedError(f"coordinator-key {path}: not an Ed25519 key (make one with `edfed deploy coordinator-key`)")
    return key


def coordinator_public_key(text: str, where: str) -> ed25519.Ed25519PublicKey:
    """An OpenSSH Ed25519 public key (a line of coordinator.pub)."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise EdfedError(f"{where}: {text.strip()[:40]!r}… is not an OpenSSH public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise EdfedError(f"{where}: the key {text.strip()[:40]!r}… is not Ed25519 (coordinator.pub)")
    return key


def load_site_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's SuperNode key (`edfed deploy site-key`: OpenSSH EC private key), which signs its replies."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EdfedError(f"site-key {path}: not a readable, unencrypted OpenSSH private key "
                         f"({type(exc).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EdfedError(f"site-key {path}: not an EC key (the key `edfed deploy site-key` writes)")
    return key


def load_site_public_keys(folder: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """The coordinator's registered site keys: `<name>.pub` files (OpenSSH EC), as sent for registration."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdfedError(f"site-keys {folder}: not a folder (put each registered site's ed-site-K.pub there)")
    keys = {}
    for path in sorted(folder.glob("*.pub")):
        try:
            key = serialization.load_ssh_public_key(path.read_bytes().strip())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise EdfedError(f"site-keys: {path} is not an OpenSSH public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise EdfedError(f"site-keys: {path} is not an EC key (the .pub `edfed deploy site-key` writes)")
        keys[path.stem] = key
    if not keys:
        raise EdfedError(f"site-keys {folder}: no .pub file in it")
    return keys


def pem_public_key(pem: bytes) -> ec.EllipticCurvePublicKey | None:
    """A node's public key as the SuperLink reports it (PEM SubjectPublicKeyInfo), or None."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None
