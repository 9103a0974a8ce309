"""The per-connection memo: a recalled request is refused whenever a fresh walk would refuse it.

Real parts throughout: the PEP in this process over real mTLS sockets, one keep-alive
connection per client written byte for byte, real OPA with the repo's policies, really signed
tokens.  Whether a request was recalled is read where an operator reads it: the audit record's
``stages_ms`` has ``memo`` (and no ``sanitize``) for a recalled request.  A request is
remembered when it is seen a second time on its connection, and recalled from the third.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from examples.pki import issue_crl
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests.conftest import Upstream
from tests.helpers import running_pep
from tests.idp import Issuer, posture_assertion
from tests.support import ROUTES, OpaProcess, client_context, config_doc

from vvault_pep.app.memo import ENTRIES
from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.config.models import DEFAULT_MEMO_VOLATILE

ADMIN = "memo-admin-token-0123456789abcdef0123"
# Left out of the memo's key: the defaults, one the upstream sees and one sanitize drops.
VOLATILE = [*DEFAULT_MEMO_VOLATILE, "x-seq", "x_seq"]
BLOBS = "/v1/tenants/acme/blobs/report"  # faults/allow_with_headers: allowed, with an upstream header
STREAM = "/v1/tenants/acme/stream/1"  # faults/plain_true
QUERY = "/v1/tenants/acme/collections/docs/query"  # the library's query policy reads the JSON body
BODY_ROUTE: dict[str, Any] = {
    "name": "memo_query",
    "path": "/v1/tenants/{tenant}/collections/{collection}/query",
    "methods": ["POST"],
    "upstream": "vvault",
    "policy": "vvault/authz/decision",
    "body": {"inspect": "json", "max_bytes": 4096},
}


def doc_for(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, *, memo: bool = True, cache: bool = False
) -> dict[str, Any]:
    routes = [BODY_ROUTE, *(r for r in ROUTES if r["name"] != "collection_query")]
    return config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        cache=cache,
        routes=routes,
        listener={"memo": memo, "memo_volatile_headers": VOLATILE},
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN},
        identity={
            "issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True, "leeway_s": 0}]
        },
    )


@pytest.fixture(scope="module", autouse=True)
async def blobs(upstream: Upstream) -> None:
    """The blobs the requests below read, put straight into the upstream."""
    async with aiohttp.ClientSession() as http:
        for name in ["report", "reporT", "x", *(f"n{i}" for i in range(ENTRIES + 1))]:
            url = f"http://127.0.0.1:{upstream.port}/v1/tenants/acme/blobs/{name}"
            async with http.put(url, data=b"blob") as resp:
                assert resp.status == 201


@pytest.fixture(scope="module")
async def pep(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer) -> AsyncIterator[PepRuntime]:
    async with running_pep(Config.model_validate(doc_for(pki, opa, upstream, idp))) as runtime:
        yield runtime


@pytest.fixture(scope="module")
async def walker(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer) -> AsyncIterator[PepRuntime]:
    """The same PEP with ``listener.memo: false``: every request walked whole."""
    async with running_pep(Config.model_validate(doc_for(pki, opa, upstream, idp, memo=False))) as runtime:
        yield runtime


@pytest.fixture(scope="module")
async def cached(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer) -> AsyncIterator[PepRuntime]:
    """The PEP with its decision cache on (routes cached by default)."""
    async with running_pep(Config.model_validate(doc_for(pki, opa, upstream, idp, cache=True))) as runtime:
        yield runtime


class Records(logging.Handler):
    """Every audit record, by request id."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_id: dict[str, dict[str, Any]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict) and audit.get("request_id"):
            self.by_id[audit["request_id"]] = audit


@pytest.fixture(scope="module")
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("vvault_pep.audit")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the PEP said it closes the connection

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]

    @property
    def code(self) -> str | None:
        return json.loads(self.body).get("code") if self.status >= 400 else None


