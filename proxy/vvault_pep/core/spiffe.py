"""SPIFFE IDs, validated as the SPIFFE ID specification says (pure functions).

``spiffe://<trust-domain>/<path>``: scheme ``spiffe`` in lower case; a trust
domain of lower-case letters, digits, ``.``, ``-`` and ``_`` (no port, no
userinfo); a non-empty path of segments made of letters, digits, ``.``, ``-``
and ``_``, none empty, ``.`` or ``..``; no query or fragment; at most 2048
bytes.  No percent-encoding anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_LEN = 2048


class InvalidSpiffeId(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(text: str) -> SpiffeId:
    if len(text.encode()) > MAX_LEN:
        raise InvalidSpiffeId("longer than 2048 bytes")
    if not text.startswith("spiffe://"):
        raise InvalidSpiffeId("scheme must be 'spiffe' in lower case")
    rest = text[len("spiffe://") :]
    if "?" in rest or "#" in rest:
        raise InvalidSpiffeId("no query or fragment allowed")
    domain, slash, path = rest.partition("/")
    if not domain:
        raise InvalidSpiffeId("empty trust domain")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise InvalidSpiffeId("trust domain has a character outside [a-z0-9._-] (port, userinfo, upper case?)")
    if not slash or not path:
        raise InvalidSpiffeId("a workload SPIFFE ID has a path")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidSpiffeId("empty, '.' or '..' path segment")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidSpiffeId("path segment has a character outside [A-Za-z0-9._-]")
    return SpiffeId(domain, "/" + path)
