"""Deployment credentials: a CA, the SuperLink certificate, site keys in the formats Flower reads."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from edfed.cli.main import main
from edfed.common.credentials import init_coordinator, site_key
from edfed.common.errors import EdfedError


def test_coordinator_certificate_is_signed_by_the_ca_for_its_hosts_and_the_loopback_names(tmp_path):
    # Only the public name given: nginx (localhost) and the operator's flwr (127.0.0.1) must still be accepted.
    ca_crt, ca_key, server_pem, server_key = init_coordinator(tmp_path, ["ed-hub.example.org"])
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    server = x509.load_pem_x509_certificate(server_pem.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["ed-hub.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in (ca_key, server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert isinstance(load_pem_private_key(private.read_bytes(), None), ec.EllipticCurvePrivateKey)


def test_site_key_pair_is_p384_openssh_and_owner_only(tmp_path):
    private, public = site_key("ed-site-1", tmp_path)
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_flower_accepts_the_site_public_key(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    _, public = site_key("ed-site-2", tmp_path)
    assert len(try_load_public_key(public)) > 0


def test_existing_credentials_are_never_overwritten(tmp_path, capsys):
    private, _ = site_key("ed-site-1", tmp_path)
    before = private.read_bytes()
    with pytest.raises(EdfedError, match="already exist"):
        site_key("ed-site-1", tmp_path)
    assert private.read_bytes() == before
    assert main(["deploy", "init", "--out", str(tmp_path)]) == 0
    assert main(["deploy", "init", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert "refusing to overwrite" in err.err and "PRIVATE KEY" not in err.out + err.err
