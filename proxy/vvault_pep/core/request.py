"""The request as data: the verified client certificate and the TLS connection it came on.

The listener turns a verified DER leaf into a :class:`PeerCertificate` (refusing a leaf that
is a CA, lacks the clientAuth EKU, or is a malformed X.509-SVID); nothing a client writes in a
header can stand in for it.  The canonical target and headers are :mod:`.sanitize`'s.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .spiffe import InvalidSpiffeId, parse_spiffe_id


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    subject: str
    issuer: str
    common_name: str | None
    dns_sans: tuple[str, ...]
    uri_sans: tuple[str, ...]
    spiffe_id: str | None
    sha256: str  # hex thumbprint of the DER certificate
    x5t_s256: str  # base64url thumbprint, as RFC 8705 cnf.x5t#S256 uses
    serial: str
    not_before: str
    not_after: str
    valid_from: dt.datetime
    valid_until: dt.datetime

    def valid_at(self, when: dt.datetime) -> bool:
        return self.valid_from <= when < self.valid_until

    def as_input(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "common_name": self.common_name,
            "dns_sans": list(self.dns_sans),
            "uri_sans": list(self.uri_sans),
            "spiffe_id": self.spiffe_id,
            "sha256": self.sha256,
            "x5t_s256": self.x5t_s256,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


class CertificateRefused(ValueError):
    pass


def _name(name: x509.Name) -> str:
    return name.rfc4514_string()


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def parse_peer(
    der: bytes, *, require_client_auth_eku: bool = True, trust_domains: tuple[str, ...] = ()
) -> PeerCertificate:
    """Turn a verified DER leaf into data; raise CertificateRefused on policy misses.

    A ``spiffe://`` URI SAN makes the certificate an X.509-SVID, which must then be
    valid: its only URI SAN, a SPIFFE ID by the spec, of one of ``trust_domains``
    (when some are configured).  Anything else is refused, not ignored.
    """
    import base64

    cert = x509.load_der_x509_certificate(der)
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise CertificateRefused("leaf certificate has CA:TRUE")
    except x509.ExtensionNotFound:
        pass
    if require_client_auth_eku:
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound as exc:
            raise CertificateRefused("leaf certificate has no extendedKeyUsage") from exc
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise CertificateRefused("leaf certificate lacks the clientAuth EKU")
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        pass
    spiffe = [u for u in uris if u.lower().startswith("spiffe:")]
    if spiffe and len(uris) > 1:
        # The X.509-SVID spec: exactly one URI SAN, the SPIFFE ID.
        raise CertificateRefused("an X.509-SVID carries exactly one URI SAN")
    if spiffe:
        try:
            sid = parse_spiffe_id(spiffe[0])
        except InvalidSpiffeId as exc:
            raise CertificateRefused(f"malformed SPIFFE ID: {exc}") from exc
        if trust_domains and sid.trust_domain not in trust_domains:
            raise CertificateRefused("SPIFFE ID of a trust domain that is not configured")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    digest = hashlib.sha256(der).digest()
    return PeerCertificate(
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        common_name=str(cns[0].value) if cns else None,
        dns_sans=dns,
        uri_sans=uris,
        spiffe_id=spiffe[0] if spiffe else None,
        sha256=digest.hex(),
        x5t_s256=base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"),
        serial=format(cert.serial_number, "x"),
        not_before=_iso(cert.not_valid_before_utc),
        not_after=_iso(cert.not_valid_after_utc),
        valid_from=cert.not_valid_before_utc,
        valid_until=cert.not_valid_after_utc,
    )


@dataclass(frozen=True, slots=True)
class Connection:
    """What the listener knows about one TLS connection."""

    tls_version: str | None
    cipher: str | None
    alpn: str | None
    peer: PeerCertificate | None
    # Set when ``peer`` came from a trusted front proxy's x-forwarded-client-cert: that proxy.
    forwarded_by: PeerCertificate | None = None
