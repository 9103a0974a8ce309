"""Which ``Host`` names the data listener serves.

``listener.hosts`` names them; left empty, they are the names the server
certificate was issued for (its DNS and IP SANs) and the hosts the routes
name (a route's ``host`` is a name the operator chose to serve): a client that reaches the
PEP under another name is answered 421 before routing, so it can never make
the upstream see a Host (``X-Forwarded-Host``) of its choosing.  ``["*"]``
serves any name, and ``check`` reports it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ..config.models import Config

ANY = "*"


@dataclass(frozen=True, slots=True)
class ServedHosts:
    exact: frozenset[str]
    wildcard_parents: frozenset[str]  # "example.com" for a "*.example.com" SAN
    any: bool = False

    def serves(self, host: str) -> bool:
        if self.any or host in self.exact:
            return True
        label, dot, parent = host.partition(".")
        return bool(dot) and bool(label) and parent in self.wildcard_parents


def certificate_names(cert_file: Path) -> tuple[str, ...]:
    """The DNS and IP subject alternative names of the first certificate in ``cert_file``."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = [d.lower().rstrip(".") for d in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress) if not isinstance(ip, ipaddress._BaseNetwork)]
    return (*dns, *ips)


def served_hosts(config: Config) -> ServedHosts:
    listener = config.listener
    names = listener.hosts or (
        *certificate_names(listener.tls.cert_file),
        *(r.host for r in config.routes if r.host is not None),
    )
    if ANY in names:
        return ServedHosts(frozenset(), frozenset(), any=True)
    exact = frozenset(n for n in names if not n.startswith("*."))
    parents = frozenset(n[2:] for n in names if n.startswith("*."))
    return ServedHosts(exact, parents)
