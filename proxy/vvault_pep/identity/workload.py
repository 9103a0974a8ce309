"""A workload's identity: the client certificate's single URI SAN, a valid SPIFFE ID of an
allowed trust domain.  Never a CN, never a header."""

from __future__ import annotations

from ..core.principal import Workload
from ..core.request import PeerCertificate
from ..core.spiffe import InvalidSpiffeId, parse_spiffe_id


def workload_of(peer: PeerCertificate | None, trust_domains: tuple[str, ...]) -> Workload | None:
    """The SPIFFE workload identity of a verified certificate, if it is one we trust."""
    if peer is None or peer.spiffe_id is None or not trust_domains:
        return None
    if len(peer.uri_sans) != 1:
        return None  # an X.509-SVID carries exactly one URI SAN
    try:
        sid = parse_spiffe_id(peer.spiffe_id)
    except InvalidSpiffeId:
        return None
    if sid.trust_domain not in trust_domains:
        return None
    return Workload(str(sid), sid.trust_domain, sid.path)
