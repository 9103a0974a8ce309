"""The decision cache's rules as tables: key material, lifetimes, layers, epochs and revisions.

:class:`~vvault_pep.decide.cache.DecisionCache` is driven directly — without Redis for the
L1 rules, with a real redis-server (its own key prefix per test) for L2, epochs and the
revision counter.  What is checked is what decides whether a cached answer is served: which
inputs share a key and which never do, how long an entry lives, what a bump ends, here and on
another replica, and that nothing moves backwards when Redis forgets.  How a replica learns of
another's bump (a read, a push) is left open: the tests wait for the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import RedisServer
from tests.heard import until

from vvault_pep.config import Cache, Route
from vvault_pep.config.models import Redis as RedisConfig
from vvault_pep.core.policy_input import PER_REQUEST
from vvault_pep.decide import cache as dc
from vvault_pep.decide.cache import CacheHints, DecisionCache, hints_of, lifetime, project, whole_input, without
from vvault_pep.shared.state import SharedState


def route(name: str = "r", **cache: Any) -> Route:
    return Route(name=name, path="/r", upstream="u", policy="p/q", cache=cache or {"ttl_s": 60})


CTX: tuple[str, list[Any]] = ("rev#0#0", [["subject", "alice", 0, 0]])
DOC: dict[str, Any] = {"identity": {"subject": "alice"}, "request": {"id": "1", "path": "/a"}}


# --- key material ------------------------------------------------------------------


def test_project_is_sorted_unique_and_tells_absent_from_null() -> None:
    doc = {"a": {"b": 1, "n": None}, "c": [1], "s": "x"}
    assert project(doc, ("c", "a.b", "a.b", "a.n", "a.zz", "s.t", "c.0")) == [
        ["a.b", True, 1],
        ["a.n", True, None],
        ["a.zz", False],
        ["c", True, [1]],
        ["c.0", False],  # a list is not walked into
        ["s.t", False],  # nor a string
    ]
    assert project({}, ()) == []


def test_without_copies_only_what_it_changes() -> None:
    doc: dict[str, Any] = {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4, "g": "str"}
    out = without(doc, (("a", "b", "c"), ("f",), ("g", "h"), ("x", "y"), ("a", "e", "z")))
    assert out == {"a": {"b": {"d": 2}, "e": 3}, "g": "str"}
    assert doc == {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4, "g": "str"}  # untouched
    assert out["a"] is not doc["a"] and out["a"]["b"] is not doc["a"]["b"]


def test_whole_input_drops_every_volatile_field() -> None:
    doc = {
        "request": {"id": "x", "path": "/a", "headers": {"traceparent": ["t"], "x": ["y"]}},
        "source": {"ip": "1.2.3.4", "port": 5},
        "time": {"now": "n"},
        "device": {"age_s": 3, "id": "d"},
        "risk": {"score": 1, "signals": {"requests_in_window": 9, "baseline": 2, "new_network": True}},
    }
    assert whole_input(doc) == {
        "request": {"path": "/a", "headers": {"x": ["y"]}},
        "source": {"ip": "1.2.3.4"},
        "device": {"id": "d"},
        "risk": {"score": 1, "signals": {"new_network": True}},
    }


def test_the_key_format_is_sha256_of_tagged_sorted_json() -> None:
    expected = hashlib.sha256(b'["vvault-pep/cache/v2","a",{"x":1,"y":[2]}]').hexdigest()
    assert dc.digest("a", {"y": [2], "x": 1}) == expected


# --- the key in two parts, and a connection's memo of the first ------------------------

_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(["a", "b", ""]))
_PARTS = {  # what an input may hold, per-request parts (request.id, body, time, risk) included
    "identity": st.fixed_dictionaries({}, optional={"subject": _LEAF, "roles": st.lists(_LEAF, max_size=2)}),
    "request": st.fixed_dictionaries(
        {},
        optional={
            "id": _LEAF,
            "path": _LEAF,
            "body": st.dictionaries(st.sampled_from("xy"), _LEAF, max_size=2),
            "body_truncated": st.booleans(),
            "headers": st.dictionaries(st.sampled_from(["traceparent", "accept"]), _LEAF),
        },
    ),
    "time": st.fixed_dictionaries({}, optional={"now": _LEAF}),
    "risk": st.fixed_dictionaries(
        {}, optional={"band": _LEAF, "signals": st.dictionaries(st.sampled_from(["baseline", "new_network"]), _LEAF)}
    ),
    "source": st.fixed_dictionaries({}, optional={"ip": _LEAF, "port": _LEAF}),
}
_INPUTS = st.fixed_dictionaries({}, optional=_PARTS)
_PATHS = st.sampled_from(
    ["identity", "identity.subject", "request", "request.id", "request.body", "request.body.x", "request.path",
     "request.body_truncated", "request.headers.accept", "time", "time.now", "risk", "risk.band", "source.ip", "ri"]
)  # fmt: skip
_PER_REQUEST_PARTS = ("request.id", "request.body", "request.body_truncated", "time", "risk")


def _one_part_material(doc: dict[str, Any], paths: tuple[str, ...] | None) -> bytes:
    """What the key was made of before it came in two parts, as the bytes hashed (0 is not false)."""
    return orjson.dumps(whole_input(doc) if paths is None else project(doc, paths), option=orjson.OPT_SORT_KEYS)


def _with_parts_of(doc: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``other``'s per-request parts: what one memo entry's requests differ in."""
    out = {k: v for k, v in doc.items() if k not in ("time", "risk")}
    out.update({k: other[k] for k in ("time", "risk") if k in other})
    if "request" in doc:  # the request itself is never a per-request part: only what is in it
        request = {k: v for k, v in doc["request"].items() if k not in ("id", "body", "body_truncated")}
        request.update({k: v for k, v in other.get("request", {}).items() if k in ("id", "body", "body_truncated")})
        out["request"] = request
    return out


