"""The listener, function by function: the TLS context it builds and the door it keeps.

Each test starts its own :class:`~vvault_pep.edge.listener.MtlsServer` in this process on a
real TLS socket, with the test PKI's certificates, and talks to it over loopback: what the
server makes of the connection (TLS version, ALPN, the peer certificate), which certificates
and resumed sessions it refuses and counts, and how it answers what aiohttp's parser refuses
or a handler that fails — status, problem body, headers, the audit record, the log line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import HttpRequestParserPy
from cryptography import x509
from tests.support import client_context, config_doc, make_config

from vvault_pep.config import Config
from vvault_pep.edge import listener
from vvault_pep.edge.listener import CrlStatus, MtlsServer, crl_status, disable_session_cache, server_context

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _tls(pki: Path, **tls: Any) -> Any:
    doc = config_doc(pki, opa_url="http://127.0.0.1:1", upstream_port=1, listener={"tls": tls} if tls else None)
    return Config.model_validate(doc).listener.tls


@dataclass
class Door:
    server: MtlsServer
    port: int
    records: list[dict[str, Any]] = field(default_factory=list)


async def _echo(server: MtlsServer, request: web.BaseRequest) -> web.StreamResponse:
    conn = server.connection_of(request)
    await request.read()
    peer = conn.peer if conn is not None else None
    return web.json_response(
        {
            "tls": conn.tls_version if conn else None,
            "alpn": conn.alpn if conn else None,
            "cipher": conn.cipher if conn else None,
            "subject": peer.subject if peer else None,
            "spiffe": peer.spiffe_id if peer else None,
        }
    )


@asynccontextmanager
async def door(
    pki: Path,
    handler: Handler | None = None,
    *,
    ctx: ssl.SSLContext | None = None,
    record: bool = True,
    **kwargs: Any,
) -> AsyncIterator[Door]:
    ctx = ctx or server_context(make_config(pki, opa_url="http://127.0.0.1:1", upstream_port=1).listener.tls)
    holder: list[MtlsServer] = []

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if handler is not None:
            return await handler(request)
        return await _echo(holder[0], request)

    server = MtlsServer(handle, access_log=None, **kwargs)
    holder.append(server)
    d = Door(server, 0)
    if record:
        server.on_refusal = d.records.append
    tcp = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0, ssl=ctx)
    d.port = tcp.sockets[0].getsockname()[1]
    try:
        yield d
    finally:
        tcp.close()
        await server.shutdown(1)
        await tcp.wait_closed()


async def exchange(port: int, data: bytes, ctx: ssl.SSLContext) -> bytes:
    """Bytes as given over TLS; everything the server sends until it closes."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        try:
            writer.write(data)
            await writer.drain()
            return await reader.read(-1)
        finally:
            writer.close()


async def shut_out(port: int, ctx: ssl.SSLContext) -> bool:
    """Whether the connection ended without an answer (a failed handshake or an abort after it)."""
    try:
        return await exchange(port, GET, ctx) == b""
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def reader_ctx(pki: Path, name: str = "reader") -> ssl.SSLContext:
    ctx = client_context(pki, name)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


GET = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


# --- the TLS context -------------------------------------------------------------


def test_the_context_adds_its_options_to_openssls_defaults(pki: Path) -> None:
    ctx = server_context(_tls(pki))
    defaults = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for option in (
        ssl.OP_NO_RENEGOTIATION,
        ssl.OP_NO_COMPRESSION,
        ssl.OP_CIPHER_SERVER_PREFERENCE,
        ssl.OP_NO_TICKET,
    ):
        assert ctx.options & option == option, option
    assert ctx.options & defaults.options == defaults.options  # e.g. OP_NO_SSLv3 kept
    assert ctx.verify_flags == defaults.verify_flags | ssl.VERIFY_X509_STRICT
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("tls", "minimum", "mode"),
    [
        ({"min_version": "1.3"}, ssl.TLSVersion.TLSv1_3, ssl.CERT_REQUIRED),
        ({"min_version": "1.2", "client_auth": "optional"}, ssl.TLSVersion.TLSv1_2, ssl.CERT_OPTIONAL),
    ],
)
def test_min_version_and_client_auth_come_from_config(
    pki: Path, tls: dict[str, str], minimum: ssl.TLSVersion, mode: ssl.VerifyMode
) -> None:
    ctx = server_context(_tls(pki, **tls))
    assert (ctx.minimum_version, ctx.verify_mode) == (minimum, mode)


