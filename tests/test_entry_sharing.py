"""Cached tokens and answers share what they have in common, and stay correct and bounded.

The verified-token cache keeps one object per distinct tenant, subject, role or scope
list and key id; the L1 decision cache one bytes object per distinct stored answer.  What
a user checks: a token still maps to its own claims (sharing never mixes two callers), an
answer read back is the one stored, and the tables that do the sharing never grow past
their bounds whatever the callers send.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from tests.support import run_on_own_loop as run

from vvault_pep.config.models import Cache, Issuer, Route
from vvault_pep.config.models import Identity as IdentityConfig
from vvault_pep.decide import cache as cache_mod
from vvault_pep.decide.cache import CacheHints, DecisionCache
from vvault_pep.identity import authn as authn_mod
from vvault_pep.identity.authn import Authenticator

pytestmark = pytest.mark.timeout(60)

SECRET = "entry-sharing-" * 4
ISSUER = Issuer(
    name="t", issuer="https://issuer.test", audiences=("vvault",), algorithms=("HS256",), shared_secret=SECRET
)


ROUTE = Route(name="r", path="/v1/r", upstream="app", policy="vvault/authz")


def token(jti: str, **over: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER.issuer,
        "aud": "vvault",
        "sub": "alice",
        "tenant": "acme",
        "roles": ["reader"],
        "scope": "secrets:read",
        "iat": now,
        "exp": now + 600,
        "jti": jti,
        **over,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "at+jwt"})


def authenticator(entries: int = 100) -> Authenticator:
    return Authenticator(IdentityConfig(issuers=(ISSUER,), verified_cache_entries=entries))


def test_tokens_of_one_caller_share_their_claim_values_and_keep_their_own() -> None:
    a = authenticator()
    first = run(a.verify(token("j1")))
    second = run(a.verify(token("j2")))
    other = run(a.verify(token("j3", sub="bob", tenant="globex", roles=["admin"], scope="vectors:write")))
    assert first.roles is second.roles and first.tenant is second.tenant and first.scopes is second.scopes
    assert (first.token_id, second.token_id) == ("j1", "j2")
    assert (other.subject, other.tenant, other.roles, other.scopes) == ("bob", "globex", ("admin",), ("vectors:write",))
    assert (first.subject, first.tenant, first.roles, first.scopes) == ("alice", "acme", ("reader",), ("secrets:read",))


def test_passthrough_claims_are_a_tokens_own_and_none_is_a_read_only_shared_empty() -> None:
    passing = Issuer(**{**ISSUER.model_dump(), "passthrough_claims": ("email",)})
    a = Authenticator(IdentityConfig(issuers=(passing,), verified_cache_entries=100))
    plain = run(a.verify(token("j1")))
    also_plain = run(a.verify(token("j2")))
    alice = run(a.verify(token("j3", email="alice@example.com")))
    bob = run(a.verify(token("j4", sub="bob", email="bob@example.com")))
    assert plain.claims is also_plain.claims and dict(plain.claims) == {}
    with pytest.raises(TypeError):
        plain.claims["email"] = "mallory@example.com"  # type: ignore[index]
    assert (dict(alice.claims), dict(bob.claims)) == ({"email": "alice@example.com"}, {"email": "bob@example.com"})
    assert run(a.verify(token("j5"))).claims == {}  # nothing written into the shared one


def test_the_shared_value_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authn_mod, "_SHARED_MAX", 8)
    a = authenticator()
    for i in range(40):
        user = run(a.verify(token(f"j{i}", sub=f"user-{i}", tenant=f"tenant-{i}")))
        assert (user.subject, user.tenant) == (f"user-{i}", f"tenant-{i}")
        assert len(a._shared) <= 8


def _lookup(cache: DecisionCache, doc: dict[str, Any]) -> Any:
    return run(cache.lookup(ROUTE, doc, ("r1", [0])))


def test_equal_answers_share_one_stored_object_and_read_back_as_stored() -> None:
    cache = DecisionCache(Cache(), None)
    answer = {"allow": True, "obligations": {"headers": {"X-Tenant": "acme"}}}
    docs = [{"request": {"path": f"/v1/r/{i}"}} for i in range(3)]
    for doc in docs:
        cache.store(ROUTE, doc, dict(answer), ttl_s=30, hints=CacheHints(), revision="r1", epochs=[0])
    cache.store(
        ROUTE,
        {"request": {"path": "/v1/deny"}},
        {"allow": False},
        ttl_s=30,
        hints=CacheHints(),
        revision="r1",
        epochs=[0],
    )
    stored = [entry.result for entry in cache._l1.values()]
    assert stored[0] is stored[1] is stored[2] and stored[3] is not stored[0]
    for doc in docs:
        assert _lookup(cache, doc)[:2] == (answer, "l1")
    assert _lookup(cache, {"request": {"path": "/v1/deny"}})[:2] == ({"allow": False}, "l1")


def test_the_shared_answer_table_is_bounded_in_count_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "_INTERPRETED_MAX", 4)
    cache = DecisionCache(Cache(), None)
    for i in range(20):
        cache.store(ROUTE, {"n": i}, {"allow": True, "n": i}, ttl_s=30, hints=CacheHints(), revision="r1", epochs=[0])
        assert len(cache._payloads) <= 4
    big = {"allow": True, "pad": "x" * (cache_mod._SHARED_MAX_BYTES + 1)}
    cache.store(ROUTE, {"big": 1}, big, ttl_s=30, hints=CacheHints(), revision="r1", epochs=[0])
    assert all(len(p) <= cache_mod._SHARED_MAX_BYTES for p in cache._payloads)
    assert _lookup(cache, {"big": 1})[:2] == (big, "l1")
