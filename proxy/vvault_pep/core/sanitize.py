"""Sanitize: one canonical view of the request, or a 400 before anything reads it.

The policy and the upstream must see the *same* request.  Gateways have been
bypassed because the part that authorised a path and the part that forwarded
it parsed it differently (``/public/..;/admin``, ``%2e%2e``, ``%2f``, ``\\``,
overlong UTF-8).  So the path is normalised exactly once, here, and the
canonical form is both what ``input.request.path`` says and the bytes the
upstream receives.

Path rules (``docs/sanitize.md`` explains each with examples):

1. The request target must be origin-form (``/…``); no fragment.
2. Raw characters must be RFC 3986 ``pchar`` or ``/``; ``\\`` is refused.
3. Every ``%XX`` must be valid hex.  Escapes of unreserved characters
   (``A-Z a-z 0-9 - . _ ~``) are decoded; the rest are kept, upper-cased.
4. Refused as ambiguous: an encoded ``/`` (``%2F``) or ``\\`` (``%5C``), NUL or
   any control character (raw or encoded), ``%25`` (an encoded ``%``, the
   double-decoding lever) unless allowed, ``;`` when configured, and bytes
   that are not valid UTF-8 once decoded.
5. Empty segments (``//``) collapse; ``.`` segments go; ``..`` removes the
   previous segment; a ``..`` above the root is refused.
6. A trailing ``/`` is kept (and added after a final ``.`` or ``..``).

Header rules: exactly one ``Host``; ``Content-Length`` with
``Transfer-Encoding``, several ``Content-Length``, a ``Transfer-Encoding``
other than ``chunked``, several ``Authorization``, or a NUL/CR/LF inside a
value → 400.  Hop-by-hop headers, the headers named in ``Connection``, every
header the PEP owns and headers with ``_`` in their name (CGI-style stacks map
``X_Forwarded_For`` to ``X-Forwarded-For``) are dropped before routing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..config.models import HOP_BY_HOP, Limits, Sanitize
from ..errors import PepError

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
_PCHAR_RAW = _UNRESERVED | _SUB_DELIMS | frozenset(":@%")
_PATH_RAW = _PCHAR_RAW | frozenset("/")
_QUERY_RAW = _PCHAR_RAW | frozenset("/?")
# A path of allowed characters with no '%' and no ';' is already in canonical
# encoding: most requests take this fast path through _decode_unreserved.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOST = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?$"
)


@dataclass(frozen=True, slots=True)
class Target:
    """The canonical request target."""

    path: str  # canonical, percent-encoded: what the policy sees and the upstream gets
    segments: tuple[str, ...]  # decoded segments of ``path``
    trailing_slash: bool
    query: str  # raw query string, forwarded unchanged ("" if none)
    query_params: tuple[tuple[str, tuple[str, ...]], ...]  # decoded, in first-seen order


@dataclass(frozen=True, slots=True)
class Headers:
    """The client's headers after the checks, split by who gets to read them."""

    host: str  # lower-case, without port
    port: int | None
    forward: tuple[tuple[str, str], ...]  # what the upstream may receive from the client
    policy: tuple[tuple[str, tuple[str, ...]], ...]  # allow-listed, for input.request.headers
    authorization: str | None
    content_length: int | None
    chunked: bool
    expect_continue: bool


_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Z-]+$")


def check_method(method: str) -> None:
    """An upper-case token, whatever the HTTP parser let through (methods are case-sensitive)."""
    if not _METHOD.fullmatch(method):
        raise PepError("sanitize.malformed", "the method must be an upper-case token")


def canonical_target(raw: str, rules: Sanitize, max_params: int = 64) -> Target:
    """Normalise a raw request target, or raise PepError(400)."""
    if not raw.startswith("/"):
        # absolute-form, authority-form and '*' would each let the target name
        # a host other than the one routed on.
        raise PepError("sanitize.bad_request_target", "the request target must start with '/'")
    if "#" in raw:
        raise PepError("sanitize.bad_request_target", "a request target has no fragment")
    raw_path, sep, query = raw.partition("?")
    path = _decode_unreserved(raw_path, rules)
    segments, trailing = _remove_dot_segments(path)
    canonical = "/" + "/".join(segments) + ("/" if trailing and segments else "")
    decoded = tuple(_decode_segment(s) for s in segments)
    params = _parse_query(query, max_params) if sep else ()
    return Target(canonical, decoded, trailing, query, params)