@settings(max_examples=300, deadline=None)
@given(
    first=_INPUTS,
    second=_INPUTS,
    paths=st.one_of(st.none(), st.lists(_PATHS, max_size=5).map(tuple)),
)
def test_the_two_part_key_tells_apart_exactly_what_the_material_does(
    first: dict[str, Any], second: dict[str, Any], paths: tuple[str, ...] | None
) -> None:
    """Two inputs share a key exactly when their one-part material is the same, with or
    without a memo of the first part; and a memo filled by one request serves another that
    differs only in the per-request parts with the key that request has without it."""
    c = DecisionCache(Cache(), None)
    r = route(ttl_s=60, key=paths) if paths is not None else route()
    sibling = _with_parts_of(first, second)  # the same connection and request, another moment
    memo: dc.KeyMemo = {}
    keys = {}
    for name, doc in (("first", first), ("sibling", sibling), ("second", second)):
        keys[name] = c.entry_key(r, doc, *CTX, None)
        if name != "second":
            assert c._key(r, *CTX, doc, None, memo) == keys[name]  # filled, then used
    assert len(memo) == 1
    for a, b in (("first", sibling), ("first", second)):
        same = _one_part_material(first, r.cache.key) == _one_part_material(b, r.cache.key)
        assert (keys[a] == c.entry_key(r, b, *CTX, None)) is same


async def test_a_memo_is_read_and_holds_a_few_digests() -> None:
    """The memo is what a recalled request's key is made from, not a copy made beside it:
    given an input that breaks its contract (another value outside the per-request parts),
    the key still has the remembered digest; and it keeps at most eight sets of paths."""
    c = DecisionCache(Cache(), None)
    r = route(ttl_s=60, key=("identity.subject", "risk.band"))
    alice = {"identity": {"subject": "alice"}, "risk": {"band": "low"}}
    bob = {"identity": {"subject": "bob"}, "risk": {"band": "low"}}
    memo: dc.KeyMemo = {}
    await stored(c, r, alice, {"allow": True})
    assert await looked(c, r, alice, memo=memo) == ({"allow": True}, "l1")
    assert await looked(c, r, bob, memo=memo) == ({"allow": True}, "l1")  # alice's digest, read from the memo
    assert await looked(c, r, bob) == (None, "miss")
    assert c._key(r, *CTX, bob, None, memo) == c.entry_key(r, alice, *CTX, None)
    many: dc.KeyMemo = {}
    for i in range(12):
        c._key(r, *CTX, alice, (f"p{i}",), many)  # another vary, another set of paths
    assert len(many) == 8


def test_the_per_request_parts_are_the_memos_own_list() -> None:
    assert tuple(".".join(p) for p in PER_REQUEST) == _PER_REQUEST_PARTS
    assert [p for p in ("", "request", "risk.band", "time.now", "request.idx", "identity") if dc.per_request(p)] == [
        "",
        "request",
        "risk.band",
        "time.now",
    ]


# --- hints and lifetimes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "hints"),
    [
        ({"cache": None}, CacheHints()),
        ({}, CacheHints()),
        ("allow", CacheHints()),
        ({"cache": {}}, CacheHints()),
        ({"cache": {"ttl_s": 0}}, CacheHints(0.0)),
        ({"cache": {"ttl_s": 2.5}}, CacheHints(2.5)),
        ({"cache": {"ttl_s": -1}}, CacheHints(no_store=True)),
        ({"cache": {"ttl_s": None, "vary": None}}, CacheHints()),
        ({"cache": {"vary": []}}, CacheHints(vary=())),
        ({"cache": {"vary": ["a", ""]}}, CacheHints(no_store=True)),
        ({"cache": {"vary": ["a", 1]}}, CacheHints(no_store=True)),
        ({"cache": {"no_store": False}}, CacheHints()),
        ({"cache": {"no_store": "yes"}}, CacheHints(no_store=True)),
        ({"cache": {"no_store": 1}}, CacheHints(no_store=True)),
        ({"cache": "x"}, CacheHints(no_store=True)),
    ],
)
def test_hints_are_strict(result: Any, hints: CacheHints) -> None:
    got = hints_of(result)
    assert got == hints
    assert type(got.ttl_s) is type(hints.ttl_s)  # a float, never the int it came as


R_TTL = Route(name="r", path="/r", upstream="u", policy="p/q", cache={"ttl_s": 60, "deny_ttl_s": 5})
R_DEFAULT = Route(name="d", path="/d", upstream="u", policy="p/q")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"allow": True, "route": R_DEFAULT}, 10.0),  # cfg.default_ttl_s
        ({"allow": False, "route": R_DEFAULT}, 2.0),  # cfg.deny_ttl_s
        ({"allow": True, "route": R_TTL, "cfg": Cache(max_ttl_s=30)}, 30.0),
        ({"allow": True, "route": R_TTL, "hints": CacheHints(ttl_s=0)}, 0.0),
        ({"allow": True, "route": R_TTL, "time_dependent": True}, 0.0),
        ({"allow": True, "route": R_TTL, "time_dependent": True, "hints": CacheHints(ttl_s=4)}, 4.0),
        ({"allow": True, "route": R_TTL, "time_dependent": True, "hints": CacheHints(ttl_s=4, no_store=True)}, 0.0),
        ({"allow": True, "route": R_TTL, "token_exp": 1060}, 60.0),
        ({"allow": True, "route": R_TTL, "token_exp": 1059}, 59.0),
        ({"allow": False, "route": R_TTL, "token_exp": 1001}, 1.0),
    ],
)
def test_lifetime_is_the_least_of_every_bound(kwargs: dict[str, Any], expected: float) -> None:
    args: dict[str, Any] = {"cfg": Cache(), "hints": CacheHints(), "token_exp": None, "now": 1000.0, **kwargs}
    assert lifetime(**args) == expected


