"""Deployment credentials: the coordinator's CA and TLS certificate, and each site's key pair.

Made with `cryptography` (no hand-rolled crypto). Keys are EC P-384, the curve Flower's SuperNode
authentication expects; site keys are in OpenSSH format, as `flower-supernode
--auth-supernode-private-key` and `flwr supernode register` read them. Private keys are written
owner-only (0600) and never printed. Everything is written to a temporary folder first and moved
into place whole, so a failure leaves nothing half-made.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write_text

LOOPBACK_NAMES = ("localhost", "127.0.0.1")  # where the coordinator's own nginx and flwr reach the SuperLink


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _fresh_folder(out: Path, names: list[str]) -> Path:
    clashes = [n for n in names if (out / n).exists()]
    if clashes:
        raise EdfedError(f"{out}: {', '.join(clashes)} already exist; refusing to overwrite credentials")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.chmod(tmp, 0o700)
    return tmp


def _move_into(tmp: Path, out: Path) -> None:
    # Not atomic_write: the files were made together in a private temporary folder (each with its own mode)
    # and are renamed into OUT only when all of them exist, so a failure midway leaves OUT as it was.
    out.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def init_coordinator(out: Path, hosts: list[str], days: int = 825) -> list[Path]:
    """A certificate authority and the SuperLink's certificate for `hosts` (names or IP addresses) and the
    loopback names, always: nginx checks `localhost` and the operator's `flwr` dials 127.0.0.1."""
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    tmp = _fresh_folder(out, names)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edfed coordinator CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    _write(tmp / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(tmp / "ca.key", _pem_key(ca_key), private=True)
    _write(tmp / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(tmp / "server.key", _pem_key(server_key), private=True)
    _move_into(tmp, out)
    return [out / n for n in names]


def site_key(name: str, out: Path) -> tuple[Path, Path]:
    """A site's EC P-384 key pair: `<name>.key` (private, OpenSSH, 0600) and `<name>.pub` (public)."""
    if not name or any(ch in name for ch in "/\\ \t"):
        raise EdfedError(f"site name {name!r}: use letters, digits, '-' or '_' (it names the key files)")
    return _key_pair(out, name, ec.generate_private_key(ec.SECP384R1()), serialization.PrivateFormat.OpenSSH, name)


def superexec_secret(path: Path) -> Path:
    """A fresh shared secret for `--superexec-auth-secret-file` (SuperLink or SuperNode, and its SuperExec):
    only a process that can read it may claim tasks on that Runtime API. Owner-only; never overwritten."""
    if path.exists():
        raise EdfedError(f"{path} already exists; refusing to overwrite a SuperExec secret")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, secrets.token_hex(32))


def ed25519_key_pair(out: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 signing key pair: `OUT/NAME.key` (PKCS#8 PEM, 0600) and `OUT/NAME.pub` (OpenSSH, comment
    `edfed-NAME`), written whole or not at all. The consortium's release key and the coordinator's message key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return _key_pair(out, name, ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8,
                     f"edfed-{name}")


def _key_pair(out: Path, name: str, key, private_format: serialization.PrivateFormat,
              comment: str) -> tuple[Path, Path]:
    """`OUT/NAME.key` (private, PEM, 0600) and `OUT/NAME.pub` (OpenSSH `comment`), both or neither."""
    tmp = _fresh_folder(out, [f"{name}.key", f"{name}.pub"])
    _write(tmp / f"{name}.key", key.private_bytes(serialization.Encoding.PEM, private_format,
                                                  serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(tmp / f"{name}.pub", public + f" {comment}\n".encode())
    _move_into(tmp, out)
    return out / f"{name}.key", out / f"{name}.pub"