class KeepAlive:
    """One TLS connection carrying requests written byte for byte; answers parsed by llhttp."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened = 0

    async def __aenter__(self) -> KeepAlive:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ctx, server_hostname="localhost"
        )
        self.opened += 1

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def send(self, request: bytes) -> Answer:
        if self.writer is None:
            await self._open()  # the PEP closed the last one (a refusal it closes after)
        assert self.reader is not None and self.writer is not None
        headers: dict[str, str] = {}
        body = bytearray()
        done = asyncio.Event()
        keep: list[bool] = []

        class Sink:
            def on_header(self, name: bytes, value: bytes) -> None:
                headers[name.decode("latin-1").lower()] = value.decode("latin-1")

            def on_headers_complete(self) -> None:
                keep.append(parser.should_keep_alive())

            def on_body(self, data: bytes) -> None:
                body.extend(data)

            def on_message_complete(self) -> None:
                done.set()

        parser = httptools.HttpResponseParser(Sink())
        self.writer.write(request)
        async with asyncio.timeout(15):
            await self.writer.drain()
            while not done.is_set():
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionResetError("the PEP closed the connection without a whole answer")
                parser.feed_data(data)
        closed = not keep[0]
        if closed:
            self._close()
        return Answer(parser.get_status_code(), headers, bytes(body), closed)


def request(
    path: str = BLOBS,
    headers: list[tuple[str, str]] | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    token: str | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines.extend(f"{k}: {v}" for k, v in headers or [])
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([*lines, "", ""])).encode("latin-1") + (body or b"")


def connection(pep: PepRuntime, pki: Path, client: str = "reader") -> KeepAlive:
    return KeepAlive(pep.port, client_context(pki, client))


async def record_of(records: Records, answer: Answer) -> dict[str, Any]:
    """The answer's audit record (written as the request ends, maybe just after the answer)."""
    async with asyncio.timeout(10):
        while answer.request_id not in records.by_id:
            await asyncio.sleep(0.01)
    return records.by_id[answer.request_id]


def recalled(record: dict[str, Any]) -> bool:
    if "stages_ms" not in record:
        return False  # refused by the HTTP parser, before any stage
    stages = record["stages_ms"]
    assert not ("memo" in stages and "sanitize" in stages), stages  # recalled, or walked: never both
    return "memo" in stages


async def remembered(conn: KeepAlive, raw: bytes, status: int = 200) -> None:
    """Send ``raw`` until the connection's memo holds it (seen once, then remembered)."""
    for _ in range(2):
        assert (await conn.send(raw)).status == status


# Fields that differ on every request whatever the memo does (ids, clocks, timings), and the
# source port (one per connection).
PER_REQUEST = ("timestamp", "decision_id", "request_id", "trace_id", "latency_ms", "stages_ms", "opa_decision_id")


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in PER_REQUEST}
    if "input" in out:
        doc = {**out["input"], "time": None, "source": {**out["input"]["source"], "port": None}}
        doc["request"] = {**doc["request"], "id": None}
        out["input"] = doc
    return out


def upstream_saw(upstream: Upstream, request_id: str) -> list[tuple[str, str]]:
    """The headers the upstream received for that request, but for its id and trace context."""
    seen = upstream.seen_with(request_id)
    assert len(seen) <= 1
    skip = {"x-request-id", "traceparent", "tracestate"}
    return [(k, v) for k, v in seen[0]["headers"] if k.lower() not in skip] if seen else []


async def admin(pep: PepRuntime, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, f"http://127.0.0.1:{pep.admin_port}{path}", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)


# ---------------------------------------------------------------- recalled alike


async def test_a_repeated_request_is_recalled_and_answered_as_a_fresh_walk_would(
    pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream, records: Records
) -> None:
    token = idp.token(sub="memo-alike")
    raw = request(token=token, headers=[("Accept", "application/json"), ("X-Note", "one")])
    async with connection(pep, pki) as conn:
        answers = [await conn.send(raw) for _ in range(4)]
        assert conn.opened == 1
    assert [a.status for a in answers] == [200] * 4
    got = [await record_of(records, a) for a in answers]
    assert [recalled(r) for r in got] == [False, False, True, True]  # seen, remembered, recalled
    assert comparable(got[2]) == comparable(got[0]) == comparable(got[1]) == comparable(got[3])
    assert got[2]["identity"]["subject"] == "memo-alike" and got[2]["input"]["identity"]["subject"] == "memo-alike"
    assert "authorization" not in got[2]["input"]["request"]["headers"]  # still redacted
    seen = [upstream_saw(upstream, a.request_id) for a in answers]
    assert seen[0] and seen[2] == seen[0] == seen[1] == seen[3]
    assert ("X-Vvault-Tenant", "acme") in seen[2]  # the policy's own header, on a recall too
    assert all(k.lower() != "authorization" for k, _ in seen[2])
    # per request all the same: a new id each time, the id the upstream saw
    assert len({a.request_id for a in answers}) == 4
    assert all(upstream.seen_with(a.request_id) for a in answers)


