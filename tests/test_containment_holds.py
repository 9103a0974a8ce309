"""Containment that holds: every scope whatever credentials ride together, and through Redis loss.

Two PEP replicas, a real OPA, a real redis-server, real certificates, really signed tokens
and posture assertions.  What a user would check: the status and reason code on both
replicas, what Redis holds, the audit record, and how long recovery takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer, posture_assertion
from tests.support import ROUTES, OpaProcess, client_context, config_doc, start_serve

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

ADMIN = "containment-holds-admin-token-0123456789"
READER = "spiffe://demo.vvault/client/reader"
READER_TENANT = "registered-tenant"  # the tenant registered for the reader workload
OPEN = "/v1/tenants/{tenant}/stream/{n}"
CELL_ROUTES: list[dict[str, Any]] = [
    {
        "name": "h_open",
        "host": "open.h.test",
        "path": OPEN,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/plain_true",
        "cache": {"ttl_s": 60},
    },
    {
        "name": "h_tenant_limited",
        "host": "tenant-limited.h.test",
        "path": OPEN,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/plain_true",
        "rate_limit": {"per": "tenant", "rate_per_s": 0.01, "burst": 3},
    },
    {
        "name": "h_cert_limited",
        "host": "cert-limited.h.test",
        "path": OPEN,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/plain_true",
        "rate_limit": {"per": "certificate", "rate_per_s": 0.01, "burst": 2},
    },
]


def doc_for(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, redis_url: str, prefix: str
) -> dict[str, Any]:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        cache=True,
        routes=CELL_ROUTES + ROUTES,
        listener={"tls": {"client_auth": "optional"}},
        redis={"url": redis_url, "timeout_ms": 200, "retry_after_failure_s": 0.2, "key_prefix": prefix},
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN},
        identity={
            "issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}],
            "workload": {"trust_domains": ["demo.vvault"], "tenants": {READER: READER_TENANT}},
        },
        posture={
            "issuers": [{"name": "devices", "issuer": devices.url, "audiences": ["vvault-pep"], "allow_http": True}],
            "max_age_s": 60,
        },
    )
    doc["cache"] = {"debug_headers": True}  # X-Decision-Cache: which layer answered
    return doc


async def start_pair(doc: dict[str, Any]) -> tuple[PepRuntime, PepRuntime]:
    peps = (PepRuntime(Config.model_validate(doc)), PepRuntime(Config.model_validate(doc)))
    for pep in peps:
        await pep.start()
    return peps


@dataclass
class Answer:
    status: int
    code: str | None
    cache: str | None
    request_id: str


async def call(
    pep: PepRuntime,
    pki: Path,
    *,
    cert: str | None = None,
    token: str | None = None,
    posture: str | None = None,
    host: str = "open.h.test",
    tenant: str = "acme",
) -> Answer:
    headers = {"Host": host}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if posture is not None:
        headers["X-Device-Posture"] = posture
    connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"https://localhost:{pep.port}/v1/tenants/{tenant}/stream/1", headers=headers) as resp:
            problem = resp.content_type == "application/problem+json"
            body = await resp.json(content_type=None) if problem else {}
            return Answer(
                resp.status, body.get("code"), resp.headers.get("X-Decision-Cache"), resp.headers["X-Request-Id"]
            )


async def admin(pep: PepRuntime, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, f"http://127.0.0.1:{pep.admin_port}{path}", json=json, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)


async def quarantine(pep: PepRuntime, scope: str, value: str, ttl_s: int = 300) -> bool:
    status, doc = await admin(pep, "POST", "/admin/quarantines", {"scope": scope, "value": value, "ttl_s": ttl_s})
    assert status == 201, doc
    return bool(doc["shared"])


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> float:
    """Wait for a condition (never a fixed sleep); returns how long it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def thumbprint(pki: Path, name: str) -> str:
    pem = (pki / f"client-{name}.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


# ---------------------------------------------------------------- scope × credentials


@dataclass(frozen=True)
class Caller:
    """One cell's credentials: fresh user, token id, device and tenant each time."""

    cert: str | None
    token: str | None
    posture: str | None
    user: str
    jti: str
    device: str
    tenant: str


CREDENTIALS = {
    "certificate": (True, False, False),
    "token": (False, True, False),
    "certificate+token": (True, True, False),
    "token+device": (False, True, True),
    "certificate+token+device": (True, True, True),
}
# scope → (the value to quarantine, the credentials it applies to): docs/continuous-verification.md
USER_CREDS = ("token", "certificate+token", "token+device", "certificate+token+device")
CERT_CREDS = ("certificate", "certificate+token", "certificate+token+device")
SCOPE_TABLE: dict[str, tuple[Callable[[Caller, Path, str], str], tuple[str, ...]]] = {
    "subject (user)": (lambda c, p, i: f"{i}|{c.user}", USER_CREDS),
    "subject (workload)": (lambda c, p, i: READER, CERT_CREDS),
    "workload": (lambda c, p, i: READER, CERT_CREDS),
    "certificate": (lambda c, p, i: thumbprint(p, "reader"), CERT_CREDS),
    "token": (lambda c, p, i: c.jti, USER_CREDS),
    "device": (lambda c, p, i: c.device, ("token+device", "certificate+token+device")),
    "tenant (token)": (lambda c, p, i: c.tenant, USER_CREDS),
    "tenant (workload)": (lambda c, p, i: READER_TENANT, CERT_CREDS),
}  # fmt: skip
CELLS = [(scope, creds) for scope, (_, applies) in SCOPE_TABLE.items() for creds in applies]


@pytest.fixture(scope="module")
async def pair(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, redis_server: RedisServer
) -> AsyncIterator[tuple[PepRuntime, PepRuntime]]:
    a, b = await start_pair(doc_for(pki, opa, upstream, idp, devices, redis_server.url, "holds-cells:"))
    yield a, b
    for pep in (a, b):
        await pep.stop()


@pytest.mark.parametrize(("scope", "credentials"), CELLS, ids=[f"{s}-{c}" for s, c in CELLS])
async def test_every_scope_holds_whatever_credentials_ride_with_it(
    pair: tuple[PepRuntime, PepRuntime],
    pki: Path,
    idp: Issuer,
    devices: Issuer,
    caplog: pytest.LogCaptureFixture,
    scope: str,
    credentials: str,
) -> None:
    a, b = pair
    with_cert, with_token, with_device = CREDENTIALS[credentials]
    n = uuid.uuid4().hex[:10]
    user, jti, device, tenant = f"u-{n}", f"jti-{n}", f"dev-{n}", f"tenant-{n}"
    token = idp.token(sub=user, jti=jti, tenant=tenant) if with_token else None
    posture = posture_assertion(devices, sub=user, device_id=device) if with_device else None
    caller = Caller("reader" if with_cert else None, token, posture, user, jti, device, tenant)
    make_value, _ = SCOPE_TABLE[scope]
    value = make_value(caller, pki, idp.url)
    kind = scope.split(" ")[0]

    async def answers() -> list[Answer]:
        return [await call(p, pki, cert=caller.cert, token=caller.token, posture=caller.posture) for p in (a, b)]

    async def all_served() -> bool:
        return [x.status for x in await answers()] == [200, 200]

    await until(all_served, "both replicas serving the caller")
    assert [x.status for x in await answers()] == [200, 200]  # and a cached allow is waiting on both
    assert await quarantine(a, kind, value) is True
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        contained = await answers()
    assert [(x.status, x.code) for x in contained] == [(403, "containment.quarantined")] * 2
    records = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == contained[1].request_id]
    assert [kind, value] in records[0]["scopes"]
    assert records[0]["shared_state"] == "ok"
    status, _ = await admin(a, "DELETE", f"/admin/quarantines/{kind}/{value}")
    assert status == 200
    await until(all_served, "the lift reaching both replicas")