def _decode_unreserved(raw_path: str, rules: Sanitize) -> str:
    if _PLAIN_PATH.fullmatch(raw_path):
        return raw_path
    out: list[str] = []
    i, n = 0, len(raw_path)
    while i < n:
        ch = raw_path[i]
        if ch == "\\":
            raise PepError("sanitize.ambiguous_path", "backslash in path")
        if ch not in _PATH_RAW:
            raise PepError("sanitize.bad_request_target", "character not allowed in a path")
        if ch == ";" and rules.reject_semicolon:
            raise PepError("sanitize.ambiguous_path", "';' path parameters are not accepted")
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        hexpair = raw_path[i + 1 : i + 3]
        if len(hexpair) != 2 or hexpair[0] not in _HEX or hexpair[1] not in _HEX:
            raise PepError("sanitize.ambiguous_path", "malformed percent-encoding")
        byte = int(hexpair, 16)
        char = chr(byte)
        if byte in (0x2F, 0x5C):
            raise PepError("sanitize.ambiguous_path", "encoded '/' or '\\' in path")
        if byte < 0x20 or byte == 0x7F:
            raise PepError("sanitize.ambiguous_path", "encoded control character in path")
        if byte == 0x25 and rules.reject_encoded_percent:
            raise PepError("sanitize.ambiguous_path", "encoded '%' in path (double encoding)")
        if byte == 0x3B and rules.reject_semicolon:
            raise PepError("sanitize.ambiguous_path", "';' path parameters are not accepted")
        out.append(char if char in _UNRESERVED else "%" + hexpair.upper())
        i += 3
    return "".join(out)


def _remove_dot_segments(path: str) -> tuple[list[str], bool]:
    parts = path.split("/")[1:]  # path starts with '/'
    stack: list[str] = []
    trailing = False
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if ";" in part and part.split(";", 1)[0] in ("", ".", ".."):
            # Tomcat, Jetty and Spring read "..;x" as "..": the classic path-parameter bypass.
            raise PepError("sanitize.ambiguous_path", "dot segment with ';' parameters")
        if part in ("", "."):
            trailing = last
            continue
        if part == "..":
            if not stack:
                raise PepError("sanitize.path_escape", "'..' above the root")
            stack.pop()
            trailing = last
            continue
        stack.append(part)
        trailing = False
    return stack, trailing


def _percent_decode(text: str) -> bytes:
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "%":
            hexpair = text[i + 1 : i + 3]
            if len(hexpair) != 2 or hexpair[0] not in _HEX or hexpair[1] not in _HEX:
                raise ValueError("malformed percent-encoding")
            out.append(int(hexpair, 16))
            i += 3
        else:
            out += ch.encode("ascii")
            i += 1
    return bytes(out)


def _decode_segment(segment: str) -> str:
    if "%" not in segment:
        return segment  # checked to be plain ASCII path characters already
    try:
        return _percent_decode(segment).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PepError("sanitize.ambiguous_path", "path is not valid UTF-8") from exc


def _parse_query(query: str, max_params: int = 64) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if any(ch not in _QUERY_RAW for ch in query):
        raise PepError("sanitize.bad_query", "character not allowed in a query")
    if query.count("&") >= max_params:
        raise PepError("sanitize.bad_query", f"more than {max_params} query parameters")
    params: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        try:
            k = _percent_decode(key.replace("+", " ")).decode("utf-8")
            v = _percent_decode(value.replace("+", " ")).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            raise PepError("sanitize.bad_query", "malformed query encoding") from exc
        if _has_control(k) or _has_control(v):
            raise PepError("sanitize.bad_query", "control character in query")
        params.setdefault(k, []).append(v)
    return tuple((k, tuple(v)) for k, v in params.items())


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _item(raw_name: bytes, raw_value: bytes, limits: Limits) -> tuple[str, str, str]:
    """One header checked on its own: (lower name, name, value without surrounding blanks)."""
    try:
        name = raw_name.decode("ascii")
        value = raw_value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PepError("sanitize.bad_header", "header is not ASCII/UTF-8") from exc
    if not _TOKEN.fullmatch(name):
        raise PepError("sanitize.bad_header", "invalid header name")
    if "\x00" in value or "\r" in value or "\n" in value:
        raise PepError("sanitize.bad_header", f"NUL, CR or LF in the value of {name}")
    if len(name) + len(value) > limits.max_header_bytes:
        raise PepError("sanitize.headers_too_large", f"header {name} is too large")
    return name.lower(), name, value.strip(" \t")


def block_of(raw: tuple[tuple[bytes, bytes], ...]) -> tuple[int, int, frozenset[str]]:
    """What :func:`check_more_headers` needs of a block :func:`check_headers` passed: its
    bytes as ``limits.max_total_header_bytes`` counts them, its number of headers, and the
    names its ``Connection`` header lists."""
    size = sum(len(name) + len(value) + 4 for name, value in raw)
    named = connection_named(v.decode("utf-8") for k, v in raw if k.lower() == b"connection")
    return size, len(raw), named


def connection_named(values: Iterable[str]) -> frozenset[str]:
    """The names the ``Connection`` header's values list: hop-by-hop for this hop only."""
    return frozenset(token.strip().lower() for v in values for token in v.split(",") if token.strip())