async def test_one_byte_of_difference_is_walked_afresh(
    pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream, records: Records
) -> None:
    token = idp.token(sub="memo-bytes")
    base = [("Accept", "application/json"), ("X-Note", "one")]
    variants = {
        "a header value": [("Accept", "application/jsoN"), ("X-Note", "one")],
        "a header name's case": [("accept", "application/json"), ("X-Note", "one")],
        "the order of two headers": [("X-Note", "one"), ("Accept", "application/json")],
        "one more header": [*base, ("X-Other", "1")],
    }
    async with connection(pep, pki) as conn:
        await remembered(conn, request(token=token, headers=base))
        again = await conn.send(request(token=token, headers=base))
        assert again.status == 200 and recalled(await record_of(records, again))
        # the token, one byte of its signature changed: refused as a fresh walk refuses it
        head, _, signature = token.rpartition(".")
        flipped = head + "." + ("A" if signature[0] != "A" else "B") + signature[1:]
        forged = await conn.send(request(token=flipped, headers=base))
        assert (forged.status, forged.code) == (401, "authn.bad_signature")
        assert not recalled(await record_of(records, forged))
        back = await conn.send(request(token=token, headers=base))  # the genuine one: still known
        assert back.status == 200 and recalled(await record_of(records, back))
        for what, headers in variants.items():
            for _ in range(3):  # never the base's entry, however often it comes
                answer = await conn.send(request(token=token, headers=headers))
                assert answer.status == 200, what
                record = await record_of(records, answer)
                # what this request carries, not what the base one did
                accept = next(v for k, v in headers if k.lower() == "accept")
                assert record["input"]["request"]["headers"]["accept"] == [accept]
                assert (("X-Other", "1") in upstream_saw(upstream, answer.request_id)) is ("more" in what)
            assert recalled(record), what  # its own entry, from the third time
        # the request target, one byte apart: another route parameter, seen by the policy
        other = await conn.send(request(BLOBS[:-1] + "T", token=token, headers=base))
        record = await record_of(records, other)
        assert not recalled(record) and record["input"]["route"]["params"]["name"] == "reporT"
        assert conn.opened == 1


async def test_volatile_headers_stay_out_of_the_key_and_are_handled_on_every_request(
    pep: PepRuntime, walker: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream, records: Records
) -> None:
    token = idp.token(sub="memo-volatile")
    base = [("Accept", "application/json")]

    def numbered(i: int, *more: tuple[str, str]) -> bytes:
        trace = f"00-{i:032x}-{i:016x}-01"
        return request(token=token, headers=[*base, *more, ("X-Seq", str(i)), ("Traceparent", trace), ("X_Seq", "x")])

    async with connection(pep, pki) as conn:
        answers = [await conn.send(numbered(i)) for i in range(5)]
        assert [a.status for a in answers] == [200] * 5
        got = [await record_of(records, a) for a in answers]
        assert [recalled(r) for r in got] == [False, False, True, True, True]
        for i, answer in enumerate(answers):  # each request's own value, never a remembered one's
            seen = upstream_saw(upstream, answer.request_id)
            assert [v for k, v in seen if k.lower() == "x-seq"] == [str(i)]
            assert all(k.lower() != "x_seq" for k, _ in seen)  # dropped, as sanitize drops it
        assert comparable(got[4]) == comparable(got[0])
        # listed in Connection: hop-by-hop, so not forwarded, on a recall too
        hop = [await conn.send(numbered(10 + i, ("Connection", "X-Seq"))) for i in range(3)]
        assert recalled(await record_of(records, hop[2]))
        assert not any(k.lower() == "x-seq" for k, _ in upstream_saw(upstream, hop[2].request_id))
        # a bad value is refused as a fresh walk refuses it: the request is walked whole
        bad = request(token=token, headers=[*base, ("X-Seq", "\xe9")])
        refused = await conn.send(bad)
        assert not recalled(await record_of(records, refused))
        async with connection(walker, pki) as fresh_conn:
            fresh = await fresh_conn.send(bad)
        assert (refused.status, refused.code) == (fresh.status, fresh.code) == (400, "sanitize.bad_header")
        assert refused.closed  # and with it the connection's memo: the next one starts afresh
        back = await conn.send(numbered(20))
        assert back.status == 200 and not recalled(await record_of(records, back))
    assert conn.opened == 2