# --- L1 without Redis ----------------------------------------------------------------


async def stored(c: DecisionCache, r: Route, doc: dict[str, Any], result: Any, ttl: float = 60, **kw: Any) -> None:
    revision, epochs = kw.pop("ctx", CTX)
    c.store(r, doc, result, ttl_s=ttl, hints=kw.pop("hints", CacheHints()), revision=revision, epochs=epochs)


async def looked(c: DecisionCache, r: Route, doc: dict[str, Any], ctx: Any = CTX, **kw: Any) -> tuple[Any, str]:
    result, layer, *_ = await c.lookup(r, doc, ctx, **kw)
    return result, layer


async def test_an_answer_is_served_for_the_same_question_only() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    await stored(c, r, DOC, {"allow": True})
    assert await looked(c, r, DOC) == ({"allow": True}, "l1")
    # per-request fields do not matter; everything else does
    assert await looked(c, r, {**DOC, "request": {"id": "2", "path": "/a"}}) == ({"allow": True}, "l1")
    assert await looked(c, r, {**DOC, "request": {"id": "1", "path": "/b"}}) == (None, "miss")
    assert await looked(c, route("other"), DOC) == (None, "miss")
    other_policy = Route(name="r", path="/r", upstream="u", policy="p/other", cache={"ttl_s": 60})
    assert await looked(c, other_policy, DOC) == (None, "miss")
    assert await looked(c, r, DOC, ("rev#1#0", CTX[1])) == (None, "miss")
    assert await looked(c, r, DOC, (CTX[0], [["subject", "alice", 1, 0]])) == (None, "miss")
    assert c.stats == {"l1": 2, "l2": 0, "miss": 5, "bypass": 0, "stored": 1}


async def test_no_context_or_a_route_that_does_not_cache_is_a_bypass() -> None:
    c = DecisionCache(Cache(), None)
    await stored(c, route(), DOC, {"allow": True})
    assert await c.lookup(route(), DOC, None) == (None, "bypass", "", [])
    off = route(enabled=False)
    await stored(c, off, DOC, {"allow": True})
    assert await c.lookup(off, DOC, CTX) == (None, "bypass", "", [])
    assert c.entry_key(off, DOC, *CTX, None) is None
    assert await c.key_of(off, DOC, CTX) is None
    assert await c.key_of(route(), DOC, None) is None
    assert c.stats["bypass"] == 2 and c.stats["stored"] == 1


async def test_a_key_projection_ignores_everything_else() -> None:
    c = DecisionCache(Cache(), None)
    r = route(ttl_s=60, key=("identity.subject",))
    await stored(c, r, DOC, {"allow": True})
    assert await looked(c, r, {**DOC, "request": {"path": "/zzz"}}) == ({"allow": True}, "l1")
    assert await looked(c, r, {"identity": {"subject": "bob"}}) == (None, "miss")
    assert await looked(c, r, {"identity": {}}) == (None, "miss")
    assert await c.key_of(r, DOC, CTX) == c.entry_key(r, DOC, *CTX, None)


async def test_vary_narrows_the_key_and_is_remembered_for_the_route() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    await stored(c, r, DOC, {"allow": True}, hints=CacheHints(vary=("identity.subject",)))
    assert await looked(c, r, {"identity": {"subject": "alice"}, "x": 1}) == ({"allow": True}, "l1")
    assert await looked(c, r, {"identity": {"subject": "bob"}}) == (None, "miss")
    # with a route key, vary adds to it
    k = route("k", ttl_s=60, key=("a",))
    await stored(c, k, {"a": 1, "b": 1}, "yes", hints=CacheHints(vary=("b",)))
    assert await looked(c, k, {"a": 1, "b": 1, "z": 0}) == ("yes", "l1")
    assert await looked(c, k, {"a": 2, "b": 1}) == (None, "miss")
    assert await looked(c, k, {"a": 1, "b": 2}) == (None, "miss")


async def test_an_expired_entry_is_a_miss_and_is_dropped() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    await stored(c, r, DOC, {"allow": True}, ttl=0.05)
    assert await looked(c, r, DOC) == ({"allow": True}, "l1")
    await asyncio.sleep(0.1)
    assert await looked(c, r, DOC) == (None, "miss")
    assert len(c._l1) == 0 and c._l1_bytes == 0


@pytest.mark.parametrize("ttl", [0, -1])
async def test_nothing_is_stored_for_no_lifetime(ttl: float) -> None:
    c = DecisionCache(Cache(), None)
    await stored(c, route(), DOC, {"allow": True}, ttl=ttl)
    assert await looked(c, route(), DOC) == (None, "miss")
    assert c.stats["stored"] == 0