def _dropped(low: str, named: frozenset[str], owned: set[str] | frozenset[str], rules: Sanitize) -> bool:
    """Whether the upstream never sees a client header of this (lower-case) name."""
    if low in HOP_BY_HOP or low in named:
        return True
    if low in owned or low.startswith(rules.strip_header_prefixes):
        return True  # strip before routing, or a client could speak for the PEP
    # X_Forwarded_For becomes X-Forwarded-For in CGI-style stacks
    return "_" in low and not rules.allow_underscore_headers


def check_headers(
    raw: Iterable[tuple[bytes, bytes]], rules: Sanitize, limits: Limits, also_owned: frozenset[str] = frozenset()
) -> Headers:
    """Check the client's headers and split them; raise PepError on ambiguity."""
    items: list[tuple[str, str, str]] = []  # (lower name, name, value)
    total = 0
    for raw_name, raw_value in raw:
        total += len(raw_name) + len(raw_value) + 4
        if total > limits.max_total_header_bytes:
            raise PepError("sanitize.headers_too_large", "request headers too large in total")
        items.append(_item(raw_name, raw_value, limits))
    if len(items) > limits.max_headers:
        raise PepError("sanitize.headers_too_large", "too many headers")

    def values(lname: str) -> list[str]:
        return [v for low, _, v in items if low == lname]

    hosts = values("host")
    if len(hosts) != 1:
        raise PepError("sanitize.duplicate_header", "exactly one Host header is required")
    host_value = hosts[0].lower()
    if not _HOST.fullmatch(host_value):
        raise PepError("sanitize.bad_header", "malformed Host header")
    host, port = _split_host(host_value)

    lengths, encodings = values("content-length"), values("transfer-encoding")
    if lengths and encodings:
        raise PepError("sanitize.framing", "Content-Length together with Transfer-Encoding")
    if len(lengths) > 1 or len(encodings) > 1:
        raise PepError("sanitize.framing", "repeated framing header")
    content_length: int | None = None
    if lengths:
        if not lengths[0].isdigit() or not lengths[0].isascii():
            raise PepError("sanitize.framing", "Content-Length is not a number")
        content_length = int(lengths[0])
    chunked = False
    if encodings:
        if encodings[0].lower() != "chunked":
            raise PepError("sanitize.framing", "only Transfer-Encoding: chunked is accepted")
        chunked = True

    expects = values("expect")
    if len(expects) > 1 or (expects and expects[0].lower() != "100-continue"):
        raise PepError("sanitize.expectation", "only Expect: 100-continue is understood")

    auth = values("authorization")
    if len(auth) > 1:
        raise PepError("sanitize.duplicate_header", "more than one Authorization header")

    # Dropping the names listed in Connection cannot remove a PEP header: those are
    # added after this step.
    named = connection_named(values("connection"))
    owned = set(rules.strip_headers) | also_owned
    policy_names = set(rules.policy_headers)
    forward: list[tuple[str, str]] = []
    policy: dict[str, list[str]] = {}
    for low, name, value in items:
        if _dropped(low, named, owned, rules):
            continue
        forward.append((name, value))
        if low in policy_names:
            policy.setdefault(low, []).append(value)
    for low in ("content-length",):
        if low in policy_names and content_length is not None:
            policy[low] = [str(content_length)]
    return Headers(
        host=host,
        port=port,
        forward=tuple(forward),
        policy=tuple((k, tuple(v)) for k, v in policy.items()),
        authorization=auth[0] if auth else None,
        content_length=content_length,
        chunked=chunked,
        expect_continue=bool(expects),
    )


def check_more_headers(
    raw: Iterable[tuple[bytes, bytes]],
    rules: Sanitize,
    limits: Limits,
    block: tuple[int, int, frozenset[str]],
    also_owned: frozenset[str] = frozenset(),
) -> tuple[tuple[str, str], ...]:
    """Headers that came beside a block :func:`check_headers` already passed: what the
    upstream may see of them.

    ``block`` is that block's :func:`block_of`.  Each header is checked as :func:`check_headers` checks
    it, the limits count both parts, and the same names are dropped; none of them may be
    one the checks above read (Host, the framing, Expect, Authorization, Connection: the
    memo's configuration refuses those names).
    """
    total, count, named = block
    owned = set(rules.strip_headers) | also_owned
    forward: list[tuple[str, str]] = []
    for raw_name, raw_value in raw:
        total += len(raw_name) + len(raw_value) + 4
        if total > limits.max_total_header_bytes:
            raise PepError("sanitize.headers_too_large", "request headers too large in total")
        low, name, value = _item(raw_name, raw_value, limits)
        count += 1
        if not _dropped(low, named, owned, rules):
            forward.append((name, value))
    if count > limits.max_headers:
        raise PepError("sanitize.headers_too_large", "too many headers")
    return tuple(forward)


def _split_host(value: str) -> tuple[str, int | None]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.partition(":")
    host = host.rstrip(".")
    if port:
        number = int(port)
        if number > 65535:
            raise PepError("sanitize.bad_header", "malformed Host header")
        return host, number
    return host, None