async def test_the_header_limits_count_the_volatile_headers_on_a_recall(
    pep: PepRuntime, walker: PepRuntime, pki: Path, idp: Issuer, records: Records
) -> None:
    token = idp.token(sub="memo-volatile-limits")
    pads = [(f"X-Pad-{i}", "p" * 7900) for i in range(8)]  # near limits.max_total_header_bytes (65,536)
    fits, over = (
        request(token=token, headers=[*pads, ("X-Seq", "1")]),
        request(token=token, headers=[*pads, ("X-Seq", "s" * 2000)]),
    )
    async with connection(pep, pki) as conn:
        await remembered(conn, fits)
        again = await conn.send(fits)
        assert again.status == 200 and recalled(await record_of(records, again))
        refused = await conn.send(over)
        assert not recalled(await record_of(records, refused))
    async with connection(walker, pki) as fresh_conn:
        fresh = await fresh_conn.send(over)
    assert (refused.status, refused.code) == (fresh.status, fresh.code) == (431, "sanitize.headers_too_large")


async def test_a_volatile_header_the_pep_sets_itself_never_reaches_the_upstream_twice(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, records: Records
) -> None:
    # Nothing stripped by sanitize: the client's X-Request-Id would pass but for the PEP's own.
    doc = {**doc_for(pki, opa, upstream, idp), "sanitize": {"strip_headers": [], "strip_header_prefixes": []}}
    token = idp.token(sub="memo-volatile-owned")
    async with running_pep(Config.model_validate(doc)) as pep, connection(pep, pki) as conn:
        answers = [await conn.send(request(token=token, headers=[("X-Request-Id", f"client-{i}")])) for i in range(4)]
    assert [recalled(await record_of(records, a)) for a in answers] == [False, False, True, True]
    for answer in answers:
        (seen,) = upstream.seen_with(answer.request_id)
        assert [v for k, v in seen["headers"] if k.lower() == "x-request-id"] == [answer.request_id]


async def test_a_token_expiring_mid_connection_gets_401(
    pep: PepRuntime, pki: Path, idp: Issuer, records: Records
) -> None:
    exp = int(time.time()) + 3
    token = idp.token(sub="memo-expiring", exp=exp)
    raw = request(token=token)
    async with connection(pep, pki) as conn:
        await remembered(conn, raw)
        hit = await conn.send(raw)
        assert hit.status == 200 and recalled(await record_of(records, hit))
        async with asyncio.timeout(10):
            while time.time() <= exp + 0.05:  # the token's exp passes between two requests
                await asyncio.sleep(0.05)
        late = await conn.send(raw)
    assert (late.status, late.code) == (401, "authn.expired")
    assert "Bearer" in late.headers["www-authenticate"]
    record = await record_of(records, late)
    assert not recalled(record) and record["result"]["code"] == "authn.expired"


def short_lived_client(pki: Path, out: Path, seconds: int) -> ssl.SSLContext:
    """A client context holding a certificate of the test CA that expires in ``seconds``."""
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memo-short-lived")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(seconds=seconds))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "short.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "short-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(out / "short.pem"), str(out / "short-key.pem"))
    return ctx


