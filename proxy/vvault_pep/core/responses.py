"""Responses: what of the upstream's answer may reach the client.

The response is attack surface too.  Forward applies these pure rules before
the PEP adds its own headers (``X-Request-Id``, then the decision's
``response_headers``, last):

* **Header policy** (:func:`pass_headers`).  Dropped from every upstream
  answer: hop-by-hop headers and those named in ``Connection``; every header
  the PEP owns (``X-Vvault-*``, ``X-Pep-*``, ``X-Request-Id``,
  ``X-Decision-Cache``, and ``Strict-Transport-Security`` / ``Alt-Svc``, which
  speak for the TLS endpoint — the PEP's, not the upstream's); the configured
  deny list of fingerprinting and debug headers.  A route may drop more, or
  switch to an allow-list.  ``Set-Cookie`` follows its own rule: pass, drop,
  or only host-only cookies carrying ``Secure``.
* **Obligations bind the whole answer** (:func:`whole_answer_request`,
  :func:`partial_reason`, :data:`BODY_BOUND`).  When a decision's obligation
  reads the body (``redact``), the upstream is asked for the whole
  representation (``Range``, ``If-Range`` and the read conditionals are not
  forwarded; ``If-Match`` / ``If-Unmodified-Since`` are refused), any partial
  answer is withheld, and nothing computed over the full body (validators,
  digests, length) goes out with the redacted one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..config.models import Responses, RouteResponses
from ..errors import PepError

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authentication-info",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The PEP speaks for these: an upstream copy would mislead clients and monitors
# about what the PEP did (X-Vvault-Redacted, X-Decision-Cache), or turn off the
# PEP's own transport security (Strict-Transport-Security: max-age=0, Alt-Svc).
PEP_OWNED = frozenset({"x-request-id", "x-decision-cache", "strict-transport-security", "alt-svc", "public-key-pins"})
PEP_OWNED_PREFIXES = ("x-vvault-", "x-pep-")
# Without these the body cannot be read: kept in allow-list mode too.
_FRAMING = frozenset({"content-type", "content-length", "content-encoding", "content-range"})

# Request headers that ask for part of a representation, or for an answer that
# depends on a validator computed over the full body.
_PARTIAL_REQUEST = frozenset({"range", "if-range", "if-none-match", "if-modified-since"})
# Preconditions that cannot be dropped without changing what a write means.
_PRECONDITIONS = frozenset({"if-match", "if-unmodified-since"})
# Answer headers computed over the full body: on a redacted answer they would
# describe (and let a client test guesses about) what was removed.
BODY_BOUND = frozenset(
    {
        "etag",
        "last-modified",
        "content-md5",
        "digest",
        "content-digest",
        "repr-digest",
        "content-length",
        "content-type",
        "content-encoding",
        "content-range",
        "accept-ranges",
    }
)


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    drop: frozenset[str]
    drop_prefixes: tuple[str, ...]
    allow: frozenset[str] | None  # None: deny-list mode
    set_cookie: str  # pass | drop | host_only_secure


DEFAULT_POLICY = HeaderPolicy(frozenset(Responses().drop), Responses().drop_prefixes, None, "host_only_secure")


def policy_for(common: Responses, route: RouteResponses) -> HeaderPolicy:
    """The header policy of one route: the global deny list plus the route's rules."""
    return HeaderPolicy(
        drop=frozenset((*common.drop, *route.drop)),
        drop_prefixes=common.drop_prefixes,
        allow=frozenset(route.allow) if route.allow is not None else None,
        set_cookie=route.set_cookie or common.set_cookie,
    )


def pass_headers(headers: Iterable[tuple[str, str]], policy: HeaderPolicy) -> list[tuple[str, str]]:
    """The upstream's answer headers a client may see, in their order."""
    items = list(headers)
    connection_named = {
        token.strip().lower() for key, value in items if key.lower() == "connection" for token in value.split(",")
    }
    out: list[tuple[str, str]] = []
    for key, value in items:
        low = key.lower()
        if low in HOP_BY_HOP or low in connection_named or low in PEP_OWNED or low.startswith(PEP_OWNED_PREFIXES):
            continue
        if low == "set-cookie":
            if cookie_passes(value, policy.set_cookie):
                out.append((key, value))
            continue
        if policy.allow is not None:
            if low not in policy.allow and low not in _FRAMING:
                continue
        elif low in policy.drop or low.startswith(policy.drop_prefixes):
            continue
        out.append((key, value))
    return out


def cookie_passes(value: str, rule: str) -> bool:
    """Whether one ``Set-Cookie`` value may reach the client under ``rule``."""
    if rule == "pass":
        return True
    if rule != "host_only_secure":
        return False
    # Read as a browser reads it (RFC 6265 §5.2): split on ';', attribute names
    # case-insensitive.  Any Domain attribute at all refuses the cookie: browsers
    # ignore an empty one and honour an earlier non-empty one, which a parser
    # keeping only the last value (http.cookies) would miss.
    pair, *attributes = value.split(";")
    name, eq, _ = pair.partition("=")
    if not eq or not name.strip():
        return False
    names = {attribute.split("=", 1)[0].strip().lower() for attribute in attributes}
    return "domain" not in names and "secure" in names


def whole_answer_request(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Request headers for an upstream whose answer an obligation must read whole."""
    out: list[tuple[str, str]] = []
    for key, value in headers:
        low = key.lower()
        if low in _PRECONDITIONS:
            # On a read, 412-or-200 would test a guess against a validator of the full
            # body; on a write, dropping it would turn a guarded write into a blind one.
            raise PepError("enforce.conditional_refused", f"{key} is not accepted where the answer is redacted")
        if low not in _PARTIAL_REQUEST:
            out.append((key, value))
    return out


def partial_reason(status: int, headers: Iterable[tuple[str, str]]) -> str | None:
    """Why an upstream answer is not a whole representation, or None if it is."""
    if status == 206:
        return "the upstream answered 206 Partial Content"
    if status == 304:
        return "the upstream answered 304 Not Modified to an unconditional request"
    for key, value in headers:
        low = key.lower()
        if low == "content-range":
            return "the upstream answer carries Content-Range"
        if low == "content-type" and value.split(";")[0].strip().lower().startswith("multipart/byteranges"):
            return "the upstream answered multipart/byteranges"
    return None
