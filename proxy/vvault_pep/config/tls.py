"""Do the TLS files a config names load?  Asked at load time, so a bad file is a config error
(exit 2) naming its field, not a start failure."""

from __future__ import annotations

import re
import ssl
from typing import Any

from cryptography import x509

from .models import ListenerTls


def tls_file_problem(tls: ListenerTls) -> tuple[str, str] | None:
    """(field, why) when the certificate, key, CA or CRL files exist but cannot be used."""

    def why(exc: Exception) -> str:
        return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        return "cert_file", f"the certificate and key_file do not load as a PEM pair ({why(exc)})"
    try:
        ctx.load_verify_locations(cafile=str(tls.client_ca_file))
    except (ssl.SSLError, OSError) as exc:
        return "client_ca_file", f"no PEM CA certificate loads from it ({why(exc)})"
    for i, path in enumerate(tls.crl_file):
        try:
            read_crls(path)
            ctx.load_verify_locations(cafile=str(path))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return f"crl_file[{i}]" if len(tls.crl_file) > 1 else "crl_file", f"not a usable PEM CRL ({why(exc)})"
    return None


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def read_crls(path: Any) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file; ValueError if there is none or one does not parse."""
    with open(path, "rb") as fh:
        data = fh.read()
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise ValueError(f"{path}: no PEM CRL (-----BEGIN X509 CRL-----) in the file")
    return [x509.load_pem_x509_crl(block) for block in blocks]