# ---------------------------------------------------------------- Redis loss


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def lonely_pair(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, own_redis: RedisServer
) -> AsyncIterator[tuple[PepRuntime, PepRuntime]]:
    a, b = await start_pair(doc_for(pki, opa, upstream, idp, devices, own_redis.url, "holds:"))
    yield a, b
    for pep in (a, b):
        await pep.stop()


def direct(server: RedisServer) -> Any:
    return aioredis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)


async def quarantined_in_redis(server: RedisServer, keys: list[str]) -> bool:
    client = direct(server)
    try:
        return bool(await client.exists(*keys) == len(keys))
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


class Setup:
    """Three quarantines made on different replicas, and the callers they contain."""

    def __init__(self, pki: Path, idp: Issuer) -> None:
        n = uuid.uuid4().hex[:8]
        self.user = f"victim-{n}"
        self.tenant = f"tenant-{n}"
        self.pki, self.idp = pki, idp
        self.entries = [
            ("subject", f"{idp.url}|{self.user}"),
            ("tenant", self.tenant),
            ("certificate", thumbprint(pki, "ops")),
        ]
        self.keys = [f"holds:q:{{c}}:{s}:{v}" for s, v in self.entries]

    def callers(self) -> list[dict[str, Any]]:
        return [
            {"cert": "reader", "token": self.idp.token(sub=self.user)},
            {"token": self.idp.token(sub=f"other-{uuid.uuid4().hex[:6]}", tenant=self.tenant)},
            {"cert": "ops"},
        ]


