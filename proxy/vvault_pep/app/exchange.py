"""One request's walk as typed data: what the stages found, in the order they found it.

The pipeline makes an :class:`Exchange` per request and hands it to each stage in turn; a
stage reads what earlier stages set and sets its own fields.  A field is set once, by the
stage that owns it (reading it before is an ``AttributeError``, a bug, never a default):

==============  ====================================================================
``conn``        peer: the verified connection (a trusted front proxy's XFCC applied)
``target``      sanitize: the canonical path and query; ``headers`` the checked set
``match``       route: the route and its parameters; ``max_body`` its body limit
``identity``    authenticate: the verified token and/or workload
``device``      posture: the verified device assertion, as data
``subject``     name: the caller's verified names (containment, limits, risk, cache)
``inspected``   body: the JSON body the policy may read (None when the route reads none)
``facts``       context: every fact of the request;
                ``risk``; ``contained``; ``policy_input`` (built once, for OPA and the cache key);
                ``cache_context`` (revision and epochs)
``decision``    decide: the interpreted answer; ``layer`` where it came from
``response``    enforce (a deny) or forward: the answer; the walk ends when it is set
==============  ====================================================================

``memo`` is the connection's :class:`Memo` (made and read by :mod:`.memo`) when there is one;
``static`` the :class:`Static` part of this request, once recalled or remembered: the stages
after it read the draft input, the redacted draft and the upstream headers from there.

:class:`Trail` is what the audit record needs, filled in as the walk goes.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.trace import INVALID_SPAN, Span

from ..core.body import Inspected
from ..core.decision import Decision
from ..core.policy_input import Facts
from ..core.principal import Identity, Subject
from ..core.request import Connection
from ..core.routing import Match
from ..core.sanitize import Headers, Target
from ..decide import inflight
from ..decide.cache import KeyMemo
from ..shared.containment import Contained


@dataclass(slots=True)
class Trail:
    """What the audit record needs, filled in as the walk goes."""

    request_id: str
    decision_id: str
    started: float
    span: Span = INVALID_SPAN
    trace_id: str = ""
    stages_ms: dict[str, float] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    policy_input: dict[str, Any] | None = None
    release: Callable[[], None] = inflight.nothing_held  # the caller's in-flight slot, once taken
    raw_result: Any = None  # the policy's own answer, for OPA-format decision logs
    http_route: str = ""  # the matched route's template (http.route)
    error_code: str | None = None  # the PEP's refusal code, when it refused (error.type)
    has_result: bool = False
    subject: Subject | None = None
    redacted: tuple[dict[str, Any], dict[str, list[str]]] | None = None  # the input, redacted from the memo's draft


Key = tuple[str, str, tuple[int, int], tuple[tuple[bytes, bytes], ...]]  # request line, raw header block


@dataclass(frozen=True, slots=True)
class Static:
    """What the static stages (peer to name) made of one request, and what keeps it valid."""

    stamp: tuple[int, int, int]  # containment and cache generations, TLS reloads
    valid_from: float  # unix time: the client certificate's validity
    valid_until: float  # ... and the token's exp, whichever ends first
    token_key: bytes | None  # the verified-token cache's key of the bearer token
    conn: Connection | None
    target: Target
    headers: Headers
    match: Match
    max_body: int
    identity: Identity
    device: dict[str, Any]
    subject: Subject
    fields: tuple[tuple[str, Any], ...]  # what the stages wrote in the audit trail, in order
    http_route: str
    draft: dict[str, Any]  # the policy input without request id, time, body and risk
    redacted: tuple[dict[str, Any], dict[str, list[str]]] | None  # the draft redacted for the record
    forward: tuple[tuple[str, str], ...]  # client headers the upstream may see, before the decision's
    # (but for the volatile ones, checked per request: ``Exchange.volatile_forward``)
    block: tuple[int, int, frozenset[str]]  # the key's headers: bytes, count, names Connection lists
    xfcc: str | None  # the X-Forwarded-Client-Cert element of the peer
    # the decision-cache key's digest of the input outside its per-request parts (DecisionCache._key)
    key_memo: KeyMemo = field(default_factory=dict)


class Memo:
    """One connection's memo: the last few requests' static parts, least recently used out."""

    __slots__ = ("entries", "owner", "seen")

    def __init__(self, owner: object) -> None:
        self.owner = owner  # the memoiser that made it
        self.entries: OrderedDict[Key, Static] = OrderedDict()
        # Requests seen once (their key's hash): a request is remembered when it comes again,
        # so a connection that never repeats itself costs a hash, not a memo entry.
        self.seen: OrderedDict[int, None] = OrderedDict()


@dataclass(slots=True)
class Exchange:
    # What arrived: the request line, headers and socket, as the listener gave them.
    request: web.BaseRequest | None  # None when nothing was received (``explain``)
    trail: Trail
    span: Span
    method: str
    raw_path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    version: tuple[int, int]
    peername: tuple[Any, ...] | None
    conn: Connection | None
    # Set by the stages, in this order.
    target: Target = field(init=False)
    headers: Headers = field(init=False)
    match: Match = field(init=False)
    max_body: int = field(init=False)
    identity: Identity = field(init=False)
    device: dict[str, Any] = field(init=False)
    inspected: Inspected | None = None
    facts: Facts = field(init=False)
    subject: Subject = field(init=False)
    risk: dict[str, Any] = field(init=False)
    contained: Contained = field(init=False)  # what containment found for the subject
    policy_input: dict[str, Any] = field(init=False)
    cache_context: tuple[str, list[Any]] | None = field(init=False)
    decision: Decision = field(init=False)
    layer: str = field(init=False)
    revision: str = field(init=False)
    epochs: list[Any] = field(init=False)
    cache_key: str | None = None  # the decision cache's key, for ``explain``
    response: web.StreamResponse | None = None
    memo: Memo | None = None  # the connection's memo (None: every request walked whole)
    static: Static | None = None  # this request's static part, recalled or just remembered
    volatile_forward: tuple[tuple[str, str], ...] = ()  # with ``static``: this request's volatile headers

    @property
    def host(self) -> str:
        """The request's host as aiohttp reads it (for X-Forwarded-Host); else the checked Host."""
        return self.request.host if self.request is not None else self.headers.host

    @property
    def forwarded(self) -> bool:
        """Whether the connection is a trusted front proxy's, speaking for its client (XFCC)."""
        return self.conn is not None and self.conn.forwarded_by is not None

    @property
    def source_ip(self) -> str | None:
        return self.peername[0] if self.peername else None

    @property
    def source_port(self) -> int | None:
        return self.peername[1] if self.peername else None

    def facts_at(self, request_id: str, now: dt.datetime, body: Inspected | None = None) -> Facts:
        """What the policy input is built from: this request as the stages left it."""
        return Facts(
            request_id=request_id,
            method=self.method,
            http_version=f"HTTP/{self.version[0]}.{self.version[1]}",
            target=self.target,
            headers=self.headers,
            source_ip=self.source_ip,
            source_port=self.source_port,
            connection=self.conn,
            match=self.match,
            identity=self.identity,
            device=self.device,
            now=now,
            body=body,
        )
