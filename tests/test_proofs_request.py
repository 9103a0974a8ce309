"""A verified client certificate as data: every field exact, every refusal with its reason.

Leaves are signed by the test PKI's CA, with the extensions each case needs.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vvault_pep.core.request import CertificateRefused, parse_peer

NOT_BEFORE = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2036, 6, 7, 8, 9, 10, tzinfo=dt.UTC)
CLIENT = [ExtendedKeyUsageOID.CLIENT_AUTH]


def _leaf(
    pki: Path,
    *,
    cn: str | None = "leaf",
    ca: bool | None = False,
    eku: list[x509.ObjectIdentifier] | None = CLIENT,
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    serial: int = 0xABC123,
) -> bytes:
    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "org")]
    if cn is not None:
        attrs.insert(0, x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


def test_every_field_exact(pki: Path) -> None:
    der = _leaf(pki, dns=("a.example", "b.example"), uris=("spiffe://demo.vvault/client/reader",))
    peer = parse_peer(der)
    digest = hashlib.sha256(der).digest()
    issuer = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()).subject.rfc4514_string()
    assert peer.as_input() == {
        "subject": "O=org,CN=leaf",  # RFC 4514 writes the last RDN first
        "issuer": issuer,
        "common_name": "leaf",
        "dns_sans": ["a.example", "b.example"],
        "uri_sans": ["spiffe://demo.vvault/client/reader"],
        "spiffe_id": "spiffe://demo.vvault/client/reader",
        "sha256": digest.hex(),
        "x5t_s256": base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
        "serial": "abc123",
        "not_before": "2025-01-02T03:04:05Z",
        "not_after": "2036-06-07T08:09:10Z",
    }
    assert "=" not in peer.x5t_s256 and len(peer.x5t_s256) == 43
    assert (peer.valid_from, peer.valid_until) == (NOT_BEFORE, NOT_AFTER)
    assert (peer.dns_sans, peer.uri_sans) == (("a.example", "b.example"), ("spiffe://demo.vvault/client/reader",))


def test_validity_window_is_half_open(pki: Path) -> None:
    peer = parse_peer(_leaf(pki))
    second = dt.timedelta(seconds=1)
    assert [peer.valid_at(t) for t in (NOT_BEFORE - second, NOT_BEFORE, NOT_AFTER - second, NOT_AFTER)] == [
        False,
        True,
        True,
        False,
    ]


def test_no_san_no_cn(pki: Path) -> None:
    peer = parse_peer(_leaf(pki, cn=None))
    assert (peer.common_name, peer.dns_sans, peer.uri_sans, peer.spiffe_id) == (None, (), (), None)
    assert peer.subject == "O=org"


def test_other_uris_are_not_a_spiffe_id(pki: Path) -> None:
    peer = parse_peer(_leaf(pki, uris=("https://example.test/x", "urn:spiffe:x")))
    assert (peer.uri_sans, peer.spiffe_id) == (("https://example.test/x", "urn:spiffe:x"), None)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"ca": True}, "leaf certificate has CA:TRUE"),
        ({"eku": None}, "leaf certificate has no extendedKeyUsage"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "leaf certificate lacks the clientAuth EKU"),
        (
            {"uris": ("spiffe://demo.vvault/a", "https://example.test/")},
            "an X.509-SVID carries exactly one URI SAN",
        ),
        ({"uris": ("SPIFFE://demo.vvault/a",)}, "malformed SPIFFE ID: scheme must be 'spiffe' in lower case"),
        ({"uris": ("spiffe://demo.vvault",)}, "malformed SPIFFE ID: a workload SPIFFE ID has a path"),
    ],
)
def test_refusals(pki: Path, kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(CertificateRefused) as err:
        parse_peer(_leaf(pki, **kwargs))  # type: ignore[arg-type]
    assert str(err.value) == reason


def test_no_basic_constraints_is_a_leaf(pki: Path) -> None:
    assert parse_peer(_leaf(pki, ca=None)).common_name == "leaf"


def test_eku_requirement_can_be_lifted(pki: Path) -> None:
    assert parse_peer(_leaf(pki, eku=None), require_client_auth_eku=False).common_name == "leaf"
    server = parse_peer(_leaf(pki, eku=[ExtendedKeyUsageOID.SERVER_AUTH]), require_client_auth_eku=False)
    assert server.common_name == "leaf"
    both = parse_peer(_leaf(pki, eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]))
    assert both.common_name == "leaf"


def test_trust_domains(pki: Path) -> None:
    der = _leaf(pki, uris=("spiffe://demo.vvault/client/reader",))
    assert parse_peer(der).spiffe_id == "spiffe://demo.vvault/client/reader"
    assert parse_peer(der, trust_domains=("other", "demo.vvault")).spiffe_id == "spiffe://demo.vvault/client/reader"
    with pytest.raises(CertificateRefused) as err:
        parse_peer(der, trust_domains=("other",))
    assert str(err.value) == "SPIFFE ID of a trust domain that is not configured"
    # The check compares trust domains, not prefixes of the ID.
    with pytest.raises(CertificateRefused):
        parse_peer(der, trust_domains=("demo",))


def test_times_are_utc_whatever_the_local_zone(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    der = _leaf(pki)
    monkeypatch.setenv("TZ", "IST-5:30")  # a POSIX zone string: no tz database needed
    time.tzset()
    try:
        peer = parse_peer(der)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert (peer.not_before, peer.not_after) == ("2025-01-02T03:04:05Z", "2036-06-07T08:09:10Z")