async def test_a_client_certificate_expiring_mid_connection_is_refused(
    pep: PepRuntime, pki: Path, tmp_path: Path, records: Records
) -> None:
    ctx = short_lived_client(pki, tmp_path, seconds=3)
    until = x509.load_pem_x509_certificate((tmp_path / "short.pem").read_bytes()).not_valid_after_utc.timestamp()
    raw = request()
    async with KeepAlive(pep.port, ctx) as conn:  # the handshake while it is valid
        await remembered(conn, raw)
        hit = await conn.send(raw)
        assert hit.status == 200 and recalled(await record_of(records, hit))
        async with asyncio.timeout(10):
            while time.time() <= until + 0.05:  # the certificate's notAfter passes mid-connection
                await asyncio.sleep(0.05)
        late = await conn.send(raw)
    assert (late.status, late.code) == (401, "tls.client_cert_expired")
    assert not recalled(await record_of(records, late))


async def test_a_signing_key_withdrawn_mid_connection_gets_401(
    pki: Path, opa: OpaProcess, upstream: Upstream, records: Records
) -> None:
    rotating = Issuer()  # its own issuer: the session's keeps its keys
    await rotating.start()
    try:
        config = Config.model_validate(doc_for(pki, opa, upstream, rotating))
        async with running_pep(config) as pep, connection(pep, pki) as conn:
            raw = request(token=rotating.token("rsa-1", sub="memo-rotated"))
            await remembered(conn, raw)
            hit = await conn.send(raw)
            assert hit.status == 200 and recalled(await record_of(records, hit))
            rotating.add_key("ec-2")
            rotating.published.discard("rsa-1")
            assert pep.authn is not None
            assert await pep.authn.keysets[rotating.url].refresh()  # as the refresher does when due
            withdrawn = await conn.send(raw)
            assert (withdrawn.status, withdrawn.code) == (401, "authn.unknown_key")
            assert not recalled(await record_of(records, withdrawn))
    finally:
        await rotating.stop()


async def test_a_request_with_a_posture_assertion_is_judged_afresh_every_time(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, records: Records
) -> None:
    doc = doc_for(pki, opa, upstream, idp)
    doc["posture"] = {
        "issuers": [{"name": "devices", "issuer": devices.url, "audiences": ["vvault-pep"], "allow_http": True}],
        "max_age_s": 60,
    }
    token = idp.token(sub="alice")
    assertion = posture_assertion(devices, sub="alice")
    async with running_pep(Config.model_validate(doc)) as pep, connection(pep, pki) as conn:
        with_device = request(token=token, headers=[("X-Device-Posture", assertion)])
        answers = [await conn.send(with_device) for _ in range(4)]
        got = [await record_of(records, a) for a in answers]
        assert [a.status for a in answers] == [200] * 4
        assert not any(recalled(r) for r in got)  # its age is part of the input
        assert all(r["input"]["device"]["verified"] for r in got)
        assert len({r["input"]["device"]["age_s"] for r in got}) > 1
        # without an assertion there is nothing that ages: remembered as usual
        plain = request(token=token)
        await remembered(conn, plain)
        hit = await conn.send(plain)
        record = await record_of(records, hit)
        assert recalled(record) and record["input"]["device"] == {"verified": False, "reason": "absent"}


async def test_a_crl_or_certificate_reload_drops_the_memo(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path, records: Records
) -> None:
    crl = issue_crl(pki, ("revoked",), path=tmp_path / "crl.pem")
    doc = doc_for(pki, opa, upstream, idp)
    doc["listener"]["tls"] = {**doc["listener"]["tls"], "crl_file": str(crl), "reload_interval_s": 0.1}
    raw = request(token=idp.token(sub="memo-reloaded"))
    async with running_pep(Config.model_validate(doc)) as pep, connection(pep, pki) as conn:
        await remembered(conn, raw)
        hit = await conn.send(raw)
        assert hit.status == 200 and recalled(await record_of(records, hit))
        reloads = pep.tls_reloads
        issue_crl(pki, ("revoked",), issued_ago=dt.timedelta(seconds=0), path=crl)  # the CA's next CRL
        async with asyncio.timeout(10):
            while pep.tls_reloads == reloads:
                await asyncio.sleep(0.05)
        after = await conn.send(raw)
        assert after.status == 200 and not recalled(await record_of(records, after))