async def all_contained(pair: tuple[PepRuntime, PepRuntime], setup: Setup) -> bool:
    for pep in pair:
        for caller in setup.callers():
            answer = await call(pep, setup.pki, **caller)
            if (answer.status, answer.code) != (403, "containment.quarantined"):
                return False
    return True


async def hold_while(pair: tuple[PepRuntime, PepRuntime], setup: Setup, done: Callable[[], Awaitable[bool]]) -> float:
    """Check every quarantine on every replica until ``done``; returns how long that took."""
    started = time.monotonic()
    while True:
        assert await all_contained(pair, setup), "a quarantine was lifted by Redis's loss"
        if await done():
            return time.monotonic() - started
        assert time.monotonic() - started < 15, "Redis never got the quarantines back"


async def test_redis_restarted_empty_lifts_nothing_and_gets_every_quarantine_back(
    lonely_pair: tuple[PepRuntime, PepRuntime], own_redis: RedisServer, pki: Path, idp: Issuer
) -> None:
    a, b = lonely_pair
    setup = Setup(pki, idp)
    for i, (scope, value) in enumerate(setup.entries):
        assert await quarantine((a, b)[i % 2], scope, value) is True
    assert await all_contained(lonely_pair, setup)
    own_redis.stop()  # no persistence in the test server: it comes back empty
    assert await all_contained(lonely_pair, setup)
    own_redis.start()
    took = await hold_while(lonely_pair, setup, lambda: quarantined_in_redis(own_redis, setup.keys))
    print(f"\nrecovery[restart empty]: every quarantine back in Redis {took:.2f}s after it restarted")
    assert took < 5
    assert sum(p.containment.written_back for p in lonely_pair if p.containment) >= len(setup.keys)  # it was empty
    for pep in lonely_pair:
        await until(functools.partial(_reachable, pep), "both replicas reading Redis again")


class AofRedis(RedisServer):
    """redis-server with AOF (fsync every second) in a directory of its own, as deploy/ runs it."""

    def __init__(self, data: Path) -> None:
        super().__init__()
        self.data = data

    def start(self) -> None:
        import shutil
        import socket
        import subprocess

        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.data)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", *args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")


async def test_redis_with_aof_killed_and_restarted_keeps_every_quarantine(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer
) -> None:
    server = AofRedis(tmp_path)
    server.start()
    pair = await start_pair(doc_for(pki, opa, upstream, idp, devices, server.url, "holds:"))
    try:
        setup = Setup(pki, idp)
        for i, (scope, value) in enumerate(setup.entries):
            assert await quarantine(pair[i % 2], scope, value) is True
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        assert await all_contained(pair, setup)
        server.start()
        started = time.monotonic()
        took = await hold_while(pair, setup, lambda: quarantined_in_redis(server, setup.keys))
        await until(lambda: _reachable(pair[0]), "replica A reading Redis again")
        await until(lambda: _reachable(pair[1]), "replica B reading Redis again")
        print(
            f"\nrecovery[AOF restart]: quarantines in Redis {took:.2f}s, "
            f"both replicas reading it {time.monotonic() - started:.2f}s after the restart"
        )
    finally:
        for pep in pair:
            await pep.stop()
        server.stop()


async def test_flushall_lifts_nothing_and_every_quarantine_is_written_back(
    lonely_pair: tuple[PepRuntime, PepRuntime], own_redis: RedisServer, pki: Path, idp: Issuer
) -> None:
    a, b = lonely_pair
    setup = Setup(pki, idp)
    for i, (scope, value) in enumerate(setup.entries):
        assert await quarantine((a, b)[i % 2], scope, value) is True
    client = direct(own_redis)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    took = await hold_while(lonely_pair, setup, lambda: quarantined_in_redis(own_redis, setup.keys))
    print(f"\nrecovery[FLUSHALL]: every quarantine back in Redis {took:.2f}s after the flush")
    assert took < 5
    snapshot = [p.shared_state() for p in lonely_pair]
    assert sum(s["data_losses"] for s in snapshot) >= 1