async def test_l1_keeps_the_most_recently_used_within_its_limits() -> None:
    c = DecisionCache(Cache(l1_max_entries=2), None)
    r = route()
    docs = [{"n": i} for i in range(3)]
    await stored(c, r, docs[0], 0)
    await stored(c, r, docs[1], 1)
    assert (await looked(c, r, docs[0]))[1] == "l1"  # 0 is now the most recent
    await stored(c, r, docs[2], 2)
    assert [(await looked(c, r, d))[1] for d in docs] == ["l1", "miss", "l1"]
    # a bigger answer than the byte budget is never kept; the budget counts bytes
    small = DecisionCache(Cache(l1_max_bytes=10), None)
    await stored(small, r, docs[0], "x" * 9)  # 11 bytes of JSON
    assert (await looked(small, r, docs[0]))[1] == "miss"
    await stored(small, r, docs[0], "x" * 3)  # 5 bytes
    await stored(small, r, docs[1], "y" * 3)  # 10 in all: both fit
    assert [(await looked(small, r, d))[1] for d in docs[:2]] == ["l1", "l1"]
    await stored(small, r, docs[2], "z")  # 13: the least recently used goes
    assert [(await looked(small, r, d))[1] for d in docs] == ["miss", "l1", "l1"]
    assert small._l1_bytes == 8
    # restoring one key replaces its bytes, never counts them twice
    await stored(small, r, docs[2], "zz")
    assert small._l1_bytes == 9
    none = DecisionCache(Cache(l1_max_entries=0), None)
    await stored(none, r, docs[0], 0)
    assert (await looked(none, r, docs[0]))[1] == "miss"


async def test_a_hit_is_interpreted_once_per_distinct_answer() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    calls: list[Any] = []

    def interpret(result: Any) -> Any:
        calls.append(result)
        return ("seen", result["allow"])

    await stored(c, r, {"n": 1}, {"allow": True})
    await stored(c, r, {"n": 2}, {"allow": True})
    assert await looked(c, r, {"n": 1}, interpret=interpret) == (("seen", True), "l1")
    assert await looked(c, r, {"n": 1}, interpret=interpret) == (("seen", True), "l1")
    assert await looked(c, r, {"n": 2}, interpret=interpret) == (("seen", True), "l1")
    assert calls == [{"allow": True}]
    assert await looked(c, r, {"n": 1}) == ({"allow": True}, "l1")  # without: the raw result
    assert c.stats["l1"] == 4


async def test_a_corrupt_l1_entry_is_a_miss() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    await stored(c, r, DOC, {"allow": True})
    key = c.entry_key(r, DOC, *CTX, None)
    assert key is not None
    c._l1[key].result = b"{not json"
    assert await looked(c, r, DOC) == (None, "miss")
    assert key not in c._l1


# --- keys from the policy's own paths --------------------------------------------


async def test_the_policys_paths_key_a_route_only_under_their_revision() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    c.opa_revision = "b:1"
    c.use_policy_paths({"p/q": ("identity.subject", "time.now")}, "b:1")
    assert c.policy_paths(r) == ("identity.subject", "time.now")
    assert c.time_dependent(r) is True
    assert c.opa_input(r, {"identity": {"subject": "a", "x": 1}, "version": 1}) == {
        "identity": {"subject": "a"},
        "version": 1,
    }
    full = Route(name="r", path="/r", upstream="u", policy="p/q", opa_input="full")
    assert c.opa_input(full, DOC) is DOC
    ctx = ("b:1#0#0", [])
    await stored(c, r, {"identity": {"subject": "a"}, "time": {"now": 1}}, "ok", ctx=ctx)
    assert await looked(c, r, {"identity": {"subject": "a"}, "time": {"now": 2}, "z": 3}, ctx) == ("ok", "l1")
    assert await looked(c, r, {"identity": {"subject": "b"}}, ctx) == (None, "miss")
    # another revision runs: the paths no longer apply
    c.opa_revision = "b:2"
    assert c.policy_paths(r) is None
    assert c.opa_input(r, DOC) is DOC
    assert c.time_dependent(r) is True  # unknown paths may read the clock once paths were known
    c.forget_policy_paths()
    assert c.paths_revision is None and c.policy_paths(r) is None


def test_before_any_analysis_a_route_is_not_time_dependent() -> None:
    c = DecisionCache(Cache(), None)
    assert c.time_dependent(route()) is False
    c.opa_revision = "b:1"
    c.use_policy_paths({"p/q": ("identity.subject",)}, "b:1")
    assert c.time_dependent(route()) is False
    assert c.paths_revision == "b:1"


async def test_a_refused_route_is_not_cached_under_its_revision() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    c.opa_revision = "b:1"
    c.use_policy_paths({"p/q": ("identity.subject",)}, "b:1", frozenset({"r"}))
    await stored(c, r, DOC, "ok")
    assert await c.lookup(r, DOC, CTX) == (None, "bypass", "", [])
    c.opa_revision = "b:2"  # its paths no longer known: cached like any route
    await stored(c, r, DOC, "ok")
    assert await looked(c, r, DOC) == ("ok", "l1")


