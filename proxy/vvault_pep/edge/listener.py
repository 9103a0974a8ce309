"""Listener: TLS termination and the client certificate as data.

The TLS context trusts only the configured CA bundle (``PROTOCOL_TLS_SERVER``
loads no system CAs, unlike ``ssl.create_default_context``), refuses TLS
renegotiation and anything below TLS 1.2.  OpenSSL verifies the chain,
validity and — where the extension is present — the clientAuth EKU during the
handshake.  Two rules OpenSSL does not enforce for a leaf are checked the
moment the handshake completes, before any HTTP byte is read: the leaf must
carry the clientAuth EKU (absence is not enough) and must not be a CA.  A
connection that fails them is aborted.

Revocation (``tls.crl_file``) is OpenSSL's own CRL check, so a revoked
certificate fails the handshake itself; a CRL past its ``nextUpdate`` makes
OpenSSL refuse every certificate it covers (fail closed), and
:func:`crl_status` lets readiness and metrics say so.  A certificate with a
``spiffe://`` URI SAN must be a valid X.509-SVID (exactly one URI SAN, a SPIFFE
ID by the spec, of a configured trust domain) or the connection is refused
before any HTTP byte, whatever the route would require.

No session is ever resumed, by session ID or ticket, on TLS 1.2 or 1.3: a
resumed session skips certificate verification — and with it revocation.

The verified certificate becomes a :class:`~vvault_pep.core.request.PeerCertificate`; nothing a client
writes in a header can stand in for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import logging
import re
import ssl
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from ..config.models import ListenerTls
from ..config.tls import read_crls
from ..core.request import CertificateRefused, Connection, PeerCertificate, parse_peer

log = logging.getLogger("vvault_pep.listener")
_T = TypeVar("_T")


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no system CAs are loaded
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # No session resumption: a resumed session skips certificate verification, so a
    # certificate that expired, was replaced or revoked would keep working for hours.
    # Tickets (1.2 and 1.3) are off here; session IDs and 1.3's stateful tickets
    # need the server's session cache, switched off below.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    if not disable_session_cache(ctx):
        log.warning("cannot switch off the TLS session cache: resumed sessions will be dropped instead")
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2: forward secrecy, AEAD only
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    ctx.load_verify_locations(cafile=str(tls.client_ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if tls.crl_file:
        load_crls(ctx, tls.crl_file)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN if tls.crl_check == "chain" else ssl.VERIFY_CRL_CHECK_LEAF
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_OFF = 0


def disable_session_cache(ctx: ssl.SSLContext) -> bool:
    """``SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF)``; True when it holds.

    The standard library offers no setter, so the call goes to the libssl that
    ``_ssl`` is linked with; the ``SSL_CTX *`` is the first field after the
    object header of CPython's ``SSLContext``.  When this cannot be done, the
    listener still drops every resumed session (see :meth:`MtlsServer.connection_made`).
    """
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        ctrl = lib.SSL_CTX_ctrl
        ctrl.restype = ctypes.c_long
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer:
            return False
        ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
        return bool(ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) == _SSL_SESS_CACHE_OFF)
    except (OSError, AttributeError, ValueError):
        return False


def load_crls(ctx: ssl.SSLContext, files: Iterable[Any]) -> None:
    """Add the CRLs to the context's store (OpenSSL prefers the newest per issuer)."""
    for path in files:
        read_crls(path)  # a clear error for a file OpenSSL would only call "no certificate or crl"
        ctx.load_verify_locations(cafile=str(path))


@dataclass(frozen=True, slots=True)
class CrlStatus:
    file: str
    issuer: str
    next_update: dt.datetime | None

    def fresh_at(self, when: dt.datetime) -> bool:
        return self.next_update is not None and when < self.next_update


def crl_status(files: Iterable[Any]) -> list[CrlStatus]:
    """nextUpdate of every CRL in ``files``; an unreadable file counts as stale."""
    out: list[CrlStatus] = []
    for path in files:
        try:
            crls = read_crls(path)
        except (OSError, ValueError):
            out.append(CrlStatus(str(path), "", None))
            continue
        for crl in crls:
            out.append(CrlStatus(str(path), crl.issuer.rfc4514_string(), crl.next_update_utc))
    return out


_UPPER_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Z-]+")