async def test_a_quarantine_made_during_an_outage_reaches_the_other_replica_within_two_seconds(
    lonely_pair: tuple[PepRuntime, PepRuntime],
    own_redis: RedisServer,
    pki: Path,
    idp: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = lonely_pair
    user = f"outage-{uuid.uuid4().hex[:8]}"
    token = idp.token(sub=user)
    assert (await call(b, pki, token=token)).status == 200
    own_redis.stop()
    await until(lambda: _unreachable(a), "replica A noticing the outage")
    assert await quarantine(a, "subject", f"{idp.url}|{user}") is False  # made here, Redis could not hear it
    _, ready = await _readyz(a)
    assert ready["checks"]["shared_state"]["reachable"] is False
    assert ready["checks"]["shared_state"]["enforcing"] == "local"
    assert ready["checks"]["shared_state"]["unshared_quarantines"] == 1
    metrics = await _metrics(a)
    assert (_metric(metrics, "vvault_pep_redis_reachable"), _metric(metrics, "vvault_pep_containment_unshared")) == (
        0,
        1,
    )
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        refused = await call(a, pki, token=token)
    assert refused.code == "containment.quarantined"
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == refused.request_id]
    assert record["shared_state"] == "unavailable"
    own_redis.start()
    started = time.monotonic()

    async def contained_on_b() -> bool:
        return (await call(b, pki, token=token)).code == "containment.quarantined"

    took = await until(contained_on_b, "replica B enforcing A's outage quarantine")
    print(f"\nrecovery[outage quarantine]: enforced on the other replica {took:.2f}s after Redis returned")
    assert took < 2.0
    assert time.monotonic() - started < 2.0
    _, ready = await _readyz(a)
    assert ready["checks"]["shared_state"]["unshared_quarantines"] == 0

    async def reachable_again() -> bool:
        # A pooled connection from before the restart fails once on its first use and
        # opens the circuit for retry_after_failure_s: wait for it to close.
        return _metric(await _metrics(a), "vvault_pep_redis_reachable") == 1

    await until(reachable_again, "replica A seeing Redis again")
    metrics = await _metrics(a)
    assert _metric(metrics, "vvault_pep_containment_unshared") == 0
    assert _metric(metrics, "vvault_pep_containment_written_back_total") >= 1


async def test_an_epoch_bumped_during_an_outage_leaves_no_stale_cached_allow(
    lonely_pair: tuple[PepRuntime, PepRuntime],
    own_redis: RedisServer,
    pki: Path,
    idp: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = lonely_pair
    user = f"epoch-{uuid.uuid4().hex[:8]}"
    token = idp.token(sub=user)
    for pep in (a, b):
        await call(pep, pki, token=token)
        assert (await call(pep, pki, token=token)).cache == "l1"  # an allow cached on both
    own_redis.stop()
    await until(lambda: _unreachable(a), "replica A noticing the outage")
    status, doc = await admin(a, "POST", "/admin/cache/invalidate", {"scope": "subject", "value": f"{idp.url}|{user}"})
    assert (status, doc["shared"]) == (200, False)
    assert (await call(a, pki, token=token)).cache == "miss"  # honoured here at once
    own_redis.start()
    started = time.monotonic()
    key = f"holds:epoch:{{c}}:subject:{idp.url}|{user}"
    client = direct(own_redis)
    try:

        async def bump_in_redis() -> bool:
            with contextlib.suppress(OSError, aioredis.RedisError):
                return await client.get(key) is not None
            return False

        await until(bump_in_redis, "the bump made during the outage written back")
        await until(lambda: _reachable(b), "replica B reading Redis again")
        took = time.monotonic() - started
        print(f"\nrecovery[outage epoch bump]: the bump in Redis, the other replica reading it, {took:.2f}s")
        # The same input as the cached allow (risk available again, same score): only the
        # epoch differs, and B must ask OPA again rather than answer from before the bump.
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            again = await call(b, pki, token=token)
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == again.request_id]
        assert record["input"]["risk"]["available"] is True
        assert (again.status, again.cache) == (200, "miss")
        assert (await call(b, pki, token=token)).cache == "l1"  # cached again, under the new epoch
        # A flush does not take the epoch back: the replicas push it past its old value.
        before = int(await client.get(key))
        await client.flushall()

        async def forward_again() -> bool:
            value = await client.get(key)
            return value is not None and int(value) > before

        await until(forward_again, "the epoch written back past its old value")
        assert (await call(b, pki, token=token)).cache == "miss"  # never the entry of the old epoch
    finally:
        await client.aclose()


