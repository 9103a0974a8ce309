"""A throwaway PKI for the demo and the tests: one CA, a server and clients.

``python -m examples.pki OUT_DIR`` writes ``ca.pem``, ``server.pem`` /
``server-key.pem`` (SANs ``localhost`` and ``127.0.0.1``) and the client
certificates named in :data:`CLIENTS`, and ``crl.pem`` — the CA's revocation
list, revoking ``client-revoked.pem``.  Every key is a fresh P-256 key; the
files are for trying the PEP, never for production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "vvault demo CA"
ORG = "vvault-pep demo"


@dataclass(frozen=True)
class ClientSpec:
    common_name: str
    spiffe_id: str | None = None
    eku: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    ca: bool = False
    expired: bool = False
    other_ca: bool = False


CLIENTS: dict[str, ClientSpec] = {
    "reader": ClientSpec("demo-reader", "spiffe://demo.vvault/client/reader"),
    "ops": ClientSpec("demo-ops", "spiffe://demo.vvault/client/ops"),
    "no-eku": ClientSpec("no-eku", eku=None),
    "server-eku": ClientSpec("server-eku", eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
    "leaf-ca": ClientSpec("leaf-ca", ca=True),
    "expired": ClientSpec("expired", expired=True),
    "stranger": ClientSpec("stranger", "spiffe://demo.vvault/client/reader", other_ca=True),
    "foreign": ClientSpec("foreign-workload", "spiffe://other.domain/ns/x/sa/y"),
    "indexer": ClientSpec("indexer", "spiffe://prod.vvault/ns/platform/sa/indexer"),
    "bad-spiffe": ClientSpec("bad-spiffe", "spiffe://Demo.vvault:8443/a/../b"),
    "revoked": ClientSpec("revoked", "spiffe://demo.vvault/client/revoked"),
    # A CN that spells a SPIFFE ID, with no URI SAN: it must never be taken for that workload.
    "cn-spoof": ClientSpec("spiffe://demo.vvault/client/ops"),
}


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    cn: str,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    eku: tuple[x509.ObjectIdentifier, ...] | None,
    is_ca: bool = False,
    expired: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=10), now - dt.timedelta(days=1))
        if expired
        else (
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(days=7),
        )
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, is_ca, is_ca, False, False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_name(path.stem + "-key.pem")
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def issue_crl(
    out: Path,
    revoked: tuple[str, ...] = ("revoked",),
    *,
    issued_ago: dt.timedelta = dt.timedelta(minutes=1),
    valid_for: dt.timedelta = dt.timedelta(days=1),
    path: Path | None = None,
) -> Path:
    """Write the CA's CRL revoking ``client-<name>.pem`` for each name; return its path.

    ``valid_for`` sets nextUpdate relative to now (negative: an already stale CRL).
    """
    ca_cert, ca_key = _load_ca(out)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - issued_ago)
        .next_update(now + valid_for)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for name in revoked:
        cert = x509.load_pem_x509_certificate((out / f"client-{name}.pem").read_bytes())
        entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now - issued_ago)
        builder = builder.add_revoked_certificate(entry.build())
    target = path or out / "crl.pem"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    tmp.replace(target)  # an atomic swap, as a CRL distribution job does it
    return target


def issue_client(out: Path, name: str, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> Path:
    """A client certificate from the demo CA with the given SANs: ``client-<name>.pem``."""
    cert, key = _leaf(_load_ca(out), name, uris=uris, dns=dns, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    _write(out / f"client-{name}.pem", cert, key)
    return out / f"client-{name}.pem"


def make_pki(out: Path) -> Path:
    """Write the demo PKI into ``out`` and return it."""
    out.mkdir(parents=True, exist_ok=True)
    ca = _ca(CA_NAME)
    other = _ca("some other CA")
    _write(out / "ca.pem", ca[0], ca[1])
    _write(out / "other-ca.pem", other[0])
    server = _leaf(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",), eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    _write(out / "server.pem", *server)
    for name, spec in CLIENTS.items():
        cert, key = _leaf(
            other if spec.other_ca else ca,
            spec.common_name,
            uris=(spec.spiffe_id,) if spec.spiffe_id else (),
            eku=spec.eku,
            is_ca=spec.ca,
            expired=spec.expired,
        )
        _write(out / f"client-{name}.pem", cert, key)
    issue_crl(out)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo/pki")
    print(make_pki(target))