class _StrictPyParser(HttpRequestParserPy):
    """aiohttp's pure-Python parser, refusing what llhttp refuses: a method not in upper case.

    (It would upper-case ``get`` into ``GET``; the C parser answers 400.)  Only used when
    ``serve --allow-python-http-parser`` runs without the C extension.
    """

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        method = lines[0].split(b" ", 1)[0] if lines else b""
        if not _UPPER_TOKEN.fullmatch(method):
            raise BadHttpMethod(method.decode("latin-1"))
        return super().parse_message(lines)


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler, for what its HTTP parser finds wrong.

    A body in flight that the parser finds broken is failed (not left waiting), and a
    request the parser refuses is answered by :meth:`refusal` with its status: 400,
    413, or 431 for an oversized line.  The data listener's handler and the admin
    listener's are both one, each answering in its own shape.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if type(exc).__name__ == "LineTooLong":
            status = 431  # RFC 6585
        return self.refusal(status, exc)

    def refusal(self, status: int, exc: BaseException | None) -> web.StreamResponse:
        raise NotImplementedError

    def peer_ip(self) -> str | None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return peer[0] if peer else None

    def data_received(self, data: bytes) -> None:
        before = len(self._messages)
        super().data_received(data)
        current = self._current_request
        if current is None or len(self._messages) <= before:
            return
        # aiohttp queues a parse error found *inside* a body (a bad chunk after good
        # ones) as the next message and leaves the current body waiting forever:
        # fail the body now, so the request in flight ends instead of hanging.
        for message, _payload in list(self._messages)[before:]:
            if type(message).__name__ == "_ErrInfo":
                content = current.content
                if not content.is_eof():
                    content.set_exception(ValueError("malformed request body"))
                return


class _Handler(GuardedHandler):
    """The data listener's connection handler, answering its own parse errors as problem+json."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memo: Any = None  # the pipeline's memo of this connection's requests: dies with it
        if type(self._parser) is HttpRequestParserPy:
            self._parser.__class__ = _StrictPyParser  # same state, one stricter check

    def refusal(self, status: int, exc: BaseException | None) -> web.StreamResponse:
        # Requests the HTTP parser refused (duplicate Host or Content-Length,
        # bad chunking, oversized lines…) never reach the pipeline: answer them
        # here, in the same shape, without echoing the parser's message.
        from ..core.problem import problem_body
        from ..errors import STATUS, Refusal

        code = {413: "sanitize.body_too_large", 431: "sanitize.headers_too_large", 400: "sanitize.malformed"}.get(
            status, "internal.error"
        )
        text = str(exc) if exc is not None else ""
        if code == "sanitize.malformed" and ("Duplicate" in text or "Missing 'Host'" in text):
            code = "sanitize.duplicate_header"  # same answer as the pipeline's own check
        request_id = uuid.uuid4().hex
        log.warning("request refused by the HTTP parser", extra={"why": type(exc).__name__ if exc else str(status)})
        refusal = Refusal(code, STATUS[code][0], STATUS[code][1], STATUS[code][1])
        resp = web.Response(
            status=refusal.status,
            body=problem_body(refusal, request_id=request_id, decision_id=None),
            content_type="application/problem+json",
        )
        resp.headers["X-Request-Id"] = request_id
        resp.headers["Server"] = "vvault-pep"
        resp.force_close()
        manager = self._manager
        if isinstance(manager, MtlsServer) and manager.on_refusal is not None:
            # These requests never reach the pipeline: they still go on record.
            manager.on_refusal(
                {
                    "request_id": request_id,
                    "source_ip": self.peer_ip(),
                    "status": refusal.status,
                    "result": {"allow": False, "status": refusal.status, "code": code, "reasons": [refusal.title]},
                }
            )
        return resp


class MtlsServer(web.Server):
    """aiohttp's low-level server, checking the peer before reading any request."""

    def __init__(
        self,
        *args: Any,
        require_client_auth_eku: bool = True,
        trust_domains: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._require_eku = require_client_auth_eku
        self._trust_domains = trust_domains
        self.refused_certificates = 0
        self.refused_resumptions = 0
        self._conns: dict[RequestHandler, Connection] = {}
        self.on_refusal: Callable[[dict[str, Any]], None] | None = None

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            transport.abort()
            return
        if ssl_object.session_reused:
            # Never expected (the session cache is off); if it happens, the chain
            # and revocation checks were skipped: refuse the connection.
            self.refused_resumptions += 1
            log.warning("resumed TLS session refused", extra={"peer": str(transport.get_extra_info("peername"))})
            transport.abort()
            return
        peer: PeerCertificate | None = None
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            try:
                peer = parse_peer(der, require_client_auth_eku=self._require_eku, trust_domains=self._trust_domains)
            except (CertificateRefused, ValueError) as exc:
                self.refused_certificates += 1
                peername = transport.get_extra_info("peername")
                log.warning("client certificate refused", extra={"peer": str(peername), "why": str(exc)})
                transport.abort()
                return
        cipher = ssl_object.cipher()
        self._conns[handler] = Connection(
            tls_version=ssl_object.version(),
            cipher=cipher[0] if cipher else None,
            alpn=ssl_object.selected_alpn_protocol(),
            peer=peer,
        )

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._conns.pop(handler, None)
        if isinstance(handler, _Handler):
            handler.memo = None
        super().connection_lost(handler, exc)

    def connection_of(self, request: web.BaseRequest) -> Connection | None:
        return self._conns.get(request.protocol)

    def memo_of(self, request: web.BaseRequest, make: Callable[[], _T]) -> _T | None:
        """The request's connection's own memo (made on first use); None for a connection
        this server did not verify.  It lives on the connection and ends with it: one
        connection's memo is never another's."""
        handler = request.protocol
        if not isinstance(handler, _Handler) or handler not in self._conns:
            return None
        memo = handler.memo
        if memo is None:
            memo = handler.memo = make()
        return cast(_T, memo)
