"""Revocation, SVID validity and session resumption, over real TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from examples.pki import issue_client, issue_crl
from tests.conftest import Upstream
from tests.idp import Issuer
from tests.support import OpaProcess, client_context, config_doc, get, raw_https
from tests.test_authn import ID_ROUTES, SECRET, USER, identity_config

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config, parse_config
from vvault_pep.errors import ConfigError

REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)


async def _status(port: int, ctx: ssl.SSLContext, host: str = "localhost", *extra: str) -> int:
    resp = await raw_https(port, ctx, get(SECRET, *extra, host=host), timeout=5)
    return resp.status


async def _start(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, **tls: object) -> PepRuntime:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        listener={"tls": {"client_auth": "optional", **tls}},
        routes=ID_ROUTES,
        identity=identity_config(idp),
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    return runtime


async def _until(check: object, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        await _status(port, ctx, USER)
    except REFUSED:
        return True
    return False


# --- certificate revocation ----------------------------------------------------


@pytest.fixture
async def crl_pep(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> AsyncIterator[tuple[PepRuntime, Path]]:
    crl = tmp_path / "crl.pem"
    shutil.copy(pki / "crl.pem", crl)
    runtime = await _start(pki, opa, upstream, idp, crl_file=str(crl), reload_interval_s=0.1)
    yield runtime, crl
    await runtime.stop()


async def test_a_revoked_certificate_fails_the_handshake(
    crl_pep: tuple[PepRuntime, Path], pki: Path, idp: Issuer, upstream: Upstream
) -> None:
    pep, _ = crl_pep
    before = upstream.count()
    with pytest.raises(REFUSED):
        await _status(pep.port, client_context(pki, "revoked"), USER, f"Authorization: Bearer {idp.token()}")
    assert upstream.count() == before
    assert await _status(pep.port, client_context(pki, "reader"), USER, f"Authorization: Bearer {idp.token()}") == 200
    ok, checks = await pep.readiness()
    assert ok and all(checks["crl"].values())


async def test_a_replaced_crl_takes_effect_without_a_restart(crl_pep: tuple[PepRuntime, Path], pki: Path) -> None:
    pep, crl = crl_pep
    assert not await _refused(pep.port, client_context(pki, "reader"))
    # The CA's next CRL revokes the reader and no longer lists the other one.
    issue_crl(pki, ("reader",), issued_ago=dt.timedelta(seconds=0), path=crl)
    await _until(lambda: _refused(pep.port, client_context(pki, "reader")))
    assert not await _refused(pep.port, client_context(pki, "revoked"))


async def test_a_stale_crl_fails_closed(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    stale = issue_crl(
        pki, (), issued_ago=dt.timedelta(days=2), valid_for=-dt.timedelta(minutes=1), path=tmp_path / "stale.pem"
    )
    pep = await _start(pki, opa, upstream, idp, crl_file=[str(stale)])
    try:
        # Even a certificate the CRL does not list: nobody knows what was revoked since.
        with pytest.raises(REFUSED):
            await _status(pep.port, client_context(pki, "reader"), USER)
        ok, checks = await pep.readiness()
        assert not ok
        assert list(checks["crl"].values()) == [False]
        metrics = pep.telemetry.metrics_text().decode()
        line = next(m for m in metrics.splitlines() if m.startswith("vvault_pep_tls_crl_seconds_left"))
        assert float(line.rsplit(" ", 1)[1]) < 0
    finally:
        await pep.stop()


def test_a_file_without_a_crl_is_a_config_error(pki: Path) -> None:
    doc = config_doc(
        pki, opa_url="http://127.0.0.1:1", upstream_port=1, listener={"tls": {"crl_file": str(pki / "ca.pem")}}
    )
    with pytest.raises(ConfigError, match=r"^x\.yaml:\d+: listener\.tls\.crl_file(\[0\])?: .* holds no PEM CRL"):
        parse_config(yaml.safe_dump(doc, sort_keys=False), filename="x.yaml")


# --- X.509-SVIDs -----------------------------------------------------------------

BAD_SVIDS = {
    "upper-domain": ("spiffe://Demo.vvault/client/x",),
    "port": ("spiffe://demo.vvault:8443/client/x",),
    "userinfo": ("spiffe://user@demo.vvault/client/x",),
    "dot-segment": ("spiffe://demo.vvault/client/../x",),
    "query": ("spiffe://demo.vvault/client/x?a=b",),
    "fragment": ("spiffe://demo.vvault/client/x#f",),
    "empty-path": ("spiffe://demo.vvault",),
    "empty-segment": ("spiffe://demo.vvault/client//x",),
    "percent": ("spiffe://demo.vvault/client/%41",),
    "upper-scheme": ("SPIFFE://demo.vvault/client/x",),
    "too-long": ("spiffe://demo.vvault/" + "a" * 2100,),
    "foreign-domain": ("spiffe://other.domain/client/x",),
    "two-spiffe": ("spiffe://demo.vvault/client/a", "spiffe://demo.vvault/client/b"),
    "spiffe-and-https": ("spiffe://demo.vvault/client/a", "https://example.com/"),
}


@pytest.fixture(scope="module")
async def svid_pep(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer) -> AsyncIterator[PepRuntime]:
    for name, uris in BAD_SVIDS.items():
        issue_client(pki, f"svid-{name}", uris=uris)
    issue_client(pki, "svid-https-only", uris=("https://example.com/a", "https://example.com/b"))
    runtime = await _start(pki, opa, upstream, idp)
    yield runtime
    await runtime.stop()


@pytest.mark.parametrize("name", sorted(BAD_SVIDS))
async def test_an_invalid_svid_is_refused_even_where_a_user_token_is_enough(
    svid_pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream, name: str
) -> None:
    token = idp.token()
    assert await _status(svid_pep.port, client_context(pki, "reader"), USER, f"Authorization: Bearer {token}") == 200
    before = upstream.count()
    with pytest.raises(REFUSED):
        await _status(svid_pep.port, client_context(pki, f"svid-{name}"), USER, f"Authorization: Bearer {token}")
    assert upstream.count() == before


async def test_uri_sans_that_are_not_spiffe_ids_are_only_data(svid_pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    ctx = client_context(pki, "svid-https-only")
    assert await _status(svid_pep.port, ctx, USER, f"Authorization: Bearer {idp.token()}") == 200


# --- no session resumption -----------------------------------------------------


def _connect(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None]:
    """One HTTP exchange in blocking sockets (the stdlib exposes ``session=`` there)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(get(SECRET, host="open.id.test"))
        data = b""
        while chunk := tls.recv(65536):  # to the server's close_notify: a clean close keeps the session
            data += chunk
        assert data.startswith(b"HTTP/1.1 ")
        reused, got = tls.session_reused, tls.session
    return reused, got


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("listener", ["data", "admin"])
async def test_sessions_never_resume(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, version: ssl.TLSVersion, listener: str
) -> None:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=ID_ROUTES,
        identity=identity_config(idp),
        admin={
            "host": "127.0.0.1",
            "port": 0,
            "tls": {
                "cert_file": str(pki / "server.pem"),
                "key_file": str(pki / "server-key.pem"),
                "client_ca_file": str(pki / "ca.pem"),
            },
        },
    )
    pep = PepRuntime(Config.model_validate(doc))
    await pep.start()
    try:
        ctx = client_context(pki, "reader")
        ctx.minimum_version = ctx.maximum_version = version
        port = pep.port if listener == "data" else pep.admin_port
        session = None
        offered = 0
        for _ in range(3):
            reused, session = await asyncio.to_thread(_connect, port, ctx, session)
            assert not reused
            offered += session is not None
        assert offered  # the client did have a session to offer: the attempt was real
    finally:
        await pep.stop()


def test_the_server_context_has_no_session_cache(pki: Path) -> None:
    from vvault_pep.edge.listener import disable_session_cache, server_context

    config = Config.model_validate(config_doc(pki, opa_url="http://127.0.0.1:1", upstream_port=1))
    ctx = server_context(config.listener.tls)
    assert ctx.num_tickets == 0 and ctx.options & ssl.OP_NO_TICKET
    assert disable_session_cache(ctx)  # reading the mode back: it is off
