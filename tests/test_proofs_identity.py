"""A certificate names one workload or none: two SPIFFE IDs are refused, never "the first one".

The X.509-SVID specification allows exactly one URI SAN, the SPIFFE ID, per
SVID.  A certificate carrying two could be read as either workload by
different components, and one carrying a SPIFFE ID beside another URI is not
an SVID either: the PEP refuses both outright.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vvault_pep.core.request import CertificateRefused, parse_peer


def _leaf_der(pki: Path, uris: list[str]) -> bytes:
    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "two-faced")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "uris",
    [
        ["spiffe://demo.vvault/client/reader", "spiffe://prod.vvault/ns/platform/sa/indexer"],
        ["spiffe://demo.vvault/client/reader", "spiffe://demo.vvault/client/reader"],
        ["https://example.test/x", "spiffe://demo.vvault/a", "SPIFFE://demo.vvault/b"],
    ],
)
def test_two_spiffe_ids_are_refused(pki: Path, uris: list[str]) -> None:
    with pytest.raises(CertificateRefused, match="exactly one URI SAN"):
        parse_peer(_leaf_der(pki, uris))


def test_one_spiffe_id_beside_other_uris_is_refused(pki: Path) -> None:
    with pytest.raises(CertificateRefused, match="exactly one URI SAN"):
        parse_peer(_leaf_der(pki, ["https://example.test/x", "spiffe://demo.vvault/client/reader"]))


def test_uris_without_a_spiffe_id_are_no_workload(pki: Path) -> None:
    peer = parse_peer(_leaf_der(pki, ["https://example.test/x", "https://example.test/y"]))
    assert peer.spiffe_id is None
    assert peer.uri_sans == ("https://example.test/x", "https://example.test/y")
