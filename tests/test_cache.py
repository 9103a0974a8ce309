"""Decision cache: real OPA, real redis-server, two PEP instances sharing them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer
from tests.support import ROUTES, OpaProcess, client_context, config_doc, start_opa

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Cache, Config, Route
from vvault_pep.decide.cache import CacheHints, digest, hints_of, lifetime, project, whole_input

ADMIN_TOKEN = "test-admin-token-0123456789abcdef-0123"
SECRET_PATH = "/v1/tenants/{tenant}/secrets/{path*}"
CACHE_ROUTES: list[dict[str, Any]] = [
    {
        "name": "c_echo",
        "host": "echo.cache.test",
        "path": SECRET_PATH,
        "methods": ["GET", "HEAD"],
        "upstream": "vvault",
        "policy": "faults/echo_all",
        "cache": {"ttl_s": 60},
    },
    {
        "name": "c_echo_other",
        "host": "other.cache.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/echo_all",
        "cache": {"ttl_s": 60},
    },
    {
        "name": "c_authz",
        "host": "authz.cache.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "vvault/authz/decision",
        "cache": {"ttl_s": 60, "deny_ttl_s": 60},
    },
    {
        "name": "c_gate",
        "host": "gate.cache.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/subject_gate",
        "cache": {"ttl_s": 60},
    },
    {
        "name": "c_nostore",
        "host": "nostore.cache.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/no_store",
        "cache": {"ttl_s": 60},
    },
    {
        "name": "c_vary",
        "host": "vary.cache.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/vary_subject",
        "cache": {"ttl_s": 60},
    },
]
HMAC_ISSUER = "https://hmac.example"
HMAC_SECRET = "0123456789abcdef0123456789abcdef-test-only"


@pytest.fixture(scope="module")
def cache_opa() -> Iterator[OpaProcess]:
    """An OPA of its own: these tests change its data."""
    proc = start_opa()
    yield proc
    proc.stop()


def cache_config(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, redis_url: str) -> Config:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        cache=True,
        routes=CACHE_ROUTES + ROUTES,
        listener={"tls": {"client_auth": "optional"}},
        redis={"url": redis_url, "timeout_ms": 200},
        risk={"enabled": False},  # risk bands would (rightly) split keys as denials pile up
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "token_may_push": True},
        identity={
            "issuers": [
                {"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True},
                {
                    "name": "hmac",
                    "issuer": HMAC_ISSUER,
                    "audiences": ["vvault"],
                    "algorithms": ["HS256"],
                    "shared_secret": HMAC_SECRET,
                },
            ]
        },
    )
    doc["cache"] = {"policy_check_s": 2}  # modules re-hashed on every revision check: changes behind the PEP's back
    return Config.model_validate(doc)


@pytest.fixture(scope="module")
async def pair(
    pki: Path, cache_opa: OpaProcess, upstream: Upstream, idp: Issuer, redis_server: RedisServer
) -> AsyncIterator[tuple[PepRuntime, PepRuntime]]:
    a = PepRuntime(cache_config(pki, cache_opa, upstream, idp, redis_server.url))
    b = PepRuntime(cache_config(pki, cache_opa, upstream, idp, redis_server.url))
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


async def ask(
    pep: PepRuntime,
    pki: Path,
    host: str,
    *,
    path: str = "/v1/tenants/acme/secrets/db-password",
    token: str | None = None,
    cert: str | None = "reader",
    method: str = "GET",
) -> tuple[int, str, dict[str, Any] | None, str]:
    """(status, cache layer from the audit record, the echo the upstream saw, request id)."""
    headers = {"Host": host}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    logger = logging.getLogger("vvault_pep.audit")
    records: list[dict[str, Any]] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(getattr(record, "audit", None), dict):
                records.append(record.audit)  # type: ignore[attr-defined]

    handler = Grab()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.request(method, f"https://localhost:{pep.port}{path}", headers=headers) as resp:
                await resp.read()
                status, request_id = resp.status, resp.headers["X-Request-Id"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert pep.cache is not None
    await pep.cache.drain()  # L2 writes are off the request path; let them land
    [record] = [r for r in records if r.get("request_id") == request_id]
    echo = None
    for entry in _upstream.app_seen(request_id):
        raw = dict(entry["headers"]).get("X-Vvault-Echo")
        echo = json.loads(raw) if raw else None
    return status, record.get("cache", "?"), echo, request_id


class _Seen:
    upstream: Upstream | None = None

    def app_seen(self, request_id: str) -> list[dict[str, Any]]:
        assert self.upstream is not None
        return self.upstream.seen_with(request_id)


_upstream = _Seen()


@pytest.fixture(autouse=True)
def _bind_upstream(upstream: Upstream) -> None:
    _upstream.upstream = upstream


def hmac_token(idp: Issuer, **claims: Any) -> str:
    import jwt

    return jwt.encode(idp.claims(iss=HMAC_ISSUER, **claims), HMAC_SECRET, algorithm="HS256", headers={"typ": "at+jwt"})


# ------------------------------------------------------------------ keys never confuse


async def test_a_cached_allow_is_reused_only_for_the_same_question(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, _ = pair
    alice = idp.token(sub="alice", roles=["reader"])
    base = {"token": alice}
    status, layer, echo, _ = await ask(a, pki, "echo.cache.test", **base)
    assert (status, layer) == (200, "miss")
    assert echo is not None and echo["subject"] == "alice"
    status, layer, echo, _ = await ask(a, pki, "echo.cache.test", **base)
    assert (status, layer) == (200, "l1")
    assert echo is not None and echo["subject"] == "alice"

    variants: list[tuple[str, dict[str, Any], str, Any]] = [
        ("method", {"method": "HEAD"}, "method", "HEAD"),
        ("path", {"path": "/v1/tenants/acme/secrets/other"}, "path", "/v1/tenants/acme/secrets/other"),
        (
            "tenant",
            {"path": "/v1/tenants/globex/secrets/db-password"},
            "path",
            "/v1/tenants/globex/secrets/db-password",
        ),
        ("subject", {"token": idp.token(sub="mallory", roles=["reader"])}, "subject", "mallory"),
        ("roles", {"token": idp.token(sub="alice", roles=["admin"])}, "roles", ["admin"]),
        ("issuer", {"token": hmac_token(idp, sub="alice", roles=["reader"])}, "issuer", HMAC_ISSUER),
        ("certificate", {"token": alice, "cert": "ops"}, "cert", None),
        ("no certificate", {"token": alice, "cert": None}, "cert", None),
    ]
    for name, change, field, expected in variants:
        kwargs = {**base, **change}
        status, layer, echo, _ = await ask(a, pki, "echo.cache.test", **kwargs)
        assert layer == "miss", f"{name}: a different question was answered from cache"
        assert echo is not None
        if field == "cert":
            assert echo["cert"] != _reader_thumb(pki), name
        else:
            assert echo[field] == expected, name
        # and the second time, its own entry
        status, layer, echo2, _ = await ask(a, pki, "echo.cache.test", **kwargs)
        assert (layer, echo2) == ("l1", echo), name

    status, layer, echo, _ = await ask(a, pki, "other.cache.test", **base)
    assert layer == "miss"
    assert echo is not None and echo["route"] == "c_echo_other"


def _reader_thumb(pki: Path) -> str:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


async def test_fields_that_would_collide_when_joined_stay_apart(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, _ = pair
    one = idp.token(sub="a:b", tenant="c")
    two = idp.token(sub="a", tenant="b:c")
    _, l1, e1, _ = await ask(a, pki, "echo.cache.test", token=one)
    _, l2, e2, _ = await ask(a, pki, "echo.cache.test", token=two)
    assert (l1, l2) == ("miss", "miss")
    assert e1 is not None and e2 is not None
    assert (e1["subject"], e1["tenant"]) == ("a:b", "c")
    assert (e2["subject"], e2["tenant"]) == ("a", "b:c")


def test_canonical_key_material_has_no_join_collisions() -> None:
    one = project({"identity": {"subject": "a:b", "tenant": "c"}}, ("identity.subject", "identity.tenant"))
    two = project({"identity": {"subject": "a", "tenant": "b:c"}}, ("identity.subject", "identity.tenant"))
    assert digest("entry", "p", "r", [], one) != digest("entry", "p", "r", [], two)
    missing = project({"identity": {}}, ("identity.subject",))
    null = project({"identity": {"subject": None}}, ("identity.subject",))
    assert digest("entry", "p", "r", [], missing) != digest("entry", "p", "r", [], null)


def test_whole_input_drops_only_per_request_fields() -> None:
    doc = {
        "request": {"id": "x", "path": "/a", "headers": {"traceparent": ["t"], "accept": ["*/*"]}},
        "source": {"ip": "1.2.3.4", "port": 5},
        "time": {"now": "n"},
        "identity": {"subject": "s"},
    }
    assert whole_input(doc) == {
        "request": {"path": "/a", "headers": {"accept": ["*/*"]}},
        "source": {"ip": "1.2.3.4"},
        "identity": {"subject": "s"},
    }
    assert doc["request"]["id"] == "x"  # the input itself is untouched


# ------------------------------------------------------------------ lifetimes


ROUTE = Route(name="r", path="/r", upstream="u", policy="p/q", cache={"ttl_s": 60, "deny_ttl_s": 5})
CFG = Cache()


@pytest.mark.parametrize(
    ("allow", "hints", "token_exp", "expected"),
    [
        (True, CacheHints(), None, 60),
        (False, CacheHints(), None, 5),
        (True, CacheHints(ttl_s=7), None, 7),
        (True, CacheHints(ttl_s=600), None, 60),
        (True, CacheHints(), 1000 + 3, 3),  # never past the token's exp
        (True, CacheHints(), 1000 - 3, 0),
        (True, CacheHints(no_store=True), None, 0),
    ],
)
def test_lifetime(allow: bool, hints: CacheHints, token_exp: int | None, expected: float) -> None:
    assert lifetime(allow=allow, route=ROUTE, cfg=CFG, hints=hints, token_exp=token_exp, now=1000) == expected


@pytest.mark.parametrize(
    ("result", "hints"),
    [
        ({"allow": True}, CacheHints()),
        ({"allow": True, "cache": {"ttl_s": 3, "vary": ["identity.subject"]}}, CacheHints(3.0, ("identity.subject",))),
        ({"allow": True, "cache": {"no_store": True}}, CacheHints(no_store=True)),
        ({"allow": True, "cache": {"ttl_s": "3"}}, CacheHints(no_store=True)),
        ({"allow": True, "cache": {"ttl_s": True}}, CacheHints(no_store=True)),
        ({"allow": True, "cache": {"vary": "identity.subject"}}, CacheHints(no_store=True)),
        ({"allow": True, "cache": []}, CacheHints(no_store=True)),
        (True, CacheHints()),
    ],
)
def test_decision_cache_hints(result: Any, hints: CacheHints) -> None:
    assert hints_of(result) == hints


async def test_entry_never_outlives_its_token(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer, redis_server: RedisServer
) -> None:
    a, _ = pair
    exp = int(time.time()) + 4
    client = aioredis.from_url(redis_server.url)
    try:
        before = {k async for k in client.scan_iter("vvault-pep:dec:*")}
        status, layer, _, _ = await ask(a, pki, "echo.cache.test", token=idp.token(sub="short-lived", exp=exp))
        assert (status, layer) == (200, "miss")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not (new := {k async for k in client.scan_iter("vvault-pep:dec:*")} - before) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert len(new) == 1, "the request's entry was not written to L2"
        [key] = new
        # The entry's end is an instant in Redis (PXAT): the token's exp at the latest, however
        # long the write took to get there, and the blob says the same to every reader.
        ends_ms = await client.execute_command("PEXPIRETIME", key)
        blob = orjson.loads(await client.get(key))
    finally:
        await client.aclose()
    assert time.time() * 1000 < ends_ms <= exp * 1000
    assert blob["exp"] * 1000 == pytest.approx(ends_ms, abs=1)


# ------------------------------------------------------------------ sharing and invalidation


async def test_second_instance_hits_l2_and_corrupt_entries_are_misses(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer, redis_server: RedisServer
) -> None:
    a, b = pair
    token = idp.token(sub="shared-user")
    assert (await ask(a, pki, "echo.cache.test", token=token))[1] == "miss"
    status, layer, echo, _ = await ask(b, pki, "echo.cache.test", token=token)
    assert (status, layer) == (200, "l2")
    assert echo is not None and echo["subject"] == "shared-user"

    other = idp.token(sub="corrupted-user")
    assert (await ask(a, pki, "echo.cache.test", token=other))[1] == "miss"
    client = aioredis.from_url(redis_server.url)
    try:
        async for key in client.scan_iter("vvault-pep:dec:*"):
            await client.set(key, b"\x00not json", keepttl=True)
    finally:
        await client.aclose()
    status, layer, echo, _ = await ask(b, pki, "echo.cache.test", token=other)
    assert (status, layer) == (200, "miss")
    assert echo is not None and echo["subject"] == "corrupted-user"


async def test_cached_deny_stays_a_deny(pair: tuple[PepRuntime, PepRuntime], pki: Path) -> None:
    a, b = pair
    for pep, expected_layer in ((a, "miss"), (a, "l1"), (b, "l2"), (b, "l1")):
        status, layer, _, _ = await ask(pep, pki, "authz.cache.test", path="/v1/tenants/globex/secrets/db-password")
        assert (status, layer) == (403, expected_layer)


async def test_a_cached_answer_costs_no_redis_round_trip_while_pushed(
    pair: tuple[PepRuntime, PepRuntime], pki: Path
) -> None:
    """Quarantines and epochs are pushed into local state: an L1 hit does not wait for Redis.

    (While the push channel is not known healthy they are read, together, in one round
    trip: tests/test_push.py.)"""
    a, _ = pair
    assert a.shared is not None and a.push is not None
    async with asyncio.timeout(15):
        while not a.push.healthy:
            await asyncio.sleep(0.02)
    assert (await ask(a, pki, "authz.cache.test"))[0] == 200
    for _ in range(5):  # an attempt during which the channel lapsed (a stalled loop) proves nothing
        trips, reads, fallbacks = a.shared.batches, a.shared.batched_commands, a.push.fallbacks
        assert (await ask(a, pki, "authz.cache.test"))[:2] == (200, "l1")
        if a.push.fallbacks == fallbacks:
            break
    assert (a.shared.batches - trips, a.shared.batched_commands - reads) == (0, 0)


async def test_data_pushed_through_admin_changes_the_answer_on_both_instances(
    pair: tuple[PepRuntime, PepRuntime], pki: Path
) -> None:
    a, b = pair
    for pep in (a, b):
        await ask(pep, pki, "authz.cache.test")
        status, layer, _, _ = await ask(pep, pki, "authz.cache.test")
        assert (status, layer) == (200, "l1")
    original = json.loads((Path(__file__).parent.parent / "policies/vvault/workloads/data.json").read_text())

    async def push(clients: dict[str, Any]) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.put(
                f"http://127.0.0.1:{a.admin_port}/admin/opa/data/vvault/workloads",
                json=clients,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["revision_shared"] is True

    await push({"spiffe://demo.vvault/client/reader": {"tenants": ["globex"], "ops": ["read"]}})
    try:
        # the very next request, on both instances: B asks OPA, A finds B's fresh answer
        assert (await ask(b, pki, "authz.cache.test"))[:2] == (403, "miss")
        assert (await ask(a, pki, "authz.cache.test"))[:2] == (403, "l2")
    finally:
        await push(original)
    assert (await ask(a, pki, "authz.cache.test"))[:2] == (200, "miss")


async def test_tokens_seen_leave_no_state_behind(pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer) -> None:
    """Epochs are remembered only for scopes that were invalidated, not per token or subject seen."""
    a, _ = pair
    assert a.cache is not None
    before = dict(a.cache._epochs)
    for i in range(20):
        await ask(a, pki, "gate.cache.test", token=idp.token(sub=f"passer-by-{i}"))
    assert a.cache._epochs == before


async def test_invalidating_a_subject_flips_its_cached_allow_everywhere(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer, cache_opa: OpaProcess
) -> None:
    a, b = pair
    token = idp.token(sub="eve")
    bystander = idp.token(sub="frank")
    for pep in (a, b):
        await ask(pep, pki, "gate.cache.test", token=token)
        await ask(pep, pki, "gate.cache.test", token=bystander)
        assert (await ask(pep, pki, "gate.cache.test", token=token))[:2] == (200, "l1")
    # OPA learns of the revocation behind the PEP's back: cached allows would still be served …
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{cache_opa.url}/v1/data/faults_data/revoked", json=["eve"]) as resp:
            assert resp.status == 204
        assert (await ask(a, pki, "gate.cache.test", token=token))[:2] == (200, "l1")
        # … until the subject is invalidated, once, on one instance
        async with http.post(
            f"http://127.0.0.1:{a.admin_port}/admin/cache/invalidate",
            json={"scope": "subject", "value": f"{idp.url}|eve"},  # subjects are per issuer
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp:
            assert resp.status == 200
    assert (await ask(b, pki, "gate.cache.test", token=token))[:2] == (403, "miss")
    assert (await ask(a, pki, "gate.cache.test", token=token))[:2] == (403, "l2")
    for pep in (b, a):
        assert (await ask(pep, pki, "gate.cache.test", token=bystander))[:2] == (200, "l1")


async def test_policy_change_changes_the_answer(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, cache_opa: OpaProcess
) -> None:
    a, b = pair
    module = 'package faults_live\n\nanswer := {{"allow": {allow}}}\n'
    route_host = "gate.cache.test"  # any cached route: the revision is global
    for pep in (a, b):
        await ask(pep, pki, route_host, token=None)
        assert (await ask(pep, pki, route_host))[1] == "l1"
    # through the PEP's admin API: the very next request on both instances is re-asked
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"http://127.0.0.1:{a.admin_port}/admin/opa/policies/faults_live",
            data=module.format(allow="true"),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp:
            assert resp.status == 200
        async with http.put(
            f"http://127.0.0.1:{a.admin_port}/admin/opa/policies/broken",
            data=b"package broken\nthis is not rego",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp:
            assert resp.status == 400
    assert (await ask(b, pki, route_host))[1] == "miss"
    assert (await ask(a, pki, route_host))[1] in ("miss", "l2")
    # behind the PEP's back (straight to OPA): picked up within revision_check_s
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{cache_opa.url}/v1/policies/faults_live", data=module.format(allow="false")) as resp:
            assert resp.status == 200
    assert a.cache is not None
    before = a.cache.opa_revision
    async with asyncio.timeout(15):
        while a.cache.opa_revision == before:
            await asyncio.sleep(0.05)
    assert (await ask(a, pki, route_host))[1] == "miss"


async def test_no_store_is_honoured(pair: tuple[PepRuntime, PepRuntime], pki: Path) -> None:
    a, _ = pair
    for _ in range(2):
        status, layer, _, _ = await ask(a, pki, "nostore.cache.test")
        assert (status, layer) == (200, "miss")


async def test_vary_narrows_the_key_to_what_the_policy_read(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, _ = pair
    token = idp.token(sub="varied")
    assert (await ask(a, pki, "vary.cache.test", token=token))[1] == "miss"
    # another path, same subject: the policy said only the subject matters
    assert (await ask(a, pki, "vary.cache.test", token=token, path="/v1/tenants/acme/secrets/x"))[1] == "l1"
    assert (await ask(a, pki, "vary.cache.test", token=idp.token(sub="someone-else")))[1] == "miss"


async def test_admin_endpoints_need_the_admin_token(pair: tuple[PepRuntime, PepRuntime]) -> None:
    a, _ = pair
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}):
            async with http.post(
                f"http://127.0.0.1:{a.admin_port}/admin/cache/invalidate",
                json={"scope": "subject", "value": "x"},
                headers=headers,
            ) as resp:
                assert resp.status == 401
        async with http.post(
            f"http://127.0.0.1:{a.admin_port}/admin/cache/invalidate",
            json={"scope": "planet", "value": "x"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp:
            assert resp.status == 400


# ------------------------------------------------------------------ Redis down


async def test_redis_down_means_l1_and_opa_only_and_nothing_opens(
    pki: Path, cache_opa: OpaProcess, upstream: Upstream, idp: Issuer
) -> None:
    redis = RedisServer()
    redis.start()
    pep = PepRuntime(cache_config(pki, cache_opa, upstream, idp, redis.url))
    await pep.start()
    try:
        assert (await ask(pep, pki, "echo.cache.test", token=idp.token(sub="r1")))[:2] == (200, "miss")
        redis.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        r2 = idp.token(sub="r2")
        status, layer, echo, _ = await ask(pep, pki, "echo.cache.test", token=r2)
        assert (status, layer) == (200, "miss")
        assert echo is not None and echo["subject"] == "r2"
        assert loop.time() - started < 3  # Redis's deadline, not a hang
        assert (await ask(pep, pki, "echo.cache.test", token=r2))[1] == "l1"
        status, _, _, _ = await ask(pep, pki, "authz.cache.test", path="/v1/tenants/globex/secrets/db-password")
        assert status == 403
    finally:
        await pep.stop()
        redis.stop()


async def test_replicas_with_their_own_opa_never_share_answers(
    pki: Path, upstream: Upstream, idp: Issuer, redis_server: RedisServer
) -> None:
    """Sidecar OPAs may hold different data (a push reached one): L2 must not mix their answers."""
    opas = [start_opa(), start_opa()]
    peps = [PepRuntime(cache_config(pki, o, upstream, idp, redis_server.url)) for o in opas]
    try:
        for pep in peps:
            await pep.start()
        a, b = peps
        token = idp.token(sub="sidecar-eve")
        async with aiohttp.ClientSession() as http:
            async with http.put(
                f"http://127.0.0.1:{a.admin_port}/admin/opa/data/faults_data/revoked",
                json=["sidecar-eve"],
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as resp:
                assert resp.status == 200  # reached A's OPA only
        assert (await ask(b, pki, "gate.cache.test", token=token))[:2] == (200, "miss")  # B's OPA: not revoked
        assert (await ask(a, pki, "gate.cache.test", token=token))[:2] == (403, "miss")  # never B's allow
        assert (await ask(a, pki, "gate.cache.test", token=token))[:2] == (403, "l1")
    finally:
        for pep in peps:
            await pep.stop()
        for o in opas:
            o.stop()
