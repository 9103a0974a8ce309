"""Envoy's ``x-forwarded-client-cert`` (XFCC): emitted to upstreams, believed from trusted proxies only.

The format (Envoy's HTTP header manipulation docs): the value is a ``,``
separated list of *elements*, one per proxy that handled the request, the
last appended by the nearest one.  An element is a ``;`` separated list of
``Key=Value`` pairs; keys are case-insensitive (``By``, ``Hash``, ``Cert``,
``Chain``, ``Subject``, ``URI``, ``DNS``), values case-sensitive, and a value
holding ``,`` ``;`` ``=`` or ``"`` is double-quoted with ``"`` escaped as
``\\"``.  ``URI`` and ``DNS`` repeat, one pair per SAN.

**Emitting** (``upstreams.<name>.xfcc: true``): the PEP sets one element that
describes the client it identified — ``By`` (``xfcc.by``, the PEP's own URI),
``Hash`` (SHA-256 of the client certificate, hex), ``Subject``, ``URI``,
``DNS`` — replacing whatever the client sent (Envoy's ``SANITIZE_SET``).

**Accepting** (``xfcc.trusted_proxies``): only on a connection whose own
verified client certificate is one of the configured front proxies (by SPIFFE
ID or SHA-256 thumbprint).  The value must hold exactly one element unless
``xfcc.require_single_element`` is false (a proxy that appends passes on what
its client wrote).  Then the *last* element — the one that proxy
appended — describes the real client and becomes the connection's peer for
everything after (authentication, posture binding, policy input, audit); a
request from the proxy without XFCC has no client certificate at all (the
proxy is a conduit, never a principal).  From anyone else the header is
stripped unread, like every header the PEP owns.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..config.models import Xfcc as XfccConfig
from ..errors import PepError
from .request import CertificateRefused, Connection, PeerCertificate, parse_peer

HEADER = "x-forwarded-client-cert"
_HASH = re.compile(r"^[0-9a-f]{64}$")
_KEYS = {"by": "By", "hash": "Hash", "cert": "Cert", "chain": "Chain", "subject": "Subject", "uri": "URI", "dns": "DNS"}
_MAX_ELEMENTS = 16


class XfccError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Element:
    """One proxy's account of the client certificate it saw."""

    by: tuple[str, ...] = ()
    hash: str | None = None
    cert: str | None = None  # URL-encoded PEM
    subject: str | None = None
    uri: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes; a backslash escapes the next character inside them."""
    parts, start, quoted, escaped = [], 0, False, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    if quoted or escaped:
        raise XfccError("unterminated quoted value")
    parts.append(text[start:])
    return parts


def _unquote(value: str) -> str:
    if not value.startswith('"'):
        if '"' in value or "\\" in value:
            raise XfccError("a quote inside an unquoted value")
        return value
    if len(value) < 2 or not value.endswith('"'):
        raise XfccError("text after a quoted value")
    inner = value[1:-1]
    out, i = [], 0
    while i < len(inner):
        ch = inner[i]
        if ch == "\\":
            out.append(inner[i + 1])  # _split guarantees a character follows
            i += 2
            continue
        if ch == '"':
            raise XfccError("text after a quoted value")
        out.append(ch)
        i += 1
    return "".join(out)


def parse(value: str) -> list[Element]:
    """Every element of an XFCC value, first (farthest proxy) to last; XfccError if malformed."""
    elements = []
    raw_elements = _split(value, ",")
    if len(raw_elements) > _MAX_ELEMENTS:
        raise XfccError("too many elements")
    for raw in raw_elements:
        fields: dict[str, list[str]] = {}
        for pair in _split(raw.strip(), ";"):
            key, eq, val = pair.strip().partition("=")
            name = _KEYS.get(key.strip().lower())
            if not eq or not key.strip():
                raise XfccError("a pair without '='")
            if name is None:
                continue  # a key this PEP does not know: ignored, as Envoy's readers do
            fields.setdefault(name, []).append(_unquote(val.strip()))
        for single in ("Hash", "Cert", "Subject"):
            if len(fields.get(single, [])) > 1:
                raise XfccError(f"{single} appears twice in one element")
        digest = fields.get("Hash", [None])[0]
        if digest is not None and not _HASH.fullmatch(digest.lower()):
            raise XfccError("Hash is not a hex SHA-256")
        elements.append(
            Element(
                by=tuple(fields.get("By", ())),
                hash=digest.lower() if digest else None,
                cert=fields.get("Cert", [None])[0],
                subject=fields.get("Subject", [None])[0],
                uri=tuple(fields.get("URI", ())),
                dns=tuple(fields.get("DNS", ())),
            )
        )
    return elements


def _quote(value: str) -> str:
    if any(c in value for c in ',;="\\'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def emit(peer: PeerCertificate, by: str | None) -> str:
    """The element describing ``peer`` (pure); Subject always quoted, as Envoy writes it."""
    pairs = [f"By={_quote(by)}"] if by else []
    pairs.append(f"Hash={peer.sha256}")
    if peer.subject:
        pairs.append('Subject="' + peer.subject.replace("\\", "\\\\").replace('"', '\\"') + '"')
    pairs.extend(f"URI={_quote(u)}" for u in peer.uri_sans)
    pairs.extend(f"DNS={_quote(d)}" for d in peer.dns_sans)
    return ";".join(pairs)


def trusted(cfg: XfccConfig, proxy: PeerCertificate) -> bool:
    """Whether this verified peer is one of the configured front proxies."""
    for front in cfg.trusted_proxies:
        if front.spiffe_id is not None and proxy.spiffe_id == front.spiffe_id:
            return True
        if front.sha256 is not None and proxy.sha256 == front.sha256:
            return True
    return False


def forwarded_peer(element: Element, proxy: PeerCertificate, *, require_client_auth_eku: bool) -> PeerCertificate:
    """The client certificate a trusted proxy describes, as data; XfccError if it does not hold together."""
    if element.hash is None:
        raise XfccError("the element has no Hash")
    if proxy.uri_sans and not element.by:
        raise XfccError("the element has no By although the proxy has a URI SAN")
    if element.by and not set(element.by) <= set(proxy.uri_sans):
        # By names the proxy that appended the element: anything else was forwarded from
        # farther out (a proxy in FORWARD_ONLY mode), not vouched for by this one.
        raise XfccError("By does not name the proxy that sent it")
    if element.cert is not None:
        try:
            cert = x509.load_pem_x509_certificate(unquote(element.cert).encode())
        except ValueError as exc:
            raise XfccError("Cert is not a PEM certificate") from exc
        der = cert.public_bytes(Encoding.DER)
        if hashlib.sha256(der).hexdigest() != element.hash:
            raise XfccError("Cert does not match Hash")
        try:
            return parse_peer(der, require_client_auth_eku=require_client_auth_eku)
        except CertificateRefused as exc:
            raise XfccError(str(exc)) from exc
    spiffe = [u for u in element.uri if u.lower().startswith("spiffe://")]
    if len(spiffe) > 1:
        raise XfccError("more than one SPIFFE ID")
    digest = bytes.fromhex(element.hash)
    return PeerCertificate(
        subject=element.subject or "",
        issuer="",  # not carried without Cert; the proxy verified it
        common_name=_common_name(element.subject),
        dns_sans=element.dns,
        uri_sans=element.uri,
        spiffe_id=spiffe[0] if spiffe else None,
        sha256=element.hash,
        x5t_s256=base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"),
        serial="",
        # Without the certificate its validity is the proxy's to check; bounded by the proxy's own.
        not_before=proxy.not_before,
        not_after=proxy.not_after,
        valid_from=proxy.valid_from,
        valid_until=proxy.valid_until,
    )


def _common_name(subject: str | None) -> str | None:
    if not subject:
        return None
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError:
        return None
    cns = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else None


def accept(
    cfg: XfccConfig, conn: Connection, raw_headers: Iterable[tuple[bytes, bytes]], *, require_client_auth_eku: bool
) -> Connection:
    """The connection as seen through a trusted front proxy; unchanged for anyone else."""
    proxy = conn.peer
    if proxy is None or not cfg.trusted_proxies or not trusted(cfg, proxy):
        return conn  # the header is stripped by sanitize, never read
    wanted = HEADER.encode()
    values = [v.decode("utf-8", "replace") for k, v in raw_headers if k.lower() == wanted]
    if not values:
        return dataclasses.replace(conn, peer=None, forwarded_by=proxy)
    try:
        elements = parse(",".join(values))  # repeated headers are one list (RFC 9110 §5.3)
        if cfg.require_single_element and len(elements) > 1:
            raise XfccError("more than one element: the front proxy must replace, not append (SANITIZE_SET)")
        peer = forwarded_peer(elements[-1], proxy, require_client_auth_eku=require_client_auth_eku)
    except XfccError as exc:
        raise PepError("sanitize.bad_xfcc", f"x-forwarded-client-cert from the front proxy: {exc}") from exc
    return dataclasses.replace(conn, peer=peer, forwarded_by=proxy)