async def test_a_vary_that_leaves_out_a_path_the_policy_reads_is_ignored() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    c.opa_revision = "b:1"
    c.use_policy_paths({"p/q": ("identity.subject", "request.path")}, "b:1")
    ctx = ("b:1#0#0", [])
    narrow = CacheHints(vary=("identity.subject",))
    await stored(c, r, {"identity": {"subject": "a"}, "request": {"path": "/x"}}, "x", ctx=ctx, hints=narrow)
    assert await looked(c, r, {"identity": {"subject": "a"}, "request": {"path": "/y"}}, ctx) == (None, "miss")
    assert await looked(c, r, {"identity": {"subject": "a"}, "request": {"path": "/x"}}, ctx) == ("x", "l1")
    wide = CacheHints(vary=("identity", "request"))
    await stored(c, r, {"identity": {"subject": "b"}, "request": {"path": "/x"}, "q": 1}, "w", ctx=ctx, hints=wide)
    assert await looked(c, r, {"identity": {"subject": "b"}, "request": {"path": "/x"}, "q": 2}, ctx) == ("w", "l1")
    # the vary is the key: what it covers counts, even beyond what the policy reads
    changed = {"identity": {"subject": "b", "other": 1}, "request": {"path": "/x"}, "q": 1}
    assert await looked(c, r, changed, ctx) == (None, "miss")


@pytest.mark.parametrize(
    ("before", "bundles", "same", "after"),
    [
        ("", None, True, ""),
        ("", "{}", True, ""),
        ("b:{}", "{}", False, "b:{}"),
        ("b:x", "x", True, "b:x"),
        ("b:x", "y", False, "b:y"),
        ("m:abc", "y", False, "b:y"),
    ],
)
def test_bundle_revisions_reported_with_an_answer(before: str, bundles: str | None, same: bool, after: str) -> None:
    c = DecisionCache(Cache(), None)
    c.opa_revision = before
    assert c.note_bundles(bundles) is same
    assert c.opa_revision == after


# --- with Redis: L2, epochs, the revision counter ------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"k{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def pair(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[DecisionCache, DecisionCache]]:
    made = []
    for _ in range(2):
        shared = SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=2000))
        c = DecisionCache(Cache(), shared)
        c.opa_revision = "b:1"
        made.append((shared, c))
    yield made[0][1], made[1][1]
    for shared, c in made:
        await c.stop()
        await shared.close()


SCOPES = (("subject", "alice"), ("token", "j1"))