async def _reachable(pep: PepRuntime) -> bool:
    return pep.shared is not None and pep.shared.reachable and pep.shared.available


async def _unreachable(pep: PepRuntime) -> bool:
    return pep.shared is not None and not (pep.shared.reachable and pep.shared.available)


def _metric(text: str, name: str) -> float:
    [value] = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " "))]
    return value


async def _metrics(pep: PepRuntime) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{pep.admin_port}/metrics") as resp:
            return await resp.text()


async def _readyz(pep: PepRuntime) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{pep.admin_port}/readyz") as resp:
            return resp.status, await resp.json(content_type=None)


# ---------------------------------------------------------------- rate limits


async def test_no_caller_can_spend_another_tenants_budget(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, b = pair
    victim = f"victim-{uuid.uuid4().hex[:8]}"
    rivals = [
        {"token": idp.token(sub="nobody", tenant=None)},  # a user of no tenant
        {"cert": "ops"},  # a workload with no registered tenant
        {"token": idp.token(sub="rival", tenant=f"rival-{uuid.uuid4().hex[:6]}")},  # another tenant's user
        {"cert": "reader"},  # a workload registered to another tenant
    ]
    for rival in rivals:
        for pep in (a, b, a, b):  # past the burst of 3: the rival's own bucket runs dry
            await call(pep, pki, host="tenant-limited.h.test", tenant=victim, **rival)
        assert (await call(a, pki, host="tenant-limited.h.test", tenant=victim, **rival)).status == 429
    victim_token = idp.token(sub="owner", tenant=victim)
    served = [
        (await call(p, pki, host="tenant-limited.h.test", tenant=victim, token=victim_token)).status for p in (a, b, a)
    ]
    assert served == [200, 200, 200]  # the tenant's whole burst is still its own
    assert (await call(b, pki, host="tenant-limited.h.test", tenant=victim, token=victim_token)).status == 429


async def test_a_certificate_is_limited_however_many_users_ride_on_it(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, b = pair
    n = uuid.uuid4().hex[:6]
    host = "cert-limited.h.test"
    first = [
        (await call(p, pki, host=host, cert="ops", token=idp.token(sub=f"u{i}-{n}"))).status
        for i, p in enumerate((a, b))
    ]
    assert first == [200, 200]  # burst 2, across replicas
    third = await call(a, pki, host=host, cert="ops", token=idp.token(sub=f"u3-{n}"))
    assert third.status == 429  # another user, the same certificate: the same bucket
    assert (await call(b, pki, host=host, cert="reader", token=idp.token(sub=f"u1-{n}"))).status == 200


# ---------------------------------------------------------------- two `vvault-pep serve` processes


async def serve_call(port: int, pki: Path, token: str) -> tuple[int, str | None]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, None), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(
            f"https://localhost:{port}/v1/tenants/acme/stream/1",
            headers={"Host": "open.h.test", "Authorization": f"Bearer {token}"},
        ) as resp:
            problem = resp.content_type == "application/problem+json"
            return resp.status, (await resp.json(content_type=None))["code"] if problem else None


async def test_two_served_replicas_through_a_killed_redis(
    tmp_path: Path,
    pki: Path,
    opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    devices: Issuer,
    own_redis: RedisServer,
) -> None:
    """As run: two processes, Redis SIGKILLed and back empty, a quarantine made on A meanwhile."""
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc_for(pki, opa, upstream, idp, devices, own_redis.url, "served:")))
    a, b = await start_serve(path), await start_serve(path)
    try:
        n = uuid.uuid4().hex[:8]
        early, late = idp.token(sub=f"early-{n}"), idp.token(sub=f"late-{n}")
        async with aiohttp.ClientSession() as http:

            async def add(port: int, user: str) -> bool:
                body = {"scope": "subject", "value": f"{idp.url}|{user}", "ttl_s": 300}
                async with http.post(
                    f"http://127.0.0.1:{port}/admin/quarantines",
                    json=body,
                    headers={"Authorization": f"Bearer {ADMIN}"},
                ) as resp:
                    assert resp.status == 201
                    return bool((await resp.json())["shared"])

            assert await add(a.admin_port, f"early-{n}") is True
            for port in (a.port, b.port):
                assert await serve_call(port, pki, early) == (403, "containment.quarantined")
                assert (await serve_call(port, pki, late))[0] == 200
            assert own_redis.proc is not None
            own_redis.proc.kill()  # no shutdown, no persistence: it comes back empty
            own_redis.proc.wait(10)

            async def a_sees_outage() -> bool:
                async with http.get(f"http://127.0.0.1:{a.admin_port}/readyz") as resp:
                    return (await resp.json())["checks"]["shared_state"]["reachable"] is False

            await until(a_sees_outage, "replica A reporting the outage")
            assert await add(a.admin_port, f"late-{n}") is False
            for port in (a.port, b.port):  # the outage lifts nothing
                assert await serve_call(port, pki, early) == (403, "containment.quarantined")
            own_redis.start()

            async def both_hold() -> bool:
                for port in (a.port, b.port):
                    assert await serve_call(port, pki, early) == (403, "containment.quarantined")
                return all(
                    [await serve_call(port, pki, late) == (403, "containment.quarantined") for port in (a.port, b.port)]
                )

            took = await until(both_hold, "both quarantines on both served replicas")
            print(
                f"\nrecovery[served, SIGKILL + empty restart]: both replicas hold both {took:.2f}s after Redis returned"
            )
            assert took < 2.0
    finally:
        for served in (a, b):
            served.proc.send_signal(signal.SIGTERM)
        for served in (a, b):
            async with asyncio.timeout(30):
                await served.proc.wait()