async def test_a_quarantine_between_two_requests_on_one_connection_gets_403(
    pep: PepRuntime, pki: Path, idp: Issuer, records: Records
) -> None:
    token = idp.token(sub="memo-quarantined")
    raw = request(token=token)
    value = f"{idp.url}|memo-quarantined"
    async with connection(pep, pki) as conn:
        await remembered(conn, raw)
        hit = await conn.send(raw)
        assert hit.status == 200 and recalled(await record_of(records, hit))
        status, _ = await admin(pep, "POST", "/admin/quarantines", {"scope": "subject", "value": value, "ttl_s": 60})
        assert status == 201
        held = await conn.send(raw)
        assert (held.status, held.code) == (403, "containment.quarantined")
        assert (await record_of(records, held))["result"]["code"] == "containment.quarantined"
        assert (await admin(pep, "DELETE", f"/admin/quarantines/subject/{value}"))[0] == 200
        freed = await conn.send(raw)
        assert freed.status == 200


async def test_containment_is_checked_on_a_recalled_request_itself(
    pep: PepRuntime, pki: Path, idp: Issuer, records: Records
) -> None:
    """Even with the generation left as it was (a quarantine this replica only learns from the
    check itself), a recalled request is refused: containment is never remembered."""
    token = idp.token(sub="memo-held-quietly")
    raw = request(token=token)
    containment = pep.containment
    assert containment is not None
    async with connection(pep, pki) as conn:
        await remembered(conn, raw)
        await containment.add("subject", f"{idp.url}|memo-held-quietly", 60, "test", by="test")
        containment.gen.value -= 1  # as if the quarantine had not changed what this replica knows
        held = await conn.send(raw)
        assert (held.status, held.code) == (403, "containment.quarantined")
        assert recalled(await record_of(records, held))
        assert await containment.lift("subject", f"{idp.url}|memo-held-quietly")


async def test_a_revision_or_epoch_change_makes_a_new_cache_key(
    cached: PepRuntime, pki: Path, idp: Issuer, records: Records
) -> None:
    cache = cached.cache
    assert cache is not None
    raw = request(STREAM, token=idp.token(sub="memo-revisions"))
    async with connection(cached, pki) as conn:

        async def send() -> dict[str, Any]:
            answer = await conn.send(raw)
            assert answer.status == 200
            return await record_of(records, answer)

        miss, remembering, hit = await send(), await send(), await send()
        assert (miss["cache"], remembering["cache"], hit["cache"], recalled(hit)) == ("miss", "l1", "l1", True)
        assert await cache.bump_revision() is True  # a data change: every key changes
        after = await send()
        assert after["cache"] == "miss" and not recalled(after)
        assert after["bundles"]["revision"] != hit["bundles"]["revision"]
        again = await send()
        assert (again["cache"], recalled(again)) == ("l1", True)  # remembered again on the way
        sha = again["client_cert_sha256"]
        status, _ = await admin(cached, "POST", "/admin/cache/invalidate", {"scope": "certificate", "value": sha})
        assert status == 200
        bumped = await send()
        assert bumped["cache"] == "miss" and not recalled(bumped)


async def test_a_body_is_read_and_judged_on_every_request(
    pep: PepRuntime, pki: Path, records: Records, upstream: Upstream
) -> None:
    fine, wrong = b'{"top_k": 3}', b'{"top_k":-3}'
    assert len(fine) == len(wrong)  # the same header block, byte for byte
    headers = [("Content-Type", "application/json")]
    async with connection(pep, pki) as conn:
        await remembered(conn, request(QUERY, headers, method="POST", body=fine))
        again = await conn.send(request(QUERY, headers, method="POST", body=fine))
        assert again.status == 200 and recalled(await record_of(records, again))
        refused = await conn.send(request(QUERY, headers, method="POST", body=wrong))
        assert (refused.status, refused.code) == (403, "policy.query_top_k")
        record = await record_of(records, refused)
        assert recalled(record) and record["input"]["request"]["body"] == {"top_k": -3}
        assert not upstream.seen_with(refused.request_id)
        # no body at all: another header block, walked afresh, judged on its (absent) body
        empty = await conn.send(request(QUERY, headers, method="POST", body=b""))
        record = await record_of(records, empty)
        assert not recalled(record) and empty.status == 403
        back = await conn.send(request(QUERY, headers, method="POST", body=fine))
        record = await record_of(records, back)
        assert back.status == 200 and record["input"]["request"]["body"] == {"top_k": 3}