async def test_another_replica_finds_the_answer_in_l2_with_its_lifetime(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = pair
    r = route()
    ctx = await a.context(SCOPES)
    a.store(r, DOC, {"allow": True}, ttl_s=30, hints=CacheHints(), revision=ctx[0], epochs=ctx[1])
    await a.drain()
    key = a.entry_key(r, DOC, *ctx, None)
    assert key is not None
    blob = await raw.get(f"{prefix}dec:{key}")
    assert blob is not None
    doc = orjson.loads(blob)
    assert doc["r"] == {"allow": True} and doc["exp"] == pytest.approx(time.time() + 30, abs=2)
    assert 28_000 < await raw.pttl(f"{prefix}dec:{key}") <= 30_000
    ikey = dc.digest("index", r.policy, r.name, ctx[0])
    assert 28_000 < await raw.pttl(f"{prefix}idx:{ikey}") <= 30_000  # the index dies with its entries
    bctx = await b.context(SCOPES)
    assert bctx == ctx
    assert await looked(b, r, DOC, bctx) == ({"allow": True}, "l2")
    assert await looked(b, r, DOC, bctx) == ({"allow": True}, "l1")  # and kept in L1 from then on
    assert b.stats["l2"] == 1 and b.stats["l1"] == 1
    other = {**DOC, "request": {"id": "1", "path": "/other"}}
    a.store(r, other, {"allow": False}, ttl_s=30, hints=CacheHints(), revision=ctx[0], epochs=ctx[1])
    await a.drain()
    assert await looked(b, r, other, bctx) == ({"allow": False}, "l2")
    assert b.stats["l2"] == 2
    assert await looked(b, r, DOC, bctx, interpret=lambda x: ("i", x)) == (("i", {"allow": True}), "l1")


async def test_an_expired_or_odd_l2_entry_is_a_miss(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    _, b = pair
    r = route()
    ctx = await b.context(SCOPES)
    key = b.entry_key(r, DOC, *ctx, None)
    for blob in (
        orjson.dumps({"r": {"allow": True}, "exp": time.time() - 1}),
        orjson.dumps({"r": {"allow": True}}),
        orjson.dumps({"r": {"allow": True}, "exp": "later"}),
        orjson.dumps({"exp": time.time() + 60}),
        orjson.dumps([{"allow": True}]),
        b"garbage",
    ):
        await raw.set(f"{prefix}dec:{key}", blob, px=60_000)
        assert await looked(b, r, DOC, ctx) == (None, "miss"), blob
    await raw.set(f"{prefix}dec:{key}", orjson.dumps({"r": False, "exp": time.time() + 60}), px=60_000)
    assert await looked(b, r, DOC, ctx) == (False, "l2")  # a cached deny is an answer too


async def test_the_vary_index_reaches_another_replica(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = pair
    r = route()
    ctx = await a.context(())
    hints = CacheHints(vary=("identity.subject",))
    a.store(r, DOC, "narrow", ttl_s=30, hints=hints, revision=ctx[0], epochs=ctx[1])
    await a.drain()
    ikey = dc.digest("index", r.policy, r.name, ctx[0])
    assert orjson.loads(await raw.get(f"{prefix}idx:{ikey}")) == ["identity.subject"]
    assert await looked(b, r, {"identity": {"subject": "alice"}, "other": 1}, ctx) == ("narrow", "l2")
    # an index that is not a list of strings is no index
    r2 = route("r2")
    ikey2 = dc.digest("index", r2.policy, r2.name, ctx[0])
    await raw.set(f"{prefix}idx:{ikey2}", b"not json", px=60_000)
    assert await b._vary(r2, ctx[0]) is None
    r3 = route("r3")
    await raw.set(f"{prefix}idx:{dc.digest('index', r3.policy, r3.name, ctx[0])}", b"[1]", px=60_000)
    assert await b._vary(r3, ctx[0]) is None


async def test_an_invalidation_ends_the_scopes_entries_on_every_replica(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = pair
    before_a, before_b = await a.context(SCOPES), await b.context(SCOPES)
    assert before_a == before_b
    assert await a.invalidate("subject", "alice") is True
    assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"1"
    after_a = await a.context(SCOPES)
    assert after_a != before_a
    assert after_a[1] == [["subject", "alice", 1, 0], ["token", "j1", 0, 0]]
    await until(lambda: _context_is(b, SCOPES, after_a))
    assert await a.invalidate("subject", "alice") is True
    assert (await a.context(SCOPES))[1][0] == ["subject", "alice", 2, 0]
    # another scope's entries are untouched
    assert (await b.context((("token", "j1"),)))[1] == [["token", "j1", 0, 0]]


async def _context_is(c: DecisionCache, scopes: Any, expected: Any) -> bool:
    return await c.context(scopes) == expected


@pytest.mark.parametrize("scope", ["user", "", "Subject"])
async def test_an_unknown_scope_is_refused(pair: tuple[DecisionCache, DecisionCache], scope: str) -> None:
    a, _ = pair
    with pytest.raises(
        ValueError, match=r"^scope must be one of subject, workload, certificate, token, device, tenant$"
    ):
        await a.invalidate(scope, "x")


async def test_a_data_push_changes_every_key_on_every_replica(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = pair
    rev = (await a.context(()))[0]
    assert rev == "b:1#0#0"
    assert await a.bump_revision() is True
    assert await raw.get(f"{prefix}rev:{{c}}") == b"1"
    assert (await a.context(()))[0] == "b:1#1#0"
    await until(lambda: _context_is(b, (), ("b:1#1#0", [])))
    assert await b.bump_revision() is True
    assert (await b.context(()))[0] == "b:1#2#0"


async def test_counters_never_go_backwards_when_redis_forgets(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = pair
    await a.invalidate("subject", "alice")
    await a.invalidate("subject", "alice")
    await a.bump_revision()
    seen = await a.context(SCOPES)
    await raw.delete(f"{prefix}epoch:{{c}}:subject:alice", f"{prefix}rev:{{c}}")  # a restart without data
    assert await a.context(SCOPES) == seen
    # reconcile writes back one past what this replica knew: another replica may have cached under 0
    assert await a.reconcile() is True
    assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"3"
    assert await raw.get(f"{prefix}rev:{{c}}") == b"2"
    assert (await a.context(SCOPES))[1][0] == ["subject", "alice", 3, 0]
    assert (await a.context(()))[0] == "b:1#2#0"
    # and an invalidation after it moves on from there
    assert await a.invalidate("subject", "alice") is True
    assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"4"


async def test_a_non_numeric_counter_counts_as_zero(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = pair
    await raw.set(f"{prefix}epoch:{{c}}:subject:alice", b"garbage")
    await raw.set(f"{prefix}rev:{{c}}", b"x")
    assert await a.context(SCOPES) == ("b:1#0#0", [["subject", "alice", 0, 0], ["token", "j1", 0, 0]])


async def test_without_redis_bumps_hold_here_for_good_and_are_written_back(
    redis_server: RedisServer, raw: aioredis.Redis, prefix: str
) -> None:
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    c = DecisionCache(Cache(), down)
    c.opa_revision = "b:1"
    try:
        assert await c.invalidate("subject", "alice") is False
        assert await c.invalidate("subject", "alice") is False
        assert await c.bump_revision() is False
        assert c.unshared == 3
        assert await c.reconcile() is False
        revision, epochs = await c.context(SCOPES)
        assert (revision, epochs[0]) == ("b:1#0#1", ["subject", "alice", 0, 2])
    finally:
        await down.close()
    up = SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=2000))
    c.shared = up
    try:
        await raw.set(f"{prefix}epoch:{{c}}:subject:alice", b"5")  # bumps made elsewhere meanwhile
        assert await c.reconcile(lost=False) is True
        assert c.unshared == 0
        assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"7"  # ours on top of theirs
        assert await raw.get(f"{prefix}rev:{{c}}") == b"1"
        revision, epochs = await c.context(SCOPES)
        assert (revision, epochs[0]) == ("b:1#1#1", ["subject", "alice", 7, 2])
        assert await c.reconcile(lost=False) is True  # nothing left to write
    finally:
        await up.close()


async def test_without_any_redis_a_bump_is_honoured_here_and_says_so() -> None:
    c = DecisionCache(Cache(), None)
    c.opa_revision = "m:abc"
    c.opa_instance = "opa-1"
    assert await c.context(SCOPES) == ("m:abc#0#0@opa-1", [["subject", "alice", 0, 0], ["token", "j1", 0, 0]])
    assert await c.invalidate("token", "j1") is True
    assert await c.bump_revision() is True
    assert await c.context(SCOPES) == ("m:abc#0#1@opa-1", [["subject", "alice", 0, 0], ["token", "j1", 0, 1]])
    assert await c.reconcile() is False
    assert c.unshared == 0


async def test_the_key_explain_reports_follows_the_routes_vary() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    await stored(c, r, DOC, "narrow", hints=CacheHints(vary=("identity.subject",)))
    other = {"identity": {"subject": "alice"}, "request": {"path": "/elsewhere"}}
    key = await c.key_of(r, DOC, CTX)
    assert key == await c.key_of(r, other, CTX)  # only the vary paths count
    assert key == c.entry_key(r, other, *CTX, ("identity.subject",))
    assert key != c.entry_key(r, other, *CTX, None)
    assert await c.key_of(r, DOC, ("rev#9#0", CTX[1])) != key  # the index is per revision


async def test_an_epoch_redis_lost_is_bumped_past_what_this_replica_knew(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = pair
    await a.invalidate("subject", "alice")
    await a.invalidate("subject", "alice")
    await raw.delete(f"{prefix}epoch:{{c}}:subject:alice")
    assert await a.invalidate("subject", "alice") is True
    assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"4"  # one past 2 (lost), then this bump


async def test_a_bump_is_honoured_here_even_when_redis_is_gone_right_after(
    redis_server: RedisServer, prefix: str
) -> None:
    up = SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=2000))
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    c = DecisionCache(Cache(), up)
    c.opa_revision = "b:1"
    try:
        assert await c.invalidate("subject", "alice") is True
        assert await c.bump_revision() is True
        c.shared = down
        assert await c.context(SCOPES) == ("b:1#1#0", [["subject", "alice", 1, 0], ["token", "j1", 0, 0]])
    finally:
        await up.close()
        await down.close()


async def _down_then_up(redis_server: RedisServer, prefix: str, bumps: Callable[[DecisionCache], Any]) -> DecisionCache:
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    c = DecisionCache(Cache(), down)
    c.opa_revision = "b:1"
    await bumps(c)
    await down.close()
    c.shared = SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=2000))
    return c


async def test_bumps_made_without_redis_are_written_back_whatever_their_kind(
    redis_server: RedisServer, raw: aioredis.Redis, prefix: str
) -> None:
    async def epochs_only(c: DecisionCache) -> None:
        await c.invalidate("token", "j9")

    c = await _down_then_up(redis_server, prefix, epochs_only)
    try:
        assert await c.reconcile(lost=False) is True
        assert await raw.get(f"{prefix}epoch:{{c}}:token:j9") == b"1"  # never seen before: just the bump
        assert c.unshared == 0
    finally:
        await c.shared.close()  # type: ignore[union-attr]

    async def revision_only(c: DecisionCache) -> None:
        await c.bump_revision()

    c = await _down_then_up(redis_server, prefix, revision_only)
    try:
        assert await c.reconcile(lost=False) is True
        assert await raw.get(f"{prefix}rev:{{c}}") == b"1"
        assert c.unshared == 0
    finally:
        await c.shared.close()  # type: ignore[union-attr]


async def test_a_lost_revision_counter_is_written_back_even_with_no_epoch_known(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = pair
    await a.bump_revision()
    await a.bump_revision()
    await raw.delete(f"{prefix}rev:{{c}}")
    assert await a.reconcile(lost=True) is True
    assert await raw.get(f"{prefix}rev:{{c}}") == b"3"
    assert a.unshared == 0
    # what was written back is what this replica keys on from now on, with or without Redis
    a.shared = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    try:
        assert (await a.context(()))[0] == "b:1#3#0"
    finally:
        await a.shared.close()


async def test_epochs_written_back_are_what_this_replica_keys_on(
    redis_server: RedisServer, raw: aioredis.Redis, prefix: str
) -> None:
    up = SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=2000))
    c = DecisionCache(Cache(), up)
    c.opa_revision = "b:1"
    try:
        await c.invalidate("subject", "alice")
        await raw.delete(f"{prefix}epoch:{{c}}:subject:alice")
        assert await c.reconcile(lost=True) is True
        assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"2"
        assert c.unshared == 0  # nothing left to push: only what was really pending is kept
        c.shared = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
        assert (await c.context(SCOPES))[1][0] == ["subject", "alice", 2, 0]
        await c.shared.close()
    finally:
        await up.close()


async def test_stop_cancels_pending_l2_writes_quietly(pair: tuple[DecisionCache, DecisionCache]) -> None:
    a, _ = pair
    ctx = await a.context(())
    for i in range(5):
        a.store(route(), {"n": i}, "x", ttl_s=30, hints=CacheHints(), revision=ctx[0], epochs=ctx[1])
    assert [t.get_name() for t in asyncio.all_tasks()].count("cache-l2-write") == 5  # named, kept
    await a.stop()  # does not raise


async def test_before_the_revision_is_known_the_key_names_no_bundle_and_this_opa() -> None:
    c = DecisionCache(Cache(), None)
    assert await c.context(()) == ("#0#0@None", [])
    c.opa_instance = "opa-2"
    assert await c.context(()) == ("#0#0@opa-2", [])


async def test_every_data_push_made_without_redis_counts(
    redis_server: RedisServer, raw: aioredis.Redis, prefix: str
) -> None:
    async def two(c: DecisionCache) -> None:
        assert await c.bump_revision() is False
        assert await c.bump_revision() is False
        assert c.unshared == 2
        assert (await c.context(()))[0] == "b:1#0#2"

    c = await _down_then_up(redis_server, prefix, two)
    try:
        assert await c.reconcile(lost=False) is True
        assert await raw.get(f"{prefix}rev:{{c}}") == b"2"
    finally:
        await c.shared.close()  # type: ignore[union-attr]


async def test_l1_limits_at_their_exact_values() -> None:
    r = route()
    one = DecisionCache(Cache(l1_max_entries=1), None)
    await stored(one, r, {"n": 1}, "a")
    assert (await looked(one, r, {"n": 1}))[1] == "l1"  # a cache of one entry keeps one
    exact = DecisionCache(Cache(l1_max_bytes=5), None)
    await stored(exact, r, {"n": 1}, "xxx")  # "xxx" is 5 bytes of JSON: exactly the budget
    assert (await looked(exact, r, {"n": 1}))[1] == "l1"
    await stored(exact, r, {"n": 2}, "x" * 10)  # too big for L1: not kept, and nothing else is dropped for it
    assert [(await looked(exact, r, {"n": n}))[1] for n in (1, 2)] == ["l1", "miss"]
    c = DecisionCache(Cache(), None)
    await stored(c, r, {"n": 1}, "a")
    await stored(c, r, {"n": 2}, "b")
    assert c.stats["stored"] == 2


async def test_the_route_index_is_bounded() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    for n in range(dc._INDEX_MAX + 5):
        c.store(r, DOC, "x", ttl_s=60, hints=CacheHints(vary=("a",)), revision=f"rev{n}", epochs=[])
    assert len(c._index) == dc._INDEX_MAX  # the oldest goes when none has expired
    assert dc._INDEX_MAX == 4096


async def test_what_this_replica_knows_of_a_routes_vary_needs_no_redis(
    pair: tuple[DecisionCache, DecisionCache], redis_server: RedisServer, prefix: str
) -> None:
    from vvault_pep.decide.store import store_named

    a, b = pair
    r = route()
    ctx = await a.context(())
    a.store(r, DOC, "narrow", ttl_s=30, hints=CacheHints(vary=("identity.subject",)), revision=ctx[0], epochs=ctx[1])
    await a.drain()
    assert await looked(b, r, {"identity": {"subject": "alice"}, "z": 1}, ctx) == ("narrow", "l2")
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    b.l2 = store_named("redis", down)
    try:  # the route's vary was learnt with the answer: still known, and the answer is in L1
        assert await looked(b, r, {"identity": {"subject": "alice"}, "z": 2}, ctx) == ("narrow", "l1")
    finally:
        await down.close()


async def test_an_epoch_redis_shows_lower_than_known_is_not_taken(
    pair: tuple[DecisionCache, DecisionCache], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = pair
    await a.invalidate("subject", "alice")
    await a.invalidate("subject", "alice")
    await raw.set(f"{prefix}epoch:{{c}}:subject:alice", b"1")  # a failover to a replica behind
    assert (await a.context(SCOPES))[1][0] == ["subject", "alice", 2, 0]


def test_the_body_is_in_the_key_on_a_body_route_only() -> None:
    c = DecisionCache(Cache(), None)
    body_route = Route(
        name="b",
        path="/b",
        upstream="u",
        policy="p/q",
        body={"inspect": "json", "max_bytes": 100, "cache_key": True},
        cache={"ttl_s": 60, "key": ["identity.subject"]},
    )
    plain = route("p", ttl_s=60, key=("identity.subject",))
    one = {"identity": {"subject": "a"}, "request": {"body": {"x": 1}}}
    two = {"identity": {"subject": "a"}, "request": {"body": {"x": 2}}}
    assert c.entry_key(body_route, one, *CTX, None) != c.entry_key(body_route, two, *CTX, None)
    assert c.entry_key(plain, one, *CTX, None) == c.entry_key(plain, two, *CTX, None)


def test_a_policy_that_reads_the_whole_input_is_keyed_on_all_of_it() -> None:
    c = DecisionCache(Cache(), None)
    c.opa_revision = "b:1"
    c.use_policy_paths({"p/q": ("", "identity.subject")}, "b:1")
    r = route()
    one = {"identity": {"subject": "a"}, "request": {"path": "/1"}}
    two = {"identity": {"subject": "a"}, "request": {"path": "/2"}}
    assert c.entry_key(r, one, *CTX, None) != c.entry_key(r, two, *CTX, None)
    narrow = ("identity.subject",)  # a vary cannot narrow what reads everything
    assert c.entry_key(r, one, *CTX, narrow) != c.entry_key(r, two, *CTX, narrow)


async def test_interpretations_kept_are_bounded() -> None:
    c = DecisionCache(Cache(), None)
    r = route()
    for n in range(dc._INTERPRETED_MAX + 3):
        await stored(c, r, {"n": n}, {"allow": True, "n": n})
        await looked(c, r, {"n": n}, interpret=lambda x: x["n"])
    assert len(c._interpreted) == dc._INTERPRETED_MAX == 1024
    assert await looked(c, r, {"n": 0}, interpret=lambda x: ("again", x["n"])) == (("again", 0), "l1")


async def test_a_vary_on_a_body_route_keeps_the_body_in_the_key() -> None:
    c = DecisionCache(Cache(), None)
    body_route = Route(
        name="bv",
        path="/b",
        upstream="u",
        policy="p/q",
        body={"inspect": "json", "max_bytes": 100, "cache_key": True},
        cache={"ttl_s": 60},
    )
    narrow = ("identity.subject",)
    one = {"identity": {"subject": "a"}, "request": {"body": {"x": 1}}}
    two = {"identity": {"subject": "a"}, "request": {"body": {"x": 2}}}
    assert c.entry_key(body_route, one, *CTX, narrow) != c.entry_key(body_route, two, *CTX, narrow)