# ---------------------------------------------------------------- a partitioned replica


class Cuttable:
    """A TCP relay to Redis on loopback that a test can cut and mend: one replica's partition."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


async def test_a_lift_reaches_a_replica_that_was_cut_off_and_nothing_is_resurrected(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, own_redis: RedisServer
) -> None:
    relay = Cuttable(own_redis.port)
    await relay.mend()
    a = PepRuntime(Config.model_validate(doc_for(pki, opa, upstream, idp, devices, own_redis.url, "cut:")))
    b_url = f"redis://127.0.0.1:{relay.port}/0"
    b = PepRuntime(Config.model_validate(doc_for(pki, opa, upstream, idp, devices, b_url, "cut:")))
    for pep in (a, b):
        await pep.start()
    try:
        user = f"cut-{uuid.uuid4().hex[:8]}"
        token, value = idp.token(sub=user), f"{idp.url}|{user}"
        assert await quarantine(a, "subject", value) is True
        assert (await call(b, pki, token=token)).code == "containment.quarantined"
        await relay.cut()
        await until(lambda: _unreachable(b), "replica B cut off")
        status, _ = await admin(a, "DELETE", f"/admin/quarantines/subject/{value}")
        assert status == 200
        assert (await call(a, pki, token=token)).status == 200
        # Cut off, B still holds what it knew: it cannot tell a lift from an outage.
        assert (await call(b, pki, token=token)).code == "containment.quarantined"
        await relay.mend()

        async def lifted_on_b() -> bool:
            return (await call(b, pki, token=token)).status == 200

        took = await until(lifted_on_b, "the lift reaching replica B")
        print(f"\nrecovery[partition, lift meanwhile]: the cut-off replica serves again {took:.2f}s after it ended")
        # B did not write its old copy back: the lift stands everywhere.
        assert not await quarantined_in_redis(own_redis, [f"cut:q:{{c}}:subject:{value}"])
        assert (await call(a, pki, token=token)).status == 200
        # A quarantine made after the lift is not taken for the lifted one (B may still be
        # reconnecting its pool: shared now or written back, it reaches A either way).
        await quarantine(b, "subject", value)

        async def held_on_both() -> bool:
            return [(await call(p, pki, token=token)).code for p in (a, b)] == ["containment.quarantined"] * 2

        await until(held_on_both, "the new quarantine on both replicas")
    finally:
        for pep in (a, b):
            await pep.stop()
        with contextlib.suppress(AssertionError, OSError):
            await relay.cut()