@pytest.mark.parametrize(
    ("redact", "check"),
    [
        # paths in the static part: redacted once, with the draft
        ({"erase": ["request.headers.accept"], "mask": ["identity.subject"]}, "static"),
        # paths reaching the per-request parts: redacted per request, as they are new each time
        ({"erase": ["risk"], "mask": ["request.id", "time.now"]}, "per-request"),
        ({"erase": ["request"]}, "whole-request"),
    ],
)
async def test_a_recalled_request_is_redacted_as_a_fresh_walk_would(
    pki: Path,
    opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    records: Records,
    redact: dict[str, Any],
    check: str,
) -> None:
    doc = {**doc_for(pki, opa, upstream, idp), "audit": {"redact": redact}}
    raw = request(BLOBS + "?q=secret", [("Accept", "text/plain")], token=idp.token(sub="memo-redacted"))
    async with running_pep(Config.model_validate(doc)) as pep, connection(pep, pki) as conn:
        answers = [await conn.send(raw) for _ in range(3)]
    got = [await record_of(records, a) for a in answers]
    assert [recalled(r) for r in got] == [False, False, True]
    walked, hit = got[0], got[2]
    assert hit["redacted"] == walked["redacted"]
    done = sorted(hit["redacted"]["erased"] + hit["redacted"]["masked"])
    assert done == sorted(["request.query", *redact.get("erase", ()), *redact.get("mask", ())])
    if check == "static":
        assert "accept" not in hit["input"]["request"]["headers"]
        assert hit["input"]["identity"]["subject"].startswith("masked:sha256:")
        assert hit["input"]["identity"]["subject"] == walked["input"]["identity"]["subject"]
        assert hit["input"]["request"]["query"]["q"][0].startswith("masked:sha256:")
    elif check == "per-request":
        assert "risk" not in hit["input"] and "risk" not in walked["input"]
        assert hit["input"]["request"]["id"].startswith("masked:sha256:")
        assert hit["input"]["request"]["id"] != walked["input"]["request"]["id"]  # each its own id, masked
        assert hit["input"]["time"]["now"].startswith("masked:sha256:")
    else:
        assert "request" not in hit["input"] and "request" not in walked["input"]
    assert comparable({k: v for k, v in hit.items() if k != "input"}) == comparable(
        {k: v for k, v in walked.items() if k != "input"}
    )


async def test_two_connections_never_share_a_memo(pep: PepRuntime, pki: Path, idp: Issuer, records: Records) -> None:
    raw = request(token=idp.token(sub="memo-two"))
    async with connection(pep, pki) as one, connection(pep, pki) as two, connection(pep, pki, "ops") as other:
        await remembered(one, raw)
        a = await one.send(raw)
        b = await two.send(raw)
        await remembered(other, raw)
        c = await other.send(raw)
    got = [await record_of(records, answer) for answer in (a, b, c)]
    assert [answer.status for answer in (a, b, c)] == [200] * 3
    assert [recalled(r) for r in got] == [True, False, True]
    assert got[0]["spiffe_id"] == got[1]["spiffe_id"] == "spiffe://demo.vvault/client/reader"
    assert got[2]["spiffe_id"] == "spiffe://demo.vvault/client/ops"
    assert got[2]["input"]["tls"]["client_cert"]["spiffe_id"] == "spiffe://demo.vvault/client/ops"
    assert got[0]["input"]["source"]["port"] != got[1]["input"]["source"]["port"]


