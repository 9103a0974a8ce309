"""Decision cache: in-process L1, shared Redis L2, keys that cannot be confused.

A hit must give exactly the answer OPA would give now, or no answer.  So the
key is a SHA-256 over a canonical JSON array (orjson, sorted keys) of:

* a format tag and the decision path;
* the **revision**: OPA's bundle revisions or the hash of its loaded policy
  modules, plus a counter in Redis bumped by every data change pushed through
  the PEP's admin API — a new revision changes every key;
* the **epochs** of the request's scopes (every scope of its verified
  :class:`~vvault_pep.core.principal.Subject`): a counter per scope value in Redis, bumped on
  revocation — every entry of that subject dies at once, on every replica.
  Epochs and the revision counter only move forward: a replica takes the
  larger of what Redis says and what it remembers, and :meth:`DecisionCache.reconcile`
  writes back what Redis lost or missed (bumps made during an outage, values
  lost to a restart or a flush), so an answer invalidated during an outage
  never comes back as a cached allow;
* the **material**: the projection of the policy input the route names
  (``cache.key``); else the input paths the policy itself reads for the
  route's decision path (:mod:`~vvault_pep.decide.deps`: shipped with the bundle or
  computed from a managed OPA's policies, used only while that revision is
  the one OPA runs); else the whole input minus the fields that differ on
  every request by nature (:data:`VOLATILE`).  The policy may replace it per
  decision with ``cache.vary`` (recorded in a per-route index).  The material
  goes in two parts: the SHA-256 of what it holds outside the input's
  per-request parts (:data:`~vvault_pep.core.policy_input.PER_REQUEST`: the
  request id, clock, body and risk block), then what it holds inside them.  A
  connection's memo keeps the first for the requests it recalls, whose input is
  the same outside those parts (:meth:`DecisionCache.lookup`'s ``memo``).

JSON structure makes ``{"sub": "a:b"}`` and ``{"sub": "a", "x": "b"}``
different byte strings; there is no string joining anywhere.

Only definite OPA answers are cached (never undefined results, malformed
decisions or errors).  Lifetime = min(route TTL, the decision's ``ttl_s``, the
token's ``exp``, ``max_ttl_s``); denies use the shorter deny TTL.  An entry
is data (OPA's raw result), re-interpreted on every hit; one that cannot be
parsed or has expired is a miss.  Redis slow or down → L1 and OPA only.

With a :class:`~vvault_pep.shared.push.Push` channel every bump is announced on it by
the script that makes it, each replica keeps every epoch Redis holds (read in full
after each (re)subscription), and :meth:`DecisionCache.context` answers from that
with no Redis command while the channel is known healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from ..config.models import Cache as CacheConfig
from ..config.models import Route
from ..core.policy_input import PER_REQUEST
from ..core.principal import SCOPES
from ..shared.push import Push
from ..shared.state import CONTAINMENT_TAG, Generation, SharedState
from . import deps
from .store import DecisionStore, store_named

log = logging.getLogger("vvault_pep.cache")

FORMAT = "vvault-pep/cache/v2"  # v2: the material in two parts
# Fields of the input that differ on every request by nature; left out of
# whole-input keys (docs/caching.md).
VOLATILE: tuple[tuple[str, ...], ...] = (
    ("request", "id"),
    ("source", "port"),
    ("time",),
    ("request", "headers", "traceparent"),
    ("device", "age_s"),
    # per-request counters; the score, band and the signal flags stay in the key
    ("risk", "signals", "requests_in_window"),
    ("risk", "signals", "baseline"),
)
# The key material says whether each path is present apart from its value, so no value a
# client can send (a JSON body's {"$missing": true} included) stands for an absent field.
_ABSENT = [False]
_BODY_PATHS = ("request.body", "request.body_truncated")


def _get(doc: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    for part in path:
        if not isinstance(doc, dict) or part not in doc:
            return False, None
        doc = doc[part]
    return True, doc


def project(doc: dict[str, Any], paths: tuple[str, ...]) -> list[Any]:
    """``[[path, value-or-missing], ...]`` in a fixed order: the key material."""
    out = []
    for dotted in sorted(set(paths)):
        present, value = _get(doc, tuple(dotted.split(".")))
        out.append([dotted, True, value] if present else [dotted, *_ABSENT])
    return out


_PER_REQUEST_DOTTED = tuple(".".join(part) for part in PER_REQUEST)
_STATIC_OMITS = (*VOLATILE, *PER_REQUEST)
_MEMO_MAX = 8  # static digests kept per memo entry (one per set of key paths)
KeyMemo = dict[tuple[str, ...] | None, str]


def per_request(dotted: str) -> bool:
    """Whether the value at ``dotted`` may hold a per-request part (it is one, in one, or above one)."""
    for part in _PER_REQUEST_DOTTED:
        if dotted == part or dotted.startswith(part + ".") or dotted == "" or part.startswith(dotted + "."):
            return True
    return False


def material_outside(doc: dict[str, Any], paths: tuple[str, ...] | None) -> Any:
    """The key material of ``doc`` on ``paths`` (None: the whole input) outside the
    per-request parts.

    With :func:`material_inside` it holds exactly what the one-part material did: the
    projection's paths are partitioned between the two; the whole input minus its volatile
    fields is this copy without the per-request parts, plus each of those parts (whether
    present, and its value minus its own volatile fields).
    """
    if paths is None:
        return without(doc, _STATIC_OMITS)
    return project(doc, tuple(p for p in paths if not per_request(p)))


def material_inside(doc: dict[str, Any], paths: tuple[str, ...] | None) -> list[Any]:
    """The key material of ``doc`` on ``paths`` inside the per-request parts."""
    if paths is None:
        return project(without(doc, VOLATILE), _PER_REQUEST_DOTTED)
    return project(doc, tuple(p for p in paths if per_request(p)))


def whole_input(doc: dict[str, Any]) -> dict[str, Any]:
    """The input without :data:`VOLATILE` fields; copies only the dicts on those paths."""
    return without(doc, VOLATILE)


def without(doc: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    out = dict(doc)
    for path in paths:
        parent: Any = out
        for part in path[:-1]:
            child = parent.get(part) if isinstance(parent, dict) else None
            if not isinstance(child, dict):
                parent = None
                break
            child = dict(child)  # copy on write: the caller's document stays untouched
            parent[part] = child
            parent = child
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return out


def digest(*parts: Any) -> str:
    return hashlib.sha256(orjson.dumps([FORMAT, *parts], option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheHints:
    """The decision's own ``cache`` block, strictly parsed (anything odd → don't store)."""

    ttl_s: float | None = None
    vary: tuple[str, ...] | None = None
    no_store: bool = False


def hints_of(result: Any) -> CacheHints:
    block = result.get("cache") if isinstance(result, dict) else None
    if block is None:
        return CacheHints()
    if not isinstance(block, dict):
        return CacheHints(no_store=True)
    ttl, vary, no_store = block.get("ttl_s"), block.get("vary"), block.get("no_store", False)
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0):
        return CacheHints(no_store=True)
    if vary is not None and (not isinstance(vary, list) or not all(isinstance(v, str) and v for v in vary)):
        return CacheHints(no_store=True)
    if not isinstance(no_store, bool):
        return CacheHints(no_store=True)
    return CacheHints(float(ttl) if ttl is not None else None, tuple(vary) if vary is not None else None, no_store)


def lifetime(
    *,
    allow: bool,
    route: Route,
    cfg: CacheConfig,
    hints: CacheHints,
    token_exp: int | None,
    now: float,
    time_dependent: bool = False,
) -> float:
    """Seconds an answer may live; 0 means do not store.

    A time-dependent policy (one that reads ``input.time``) is never keyed on the clock,
    so its answer lives only as long as the decision itself says (``cache.ttl_s``).
    """
    if hints.no_store or (time_dependent and hints.ttl_s is None):
        return 0.0
    if allow:
        base = route.cache.ttl_s if route.cache.ttl_s is not None else cfg.default_ttl_s
    else:
        base = route.cache.deny_ttl_s if route.cache.deny_ttl_s is not None else cfg.deny_ttl_s
    candidates = [base, cfg.max_ttl_s]
    if hints.ttl_s is not None:
        candidates.append(hints.ttl_s)
    if token_exp is not None:
        candidates.append(token_exp - now)  # never outlive the credential it was judged on
    return max(0.0, min(candidates))


_INDEX_MEMO_S = 5.0  # how long a replica trusts what Redis said of a route's key paths
_INDEX_MAX = 4096  # (route, revision) pairs remembered
_INTERPRETED_MAX = 1024  # distinct answers kept interpreted (and shared between entries)
_SHARED_MAX_BYTES = 2048  # answers up to this size are shared: the table stays ≤ 2 MiB


@dataclass(slots=True)
class _Entry:
    result: bytes
    expires_at: float  # wall clock


class DecisionCache:
    def __init__(
        self,
        cfg: CacheConfig,
        shared: SharedState | None,
        store: DecisionStore | None = None,
        *,
        push: Push | None = None,
        generation: Generation | None = None,
    ) -> None:
        self.cfg = cfg
        self.shared = shared
        self.push = push
        self.gen = generation if generation is not None else Generation()
        if push is not None:
            push.handle("epoch", self._heard)
            push.handle("rev", self._heard)
            push.reconciler(self.load)
        # L2: the "redis" store when Redis is configured; a store given here instead (a test's).
        if store is None and shared is not None:
            store = store_named("redis", shared)
        self.l2: DecisionStore | None = store
        self._l1: OrderedDict[str, _Entry] = OrderedDict()
        self._l1_bytes = 0
        self._index: dict[str, tuple[tuple[str, ...] | None, float]] = {}
        self._interpreted: dict[bytes, Any] = {}  # stored result → interpret(result)
        # One bytes object per distinct stored result: entries that hold the same answer
        # (one per token of the same caller, say) share it instead of a copy each.
        self._payloads: dict[bytes, bytes] = {}
        self._epochs: dict[tuple[str, str], int] = {}  # last known non-zero ones, used when Redis is down
        self._local_bumps: dict[tuple[str, str], int] = {}
        self._unpushed: dict[tuple[str, str], int] = {}  # bumps Redis has not heard yet
        self._revision_counter = 0
        self._local_revision_bumps = 0
        self._unpushed_revision = 0
        self._opa_revision = ""
        # Outside bundle mode each OPA holds its own data (files, admin pushes): answers
        # from different OPA processes must never share an entry.
        self.opa_instance: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = {"l1": 0, "l2": 0, "miss": 0, "bypass": 0, "stored": 0}
        # The input paths each decision path reads, valid while OPA runs `_paths_revision`.
        self._paths: dict[str, tuple[str, ...]] = {}
        self._paths_revision: str | None = None
        self._refused_routes: frozenset[str] = frozenset()
        # Set once the policy's paths were ever known: from then on, unknown paths (a pushed
        # module nobody analysed, a newer revision) may read the clock.
        self._analysed = False

    @property
    def generation(self) -> int:
        """Moves whenever an epoch, the revision counter or OPA's revision moves, or the push mode changes."""
        return self.gen.value

    @property
    def opa_revision(self) -> str:
        return self._opa_revision

    @opa_revision.setter
    def opa_revision(self, value: str) -> None:
        if value != self._opa_revision:
            self._opa_revision = value
            self.gen.bump()

    # ------------------------------------------------------------ keys from the policy

    def use_policy_paths(
        self, paths: dict[str, tuple[str, ...]], revision: str, refused_routes: frozenset[str] = frozenset()
    ) -> None:
        """Key routes on what the policy reads, while OPA's revision is ``revision``.

        ``refused_routes``: routes whose hand-written key omits a path the policy reads;
        they are not cached at all under this revision.
        """
        self._paths, self._paths_revision, self._refused_routes = dict(paths), revision, refused_routes
        self._analysed = True
        self.gen.bump()

    def forget_policy_paths(self) -> None:
        """The policy changed in a way nobody analysed (a pushed module): back to whole-input keys."""
        self._paths, self._paths_revision, self._refused_routes = {}, None, frozenset()
        self.gen.bump()

    @property
    def paths_revision(self) -> str | None:
        return self._paths_revision

    def policy_paths(self, route: Route) -> tuple[str, ...] | None:
        if self._paths_revision is None or self._paths_revision != self.opa_revision:
            return None
        return self._paths.get(route.policy)

    def opa_input(self, route: Route, doc: dict[str, Any]) -> dict[str, Any]:
        """What OPA is sent: the projection on the paths the policy reads, else all of ``doc``."""
        paths = self.policy_paths(route) if route.opa_input == "projected" else None
        sent = deps.projection(doc, paths) if paths is not None else None
        return doc if sent is None else sent

    def time_dependent(self, route: Route) -> bool:
        """Whether the route's policy may read the clock.

        Once the paths were known, unknown ones (after :meth:`forget_policy_paths`, or for a
        revision nobody analysed) count as reading it: a pushed module may well do so.
        """
        paths = self.policy_paths(route)
        return self._analysed if paths is None else deps.reads_time(paths)

    # ------------------------------------------------------------ context

    def context(self, scopes: tuple[tuple[str, str], ...]) -> Coroutine[Any, Any, tuple[str, list[Any]]]:
        """The revision and epochs for these scopes: the read is queued now, await the answer.

        No read while the push channel is known healthy: every epoch Redis holds is here.
        """
        reply = None
        if self.shared is not None and (self.push is None or not self.push.healthy):
            shared = self.shared
            reply = shared.mget([rev_key(shared)] + [epoch_key(shared, s, v) for s, v in scopes])
        return self._context(scopes, reply)

    async def _context(
        self, scopes: tuple[tuple[str, str], ...], reply: Awaitable[list[Any] | None] | None
    ) -> tuple[str, list[Any]]:
        if reply is not None:
            values = await reply
            if values is not None:
                # Only forward: a Redis that restarted empty or was flushed says 0, and an
                # entry cached before the last bump must not match again.
                counter = _int(values[0])
                if counter < self._revision_counter:
                    self._suspect()
                elif counter > self._revision_counter:
                    self._revision_counter = counter
                    self.gen.bump()
                for pair, raw in zip(scopes, values[1:], strict=True):
                    # Only bumped scopes are remembered: a zero per token or subject ever
                    # seen would grow without end.
                    epoch = _int(raw)
                    known = self._epochs.get(pair, 0)
                    if epoch > known:
                        self._epochs[pair] = epoch
                        self.gen.bump()
                    elif epoch < known:
                        self._suspect()
        epochs = [[s, v, self._epochs.get((s, v), 0), self._local_bumps.get((s, v), 0)] for s, v in scopes]
        revision = f"{self.opa_revision}#{self._revision_counter}#{self._local_revision_bumps}"
        if not self.opa_revision.startswith("b:"):
            revision += f"@{self.opa_instance}"
        return revision, epochs

    # ------------------------------------------------------------ lookup / store

    def _key_paths(self, route: Route, vary: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """The input paths the key is made of (None: the whole input but :data:`VOLATILE`)."""
        # On a body route the body is always in the key, whatever else names the paths.
        body = _BODY_PATHS if route.body is not None else ()
        read = self.policy_paths(route)
        if vary is not None and read is not None:
            # A vary that leaves out a path the policy reads would let one answer serve
            # inputs the policy tells apart: ignored, the default key is used instead.
            needed = deps.key_paths(read)
            if "" in read or not all(any(deps.covers(v, p) for v in vary) for p in needed):
                vary = None
        if vary is not None:
            paths = vary if route.cache.key is None else (*route.cache.key, *vary)
            return (*paths, *body)
        if route.cache.key is not None:
            return (*route.cache.key, *body)
        if read is not None and "" not in read:
            return (*deps.key_paths(read), *body)
        return None

    def _index_key(self, route: Route, revision: str) -> str:
        return digest("index", route.policy, route.name, revision)

    async def _vary(self, route: Route, revision: str) -> tuple[str, ...] | None:
        """The key paths the policy asked for on this route and revision (None: the default key).

        Remembered locally: an L1 hit must not wait for Redis to learn what it already
        knows.  What Redis says (an index, or none) is remembered for ``_INDEX_MEMO_S``: a
        stale answer can only cost a miss, never a wrong hit, since the paths are part of
        the entry's key.
        """
        ikey = self._index_key(route, revision)
        now = time.time()
        local = self._index.get(ikey)
        if local is not None and local[1] > now:
            return local[0]
        vary: tuple[str, ...] | None = None
        if self.l2 is not None:
            raw = await self.l2.get("idx", ikey)
            if raw is not None:
                try:
                    doc = orjson.loads(raw)
                    if isinstance(doc, list) and all(isinstance(v, str) for v in doc):
                        vary = tuple(doc)
                except orjson.JSONDecodeError:
                    pass
            self._remember_index(ikey, vary, now + _INDEX_MEMO_S)
        return vary

    def _remember_index(self, ikey: str, vary: tuple[str, ...] | None, until: float) -> None:
        if ikey not in self._index and len(self._index) >= _INDEX_MAX:
            now = time.time()
            for k in [k for k, (_, t) in self._index.items() if t <= now] or [next(iter(self._index))]:
                del self._index[k]
        self._index[ikey] = (vary, until)

    def _key(
        self,
        route: Route,
        revision: str,
        epochs: list[Any],
        doc: dict[str, Any],
        vary: tuple[str, ...] | None,
        memo: KeyMemo | None = None,
    ) -> str:
        """The entry's key, the one place it is made (lookup, store and ``explain``).

        ``memo``: where the digest of the material's first part is kept per set of key
        paths, for inputs that are all the same outside :data:`PER_REQUEST` (a
        connection's memo entry hands in its own: the same key comes out either way).
        """
        paths = self._key_paths(route, vary)
        fixed = memo.get(paths) if memo is not None else None
        if fixed is None:
            fixed = digest("fixed", material_outside(doc, paths))
            if memo is not None and len(memo) < _MEMO_MAX:
                memo[paths] = fixed
        inside = material_inside(doc, paths)
        # The route is part of the question: two routes may share a decision path and a
        # projection, and still be judged differently.
        return digest("entry", route.policy, route.name, revision, epochs, fixed, inside)

    async def key_of(self, route: Route, doc: dict[str, Any], context: tuple[str, list[Any]] | None) -> str | None:
        """The key :meth:`lookup` would read for this input now (None: the route bypasses the cache)."""
        if not self._cacheable(route) or context is None:
            return None
        revision, epochs = context
        return self._key(route, revision, epochs, doc, await self._vary(route, revision))

    def entry_key(
        self, route: Route, doc: dict[str, Any], revision: str, epochs: list[Any], vary: tuple[str, ...] | None
    ) -> str | None:
        """The key :meth:`store` writes for this answer (None: the route stores nothing)."""
        return self._key(route, revision, epochs, doc, vary) if self._cacheable(route) else None

    def _cacheable(self, route: Route) -> bool:
        return route.cache.enabled and not (route.name in self._refused_routes and self.policy_paths(route) is not None)

    async def lookup(
        self,
        route: Route,
        doc: dict[str, Any],
        context: tuple[str, list[Any]] | None = None,
        interpret: Callable[[Any], Any] | None = None,
        memo: KeyMemo | None = None,
    ) -> tuple[Any, str, str, list[Any]]:
        """(result or None, layer, revision, epochs).  Layer: l1, l2, miss or bypass.

        ``context`` is :meth:`context` for this request's subject (without it, a bypass).
        ``memo``: see :meth:`_key` (only for inputs all the same outside the per-request parts).
        With ``interpret``, a hit returns ``interpret(result)`` instead of the result,
        remembered per distinct stored result (``_INTERPRETED_MAX`` of them): a hot answer
        is decoded and interpreted once, not per request, and the many entries that hold
        the same answer share one interpretation (what ``interpret`` returns must not be
        changed by its users).
        """
        if (
            not route.cache.enabled
            or context is None
            or (route.name in self._refused_routes and self.policy_paths(route) is not None)
        ):
            # No context, no epochs to key on: never an answer without them.
            self.stats["bypass"] += 1
            return None, "bypass", "", []
        revision, epochs = context
        vary = await self._vary(route, revision)
        key = self._key(route, revision, epochs, doc, vary, memo)
        now = time.time()
        entry = self._l1.get(key)
        if entry is not None:
            if entry.expires_at > now:
                self._l1.move_to_end(key)
                known = self._interpreted.get(entry.result) if interpret is not None else None
                if known is not None:
                    self.stats["l1"] += 1
                    return known, "l1", revision, epochs
                result = _load(entry.result)
                if result is not _CORRUPT:
                    self.stats["l1"] += 1
                    if interpret is not None:
                        result = interpret(result)
                        if len(self._interpreted) >= _INTERPRETED_MAX:
                            self._interpreted.pop(next(iter(self._interpreted)))
                        self._interpreted[entry.result] = result
                    return result, "l1", revision, epochs
            self._drop(key)
        if self.l2 is not None:
            raw = await self.l2.get("dec", key)
            if raw is not None:
                stored = _load(raw)
                if (
                    isinstance(stored, dict)
                    and "r" in stored
                    and isinstance(stored.get("exp"), int | float)
                    and stored["exp"] > now
                ):
                    self._put_l1(key, orjson.dumps(stored["r"]), float(stored["exp"]))
                    self.stats["l2"] += 1
                    return (interpret(stored["r"]) if interpret else stored["r"]), "l2", revision, epochs
        self.stats["miss"] += 1
        return None, "miss", revision, epochs

    def store(
        self,
        route: Route,
        doc: dict[str, Any],
        result: Any,
        *,
        ttl_s: float,
        hints: CacheHints,
        revision: str,
        epochs: list[Any],
        now: float | None = None,
    ) -> None:
        """Keep ``result`` for ``ttl_s`` from ``now`` (unix time; default: this moment), the
        moment the lifetime was counted from, so an entry bounded by a token's exp ends at it."""
        if ttl_s <= 0 or not self._cacheable(route):
            return
        expires = (time.time() if now is None else now) + ttl_s
        self._remember_index(self._index_key(route, revision), hints.vary, expires)
        key = self._key(route, revision, epochs, doc, hints.vary)
        payload = orjson.dumps(result)
        self._put_l1(key, payload, expires)
        self.stats["stored"] += 1
        if self.l2 is not None:
            store = self.l2
            ikey = self._index_key(route, revision)
            vary = hints.vary

            async def write() -> None:
                if expires <= time.time():
                    return  # ended before it could be written: nothing to share
                blob = orjson.dumps({"r": result, "exp": expires})
                index = orjson.dumps(list(vary) if vary is not None else None)
                # Both ride in the round trip of this loop turn's other Redis reads and writes.
                await asyncio.gather(store.put("dec", key, blob, expires), store.put("idx", ikey, index, expires))

            self._spawn(write(), "cache-l2-write")

    def note_bundles(self, bundles: str | None) -> bool:
        """Record bundle revisions OPA reported with an answer; False if they changed.

        A changed revision means the answer came from a policy newer than the
        key it would be stored under: don't store it, and re-key from now on.
        """
        if bundles is None:
            return True
        if bundles == "{}":
            return not self.opa_revision.startswith("b:")
        current = "b:" + bundles
        if current == self.opa_revision:
            return True
        self.opa_revision = current
        self.gen.bump()
        return False

    # ------------------------------------------------------------ invalidation

    async def invalidate(self, scope: str, value: str) -> bool:
        """Bump the scope's epoch: its entries die in L1 and L2, here and on every replica."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        pair = (scope, value)
        if self.shared is not None:
            shared = self.shared
            known = self._epochs.get(pair, 0)
            key = epoch_key(shared, scope, value)
            epoch = await shared.call(lambda c: c.eval(_FORWARD, 1, key, known, 1, *self._announce("epoch", pair)))
            if epoch is not None:
                self._raise_epoch(pair, _int(epoch))
                return True
            # Redis could not hear it: written back by reconcile() once it is back.
            self._unpushed[pair] = self._unpushed.get(pair, 0) + 1
        # No Redis to spread it: this replica still honours it, at once and for good
        # (its keys for that scope then differ from the other replicas').
        self._local_bumps[pair] = self._local_bumps.get(pair, 0) + 1
        self.gen.bump()
        return self.shared is None

    async def bump_revision(self) -> bool:
        """A data change: every key changes, here and (through Redis) on every replica."""
        if self.shared is not None:
            shared = self.shared
            known = self._revision_counter
            value = await shared.call(lambda c: c.eval(_FORWARD, 1, rev_key(shared), known, 1, *self._announce("rev")))
            if value is not None:
                self._raise_revision(_int(value))
                return True
            self._unpushed_revision += 1
        # Without Redis the change is still honoured here, for good: a later read
        # of the shared counter cannot bring an older revision back.
        self._local_revision_bumps += 1
        self.gen.bump()
        return self.shared is None

    def _announce(self, op: str, pair: tuple[str, str] = ("", "")) -> tuple[str, ...]:
        """The script's publish arguments: command, channel, op, scope, value (none without push)."""
        if self.push is None or self.shared is None:
            return ()
        return ("spublish" if self.shared.cluster else "publish", self.push.channel, op, *pair)

    def _raise_epoch(self, pair: tuple[str, str], epoch: int) -> None:
        if epoch > self._epochs.get(pair, 0):
            self._epochs[pair] = epoch
            self.gen.bump()

    def _raise_revision(self, counter: int) -> None:
        if counter > self._revision_counter:
            self._revision_counter = counter
            self.gen.bump()

    def _heard(self, event: dict[str, Any]) -> None:
        """Another replica's bump, announced on the push channel (only forward)."""
        n = event["n"]
        if isinstance(n, bool) or not isinstance(n, int):
            return
        if event["op"] == "rev":
            self._raise_revision(n)
        elif event["scope"] in SCOPES and isinstance(event["value"], str):
            self._raise_epoch((event["scope"], event["value"]), n)

    async def load(self) -> bool:
        """Every epoch and the revision counter Redis holds, merged forward; True when read.

        The push channel's full reconciliation: after it (and the events heard since),
        no epoch in Redis is unknown here, so the request path need not read them.
        """
        if self.shared is None:
            return False
        shared = self.shared
        prefix = epoch_key(shared, "", "")[:-2] + ":"  # <prefix>epoch:{c}:

        async def read(c: Any) -> tuple[Any, list[tuple[bytes, Any]]]:
            where: dict[str, Any] = {}
            if shared.cluster:
                await c.initialize()
                where = {"target_nodes": c.get_node_from_key(prefix)}
            keys = [k async for k in c.scan_iter(match=prefix + "*", count=1000, **where)]
            values = await c.mget(keys) if keys else []
            return await c.get(rev_key(shared)), list(zip(keys, values, strict=True))

        found = await shared.call(read, deadline_s=2.0)
        if found is None:
            return False
        counter, rows = found
        if _int(counter) < self._revision_counter:
            self._suspect()
        self._raise_revision(_int(counter))
        for key, raw in rows:
            scope, _, value = key.decode(errors="replace")[len(prefix) :].partition(":")
            if scope in SCOPES and raw is not None:
                self._raise_epoch((scope, value), _int(raw))
        return True

    def _suspect(self) -> None:
        # Redis shows a counter below one this replica remembers: it lost data.
        if self.shared is not None:
            self.shared.suspect = True

    async def reconcile(self, lost: bool = True) -> bool:
        """Write back what Redis lacks: bumps made during an outage, values it lost.

        Bumps made while Redis was unreachable are added on top of what Redis holds.
        When Redis may have lost data (``lost``), every remembered epoch (and the revision
        counter) is raised in Redis to at least what this replica knows — one more when
        Redis is below it, since another replica may have cached under the lower value.
        Only ever forward.
        """
        if self.shared is None:
            return False
        shared = self.shared
        pairs = list(self._epochs.keys() | self._unpushed.keys()) if lost else list(self._unpushed)
        if not lost and not pairs and not self._unpushed_revision:
            return True
        pending = dict(self._unpushed)
        pending_rev = self._unpushed_revision

        async def op(c: Any) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            pipe.eval(_FORWARD, 1, rev_key(shared), self._revision_counter, pending_rev, *self._announce("rev"))
            for s, v in pairs:
                known, add = self._epochs.get((s, v), 0), pending.get((s, v), 0)
                pipe.eval(_FORWARD, 1, epoch_key(shared, s, v), known, add, *self._announce("epoch", (s, v)))
            return list(await pipe.execute())

        replies = await shared.call(op, deadline_s=2.0)
        if replies is None:
            return False
        self._raise_revision(_int(replies[0]))
        self._unpushed_revision -= pending_rev
        for pair, raw in zip(pairs, replies[1:], strict=True):
            self._raise_epoch(pair, _int(raw))
            left = self._unpushed.get(pair, 0) - pending.get(pair, 0)
            if left > 0:
                self._unpushed[pair] = left
            else:
                self._unpushed.pop(pair, None)
        return True

    @property
    def unshared(self) -> int:
        """Bumps made here that Redis has not heard yet."""
        return sum(self._unpushed.values()) + self._unpushed_revision

    # ------------------------------------------------------------ plumbing

    def _put_l1(self, key: str, payload: bytes, expires: float) -> None:
        if self.cfg.l1_max_entries == 0 or len(payload) > self.cfg.l1_max_bytes:
            return
        self._drop(key)
        small = len(payload) <= _SHARED_MAX_BYTES
        shared = self._payloads.get(payload) if small else None
        if shared is None:
            # orjson's bytes sit in a 4 KiB allocation whatever their length: an exact copy
            # keeps 10,000 entries at ~3 MB instead of ~40 MB.
            shared = memoryview(payload).tobytes()
            if small:
                if len(self._payloads) >= _INTERPRETED_MAX:
                    self._payloads.pop(next(iter(self._payloads)))
                self._payloads[shared] = shared
        self._l1[key] = _Entry(shared, expires)
        self._l1_bytes += len(payload)
        while len(self._l1) > self.cfg.l1_max_entries or self._l1_bytes > self.cfg.l1_max_bytes:
            _, old = self._l1.popitem(last=False)
            self._l1_bytes -= len(old.result)

    def _drop(self, key: str) -> None:
        old = self._l1.pop(key, None)
        if old is not None:
            self._l1_bytes -= len(old.result)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for pending L2 writes (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


_CORRUPT = object()

# KEYS[1] = counter; ARGV = what the caller knows, bumps to add.  Never backwards: a
# counter below what the caller knows lost data, and goes one past it.  With ARGV[3..7]
# (publish or spublish, channel, op, scope, value) a change is announced in the same
# atomic step: no replica can hear of a bump that did not happen, or miss one that did
# while its channel is healthy.  The channel shares the counters' hash tag (one slot).
_FORWARD = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local known = tonumber(ARGV[1])
local add = tonumber(ARGV[2])
local base = cur
if cur < known then base = known + 1 end
local want = base + add
if want ~= cur then
  redis.call('SET', KEYS[1], want)
  if ARGV[3] then
    redis.call(ARGV[3], ARGV[4], cjson.encode({op = ARGV[5], scope = ARGV[6], value = ARGV[7], n = want}))
  end
end
return want
"""


def rev_key(shared: SharedState) -> str:
    return shared.key_for("rev", CONTAINMENT_TAG)


def epoch_key(shared: SharedState, scope: str, value: str) -> str:
    return shared.key_for("epoch", CONTAINMENT_TAG, scope, value)


def _load(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _CORRUPT


def _int(raw: Any) -> int:
    try:
        return int(raw) if raw is not None else 0
    except (TypeError, ValueError):
        return 0