@pytest.mark.parametrize(
    ("check", "flag"), [("chain", ssl.VERIFY_CRL_CHECK_CHAIN), ("leaf", ssl.VERIFY_CRL_CHECK_LEAF)]
)
def test_the_crl_check_is_leaf_or_chain_as_configured(pki: Path, check: str, flag: ssl.VerifyFlags) -> None:
    ctx = server_context(_tls(pki, crl_file=str(pki / "crl.pem"), crl_check=check))
    defaults = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).verify_flags
    assert ctx.verify_flags == defaults | ssl.VERIFY_X509_STRICT | flag


def test_no_warning_when_the_session_cache_is_switched_off(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vvault_pep.listener"):
        server_context(_tls(pki))
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.listener"] == []


def test_without_libssl_at_hand_the_session_cache_is_reported_on(
    pki: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where `_ssl` is not a shared library (a static build), libssl cannot be called.
    monkeypatch.delattr(ssl._ssl, "__file__")  # type: ignore[attr-defined]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert disable_session_cache(ctx) is False
    with caplog.at_level(logging.WARNING, logger="vvault_pep.listener"):
        server_context(_tls(pki))
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.listener"] == [
        "cannot switch off the TLS session cache: resumed sessions will be dropped instead"
    ]


class _NoContext:
    """An object whose first field after the header is NULL, where an SSLContext keeps its SSL_CTX."""

    __slots__ = ("unset",)


def test_a_null_ssl_ctx_is_never_reported_switched_off() -> None:
    assert disable_session_cache(_NoContext()) is False


async def test_alpn_selects_http_1_1(pki: Path) -> None:
    async with door(pki) as d:
        status, _, body = split(await exchange(d.port, GET, reader_ctx(pki)))
    doc = orjson.loads(body)
    assert (status, doc["alpn"], doc["tls"], doc["subject"], doc["spiffe"]) == (
        200,
        "http/1.1",
        "TLSv1.3",
        "CN=demo-reader,O=vvault-pep demo",
        "spiffe://demo.vvault/client/reader",
    )
    assert doc["cipher"].startswith("TLS_")


# --- CRL status --------------------------------------------------------------------


def test_crl_status_names_each_file_its_issuer_and_next_update(pki: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone.pem"
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert crl_status([missing, pki / "crl.pem"]) == [
        CrlStatus(str(missing), "", None),  # unreadable: stale, and the next file is still read
        CrlStatus(str(pki / "crl.pem"), "CN=vvault demo CA,O=vvault-pep demo", crl.next_update_utc),
    ]
    assert crl.next_update_utc is not None


@pytest.mark.parametrize(
    ("next_update", "fresh"),
    [
        (None, False),
        (dt.datetime(2030, 1, 1, 0, 0, 1, tzinfo=dt.UTC), True),
        (dt.datetime(2030, 1, 1, tzinfo=dt.UTC), False),  # nextUpdate itself is no longer fresh
        (dt.datetime(2029, 12, 31, tzinfo=dt.UTC), False),
    ],
)
def test_a_crl_is_fresh_strictly_before_its_next_update(next_update: dt.datetime | None, fresh: bool) -> None:
    assert CrlStatus("f", "i", next_update).fresh_at(dt.datetime(2030, 1, 1, tzinfo=dt.UTC)) is fresh


# --- who may come in ------------------------------------------------------------------


async def test_the_client_auth_eku_is_required_by_default_and_refusals_are_counted(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with door(pki) as d:
        assert (d.server.refused_certificates, d.server.refused_resumptions) == (0, 0)
        with caplog.at_level(logging.WARNING, logger="vvault_pep.listener"):
            assert await shut_out(d.port, reader_ctx(pki, "no-eku"))
            assert await shut_out(d.port, reader_ctx(pki, "bad-spiffe"))
        assert d.server.refused_certificates == 2
        assert split(await exchange(d.port, GET, reader_ctx(pki)))[0] == 200
        assert d.server.refused_certificates == 2
    logged = [r for r in caplog.records if r.name == "vvault_pep.listener"]
    assert [r.getMessage() for r in logged] == ["client certificate refused"] * 2
    assert logged[0].why == "leaf certificate has no extendedKeyUsage"  # type: ignore[attr-defined]
    assert logged[1].why.startswith("malformed SPIFFE ID: ")  # type: ignore[attr-defined]
    assert all(r.peer.startswith("('127.0.0.1', ") for r in logged)  # type: ignore[attr-defined]


async def test_without_the_eku_rule_a_certificate_without_eku_comes_in(pki: Path) -> None:
    async with door(pki, require_client_auth_eku=False) as d:
        status, _, body = split(await exchange(d.port, GET, reader_ctx(pki, "no-eku")))
        assert (status, orjson.loads(body)["subject"]) == (200, "CN=no-eku,O=vvault-pep demo")
        assert d.server.refused_certificates == 0


async def test_trust_domains_are_checked_at_the_door(pki: Path) -> None:
    async with door(pki, trust_domains=("demo.vvault",)) as d:
        status, _, body = split(await exchange(d.port, GET, reader_ctx(pki)))
        assert (status, orjson.loads(body)["spiffe"]) == (200, "spiffe://demo.vvault/client/reader")
        assert await shut_out(d.port, reader_ctx(pki, "foreign"))
        assert d.server.refused_certificates == 1


async def test_a_connection_without_tls_is_dropped(pki: Path) -> None:
    server = MtlsServer(lambda request: _echo(server, request), access_log=None)
    tcp = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        port = tcp.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET)
        async with asyncio.timeout(10):
            assert await reader.read(-1) == b""
        writer.close()
    finally:
        tcp.close()
        await tcp.wait_closed()


def _resume(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        data = b""
        try:
            tls.sendall(GET)
            while chunk := tls.recv(65536):
                data += chunk
        except (ssl.SSLError, ConnectionError):
            pass
        return data, tls.session


async def test_a_resumed_session_is_refused_counted_and_logged(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A server context that does resume (OpenSSL's defaults): the listener still drops it.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server-key.pem"))
    ctx.load_verify_locations(cafile=str(pki / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    client = client_context(pki, "reader")
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is known right after the handshake
    async with door(pki, ctx=ctx) as d:
        first, session = await asyncio.to_thread(_resume, d.port, client, None)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert session is not None
        with caplog.at_level(logging.WARNING, logger="vvault_pep.listener"):
            for _ in range(2):
                again, _ = await asyncio.to_thread(_resume, d.port, client, session)
                assert again == b""
        assert (d.server.refused_resumptions, d.server.refused_certificates) == (2, 0)
    logged = [r for r in caplog.records if r.name == "vvault_pep.listener"]
    assert [r.getMessage() for r in logged] == ["resumed TLS session refused"] * 2
    assert all(r.peer.startswith("('127.0.0.1', ") for r in logged)  # type: ignore[attr-defined]


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_nothing_of_a_connection_is_kept_after_it_ends(pki: Path) -> None:
    async with door(pki) as d:
        assert split(await exchange(d.port, GET, reader_ctx(pki)))[0] == 200
        assert await shut_out(d.port, reader_ctx(pki, "no-eku"))  # never got a record
        assert split(await exchange(d.port, GET, reader_ctx(pki)))[0] == 200
        await _until(lambda: not d.server.connections and not d.server._conns)
        assert d.server.refused_certificates == 1


async def test_the_servers_http_limits_are_its_own(pki: Path) -> None:
    async with door(pki, max_field_size=100) as d:
        long = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 200 + b"\r\nConnection: close\r\n\r\n"
        assert split(await exchange(d.port, long, reader_ctx(pki)))[0] == 431
        short = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 50 + b"\r\nConnection: close\r\n\r\n"
        assert split(await exchange(d.port, short, reader_ctx(pki)))[0] == 200


# --- what the parser refuses, and a failing handler --------------------------------


REFUSED = [
    ("request line too long", b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "LineTooLong"),
    ("header too long", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 400 + b"\r\n\r\n", 431, "LineTooLong"),
    (
        "too many headers",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n",
        400,
        "BadHttpMessage",
    ),
    (
        "two Content-Lengths",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
        400,
        "BadHttpMessage",
    ),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "BadHttpMessage"),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400, "BadHttpMessage"),
    (
        "bad chunk size",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "BadHttpMessage",
    ),
    ("lower-case method", b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "BadHttpMethod"),
]
CODES = {
    "request line too long": "sanitize.headers_too_large",
    "header too long": "sanitize.headers_too_large",
    "too many headers": "sanitize.malformed",
    "two Content-Lengths": "sanitize.duplicate_header",
    "two Hosts": "sanitize.duplicate_header",
    "no Host": "sanitize.duplicate_header",
    "bad chunk size": "sanitize.malformed",
    "lower-case method": "sanitize.malformed",
}
TITLES = {
    "sanitize.headers_too_large": "Request headers too large",
    "sanitize.malformed": "Malformed request",
    "sanitize.duplicate_header": "Duplicate header",
    "internal.error": "Internal error",
}


def _problem_checks(answer: bytes, status: int, code: str) -> str:
    got, headers, body = split(answer)
    doc = orjson.loads(body)
    request_id = doc["request_id"]
    assert got == status
    assert doc == {
        "type": f"https://vvault-pep.dev/problems/{code}",
        "title": TITLES[code],
        "status": status,
        "detail": TITLES[code],
        "code": code,
        "request_id": request_id,
    }
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    assert headers["content-type"] == "application/problem+json"
    assert headers["x-request-id"] == request_id
    assert headers["server"] == "vvault-pep"
    return str(request_id)


def _record(request_id: str, status: int, code: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "source_ip": "127.0.0.1",
        "status": status,
        "result": {"allow": False, "status": status, "code": code, "reasons": [TITLES[code]]},
    }


@pytest.mark.parametrize(("case", "data", "status", "why"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_a_request_the_parser_refuses_gets_a_problem_and_a_record(
    pki: Path, caplog: pytest.LogCaptureFixture, case: str, data: bytes, status: int, why: str
) -> None:
    code = CODES[case]
    async with door(pki, max_line_size=200, max_field_size=300, max_headers=10) as d:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.listener"):
            answer = await exchange(d.port, data, reader_ctx(pki))
        request_id = _problem_checks(answer, status, code)
        assert d.records == [_record(request_id, status, code)]
    logged = [r for r in caplog.records if r.name == "vvault_pep.listener"]
    assert [r.getMessage() for r in logged] == ["request refused by the HTTP parser"]
    assert logged[0].why == why  # type: ignore[attr-defined]  # the exception's class, never its text


async def test_the_refusal_closes_the_connection(pki: Path) -> None:
    async with door(pki, max_headers=10) as d:
        # a second request behind the refused one is never answered
        data = REFUSED[2][1] + GET
        answer = await exchange(d.port, data, reader_ctx(pki))
        assert answer.count(b"HTTP/1.") == 1
        assert len(d.records) == 1


async def test_a_failing_handler_is_a_500_problem_that_does_not_echo_the_error(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(request: web.BaseRequest) -> web.StreamResponse:
        raise RuntimeError("secret-detail-1234")

    async with door(pki, boom) as d:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.listener"):
            answer = await exchange(d.port, GET, reader_ctx(pki))
        request_id = _problem_checks(answer, 500, "internal.error")
        assert split(answer)[1]["connection"] == "close"
        assert b"secret-detail-1234" not in answer
        assert d.records == [_record(request_id, 500, "internal.error")]
    logged = [r for r in caplog.records if r.name == "vvault_pep.listener"]
    assert [(r.getMessage(), r.why) for r in logged] == [("request refused by the HTTP parser", "RuntimeError")]  # type: ignore[attr-defined]


async def test_a_handler_timeout_is_a_500_problem_too(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        raise TimeoutError

    async with door(pki, slow) as d:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.listener"):
            answer = await exchange(d.port, GET, reader_ctx(pki))
        request_id = _problem_checks(answer, 500, "internal.error")
        assert d.records == [_record(request_id, 500, "internal.error")]
    logged = [r for r in caplog.records if r.name == "vvault_pep.listener"]
    assert [(r.getMessage(), r.why) for r in logged] == [("request refused by the HTTP parser", "504")]  # type: ignore[attr-defined]


async def test_a_failure_after_the_answer_started_only_ends_the_connection(pki: Path) -> None:
    async def half(request: web.BaseRequest) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        await out.write(b"partial")
        raise RuntimeError("late")

    async with door(pki, half) as d:
        answer = await exchange(d.port, GET, reader_ctx(pki))
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"problem" not in answer and answer.count(b"HTTP/1.") == 1
        assert d.records == []


async def test_without_a_refusal_hook_the_problem_is_still_answered(pki: Path) -> None:
    async with door(pki, record=False, max_headers=10) as d:
        assert d.server.on_refusal is None
        _problem_checks(await exchange(d.port, REFUSED[2][1], reader_ctx(pki)), 400, "sanitize.malformed")


# --- the pure-Python parser, held to llhttp's rule ---------------------------------


async def test_the_python_parser_refuses_a_lower_case_method(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aiohttp.web_protocol

    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    async with door(pki) as d:
        answer = await exchange(d.port, b"get / HTTP/1.1\r\nHost: x\r\n\r\n", reader_ctx(pki))
        request_id = _problem_checks(answer, 400, "sanitize.malformed")
        assert d.records == [_record(request_id, 400, "sanitize.malformed")]
        assert split(await exchange(d.port, GET, reader_ctx(pki)))[0] == 200


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        (b"GET / HTTP/1.1", None),
        (b"M-SEARCH /x HTTP/1.1", None),
        (b"get / HTTP/1.1", "get"),
        (b"Get / HTTP/1.1", "Get"),
        (b"G\xe9T / HTTP/1.1", "G\xe9T"),
        (b"GET/ HTTP/1.1", "GET/"),
        (b" GET / HTTP/1.1", ""),
        (b"GET\t/ HTTP/1.1", "GET\t/"),  # only a space ends the method
    ],
)
async def test_which_methods_the_python_parser_takes(line: bytes, refused: str | None) -> None:
    parser = listener._StrictPyParser(None, asyncio.get_running_loop(), 2**16)
    if refused is None:
        message = parser.parse_message([line, b"Host: x", b""])
        assert (message.method, dict(message.headers)) == (line.split(b" ")[0].decode(), {"Host": "x"})
        return
    with pytest.raises(BadHttpMethod) as err:
        parser.parse_message([line, b"Host: x", b""])
    assert err.value.args == (refused,)


async def test_no_lines_is_no_method() -> None:
    parser = listener._StrictPyParser(None, asyncio.get_running_loop(), 2**16)
    with pytest.raises(BadHttpMethod) as err:
        parser.parse_message([])
    assert err.value.args == ("",)