async def test_a_connection_keeps_a_few_entries_least_recently_used_out(
    pep: PepRuntime, pki: Path, records: Records
) -> None:
    paths = [f"/v1/tenants/acme/blobs/n{i}" for i in range(ENTRIES + 1)]
    async with connection(pep, pki) as conn:
        for path in paths:  # the first one is pushed out by the last
            await remembered(conn, request(path))
        newest = await conn.send(request(paths[-1]))
        oldest = await conn.send(request(paths[0]))
    assert recalled(await record_of(records, newest))
    assert not recalled(await record_of(records, oldest))


async def test_memo_off_walks_every_request_whole(walker: PepRuntime, pki: Path, records: Records) -> None:
    async with connection(walker, pki) as conn:
        answers = [await conn.send(request()) for _ in range(3)]
    assert [recalled(await record_of(records, a)) for a in answers] == [False, False, False]


# ---------------------------------------------------------------- property: recalled == fresh

NAMES = st.sampled_from(
    ["Accept", "accept", "X-Note", "User-Agent", "Cookie", "X-Forwarded-For", "X-Client-Cert", "Forwarded",
     "Cache-Control", "Accept-Language", "X-Vvault-Tenant", "Traceparent", "Connection-Token", "Via",
     "X-Device-Posture"]
)  # fmt: skip
VALUES = st.text(alphabet="abcAZ09 -_/.;=,:*\"'", min_size=0, max_size=12).map(str.strip)
TOKENS = st.sampled_from(["good", "good", "good", "none", "none", "other-scheme", "malformed", "garbage"])
PATHS = st.sampled_from(
    [BLOBS, BLOBS, STREAM, STREAM, "/v1/tenants/acme/blobs/a%2Fb", "/v1/tenants/acme/blobs/x?q=1", "/nowhere"]
)


def authorization(kind: str, idp: Issuer, token: str) -> list[tuple[str, str]]:
    return {
        "good": [("Authorization", f"Bearer {token}")],
        "none": [],
        "other-scheme": [("Authorization", "Basic dXNlcjpwYXNz")],
        "malformed": [("Authorization", "Bearer a b")],
        "garbage": [("Authorization", "Bearer " + token[:-3] + "xyz")],
    }[kind]


@pytest.fixture(scope="module")
def good_token(idp: Issuer) -> str:
    return idp.token(sub="memo-property")


# Different on each of the three requests: left out of the key, handled per request.
VOLATILE_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["X-Seq", "x-seq", "X_Seq", "Traceparent", "X-Request-Id"]),
        st.integers(0, 29).flatmap(lambda n: VALUES if n else st.just("\xe9")),  # now and then not UTF-8
    ),
    max_size=3,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=PATHS,
    kind=TOKENS,
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=6),
    volatile=st.lists(VOLATILE_HEADERS, min_size=3, max_size=3),
)
async def test_a_recalled_request_has_the_outcome_of_a_fresh_walk(
    pep: PepRuntime,
    walker: PepRuntime,
    pki: Path,
    idp: Issuer,
    good_token: str,
    upstream: Upstream,
    records: Records,
    path: str,
    kind: str,
    headers: list[tuple[str, str]],
    volatile: list[list[tuple[str, str]]],
) -> None:
    raws = [request(path, [*authorization(kind, idp, good_token), *headers, *more]) for more in volatile]
    async with connection(pep, pki) as conn:
        first = await conn.send(raws[0])
        again = await conn.send(raws[1])
        second = await conn.send(raws[2])  # recalled when the first two were remembered and left it open
    async with connection(walker, pki) as conn:
        fresh = await conn.send(raws[2])
    assert second.status == fresh.status
    assert second.code == fresh.code
    hit, walked = await record_of(records, second), await record_of(records, fresh)
    if first.status == again.status == second.status == 200 and not again.closed:
        assert recalled(hit)
    event("recalled" if recalled(hit) else f"walked twice ({second.status} {second.code})")
    assert not recalled(walked)
    assert comparable(hit) == comparable(walked)
    assert upstream_saw(upstream, second.request_id) == upstream_saw(upstream, fresh.request_id)
    skip = {"x-request-id", "date", "content-length"}
    assert {k: v for k, v in second.headers.items() if k not in skip} == {
        k: v for k, v in fresh.headers.items() if k not in skip
    }
