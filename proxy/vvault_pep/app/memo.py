"""The per-connection memo: a request seen before, byte for byte, skips the walk's static part.

A keep-alive connection usually repeats itself: the same certificate, token, path and
headers, request after request.  The stages up to the subject (peer, sanitize, route,
authenticate, posture, name) are pure over what arrived and the process's fixed config, so
their outcome is remembered on the connection (:class:`Memo`, a few entries, least recently
used out) under the exact request line and the exact raw header block — every name and value
as bytes, in order, the ``Authorization`` header included: any byte of difference is another
entry, never a "same enough" one.  The one exception is ``listener.memo_volatile_headers``
(trace context, request ids: new on every request, read by no stage, and the config refuses
a name that one reads): those are left out of the key and go through
:func:`~vvault_pep.core.sanitize.check_more_headers` on every request, the limits counted
with the remembered block; one it refuses makes the request walked whole.  What is kept
(:class:`Static`):

* the stages' fields of the exchange (verified connection, canonical target, checked headers,
  route match, identity, device, subject) and what they wrote in the audit trail;
* the policy input without the request id, the clock, the body and the risk block
  (:func:`~vvault_pep.core.policy_input.with_request_facts` adds the first three per request,
  the context stage the last);
* that draft redacted for the audit record, when no redaction path reaches a per-request part;
* the client headers the upstream may see, and the ``X-Forwarded-Client-Cert`` element.

Everything else is done for every request: the request id and the clock, the body, risk,
containment, rate and in-flight limits, the cache lookup with this moment's revision and
epochs, the decision, the audit record.  Only successful static parts are remembered: a
refusal is walked again.

An entry is used only while it still holds, checked on each use, and dropped otherwise:

* the client certificate is valid now, and the bearer token still sits in the verified-token
  cache (before its ``exp``, its signing key still published and the key set fresh: a rotation
  or an expiry is a fresh walk, which refuses what it must);
* the containment and decision-cache generations (any quarantine or lift, revision, epoch or
  policy-path change this replica knows of) and the listener's TLS reloads are what they were.

A request carrying a device-posture assertion is never remembered: its age is part of the input.
``listener.memo: false`` switches all of this off; ``explain`` never uses it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..config.models import Config
from ..core import xfcc
from ..core.policy_input import PER_REQUEST, Facts, build_input, with_request_facts
from ..core.sanitize import block_of, check_more_headers
from ..decide.cache import DecisionCache
from ..errors import PepError
from ..identity.authn import Authenticator
from ..observe.audit import redact
from ..observe.telemetry import KNOWN_METHODS
from ..shared.containment import Containment
from .exchange import Exchange, Memo, Static

ENTRIES = 4  # per connection: a client alternating between a few requests still hits
_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)


class Memoiser:
    """Recalls and remembers the static part of a request for the pipeline."""

    def __init__(
        self,
        config: Config,
        authn: Authenticator,
        containment: Containment,
        cache: DecisionCache,
        reloads: Callable[[], int],
    ) -> None:
        self.authn, self.containment, self.cache = authn, containment, cache
        self.reloads = reloads
        self.posture_header = config.posture.header.lower().encode()
        self.posture_read = bool(config.posture.issuers)
        red = config.audit.redact
        self.erase = (*red.erase, f"request.headers.{config.posture.header}")
        self.mask, self.query = red.mask, red.query
        self.redact_once = config.audit.include_input and not any(
            # a redaction path reaching a per-request part makes the redaction a per-request one
            _touches(path, part)
            for path in (*self.erase, *self.mask)
            for part in PER_REQUEST
        )
        self.xfcc_by = config.xfcc.by
        self.volatile = frozenset(name.encode() for name in config.listener.memo_volatile_headers)
        self.volatile_names = frozenset(config.listener.memo_volatile_headers)  # as the checked headers' lower names
        self.rules, self.limits = config.sanitize, config.limits
        self.also_owned = frozenset({config.posture.header})  # as the sanitize stage passes it

    def new(self) -> Memo:
        return Memo(self)

    def stamp(self) -> tuple[int, int, int]:
        return (self.containment.generation, self.cache.generation, self.reloads())

    def split(
        self, raw: tuple[tuple[bytes, bytes], ...]
    ) -> tuple[tuple[tuple[bytes, bytes], ...], list[tuple[bytes, bytes]]]:
        """The header block without the volatile headers (the memo's key), and those headers."""
        volatile = self.volatile
        if not volatile:
            return raw, []
        loose = [h for h in raw if h[0].lower() in volatile]
        if not loose:
            return raw, []
        return tuple(h for h in raw if h[0].lower() not in volatile), loose

    def recall(self, x: Exchange) -> bool:
        """Set the static stages' fields from a still valid entry; False: walk them."""
        memo = x.memo
        if memo is None:
            return False
        stable, loose = self.split(x.raw_headers)
        key = (x.method, x.raw_path, x.version, stable)
        entry = memo.entries.get(key)
        if entry is None:
            return False
        now = time.time()
        user = entry.identity.user
        if (
            entry.stamp != self.stamp()
            or not entry.valid_from <= now < entry.valid_until
            or (
                user is not None and (entry.token_key is None or self.authn.still_verified(entry.token_key) is not user)
            )
        ):
            del memo.entries[key]
            return False
        if loose:
            try:
                checked = check_more_headers(loose, self.rules, self.limits, entry.block, self.also_owned)
            except PepError:
                return False  # walked whole, so it is refused exactly as a fresh request would be
            owned = self._owned(x, entry.match.route.forward_authorization)
            x.volatile_forward = tuple((k, v) for k, v in checked if k.lower() not in owned)
        memo.entries.move_to_end(key)
        x.static = entry
        x.conn, x.target, x.headers = entry.conn, entry.target, entry.headers
        x.match, x.max_body = entry.match, entry.max_body
        x.identity, x.device, x.subject = entry.identity, entry.device, entry.subject
        trail = x.trail
        trail.fields.update(entry.fields)
        trail.http_route, trail.subject = entry.http_route, entry.subject
        span = x.span
        if span.is_recording():
            route = entry.match.route
            span.set_attribute("url.path", entry.target.path)
            span.set_attribute("server.address", entry.headers.host)
            span.set_attribute("server.port", entry.headers.port or 443)
            span.update_name(f"{x.method if x.method in KNOWN_METHODS else 'HTTP'} {route.path}")
            span.set_attribute("http.route", route.path)
            span.set_attribute("vvault_pep.route", route.name)
        return True

    def remember(self, x: Exchange) -> None:
        """Keep what the static stages just made of this request, when it may be reused."""
        memo = x.memo
        if memo is None or x.static is not None:
            return
        stable, _ = self.split(x.raw_headers)
        key = (x.method, x.raw_path, x.version, stable)
        seen = memo.seen
        sighted = hash(key)
        if sighted not in seen:
            seen[sighted] = None
            while len(seen) > 2 * ENTRIES:
                seen.popitem(last=False)
            return
        if self.posture_read and any(k.lower() == self.posture_header for k, _ in x.raw_headers):
            return  # a posture assertion ages: judged afresh on every request
        stamp = self.stamp()
        conn, identity, route = x.conn, x.identity, x.match.route
        peer = conn.peer if conn is not None else None
        valid_from, valid_until = float("-inf"), float("inf")
        if peer is not None:
            valid_from, valid_until = peer.valid_from.timestamp(), peer.valid_until.timestamp()
        token_key = None
        if identity.user is not None:
            token_key = self.authn.verified_key(x.headers.authorization)
            if token_key is None or self.authn.still_verified(token_key) is not identity.user:
                return  # not in the verified-token cache: nothing to recheck it against
            valid_until = min(valid_until, identity.user.expires_at)
        facts = x.facts_at("", _EPOCH)
        draft = build_input(facts, pep_version=__version__)
        owned = self._owned(x, route.forward_authorization)
        forward = [(k, v) for k, v in x.headers.forward if k.lower() not in owned]
        volatile = self.volatile_names
        entry = Static(
            stamp=stamp,
            valid_from=valid_from,
            valid_until=valid_until,
            token_key=token_key,
            conn=conn,
            target=x.target,
            headers=x.headers,
            match=x.match,
            max_body=x.max_body,
            identity=identity,
            device=x.device,
            subject=x.subject,
            fields=tuple(x.trail.fields.items()),
            http_route=x.trail.http_route,
            draft=draft,
            redacted=redact(draft, self.erase, self.mask, self.query) if self.redact_once else None,
            forward=tuple((k, v) for k, v in forward if k.lower() not in volatile),
            block=block_of(stable),
            xfcc=xfcc.emit(peer, self.xfcc_by) if peer is not None else None,
        )
        # This request's own volatile headers go after the others, as a recalled one's do.
        x.volatile_forward = tuple((k, v) for k, v in forward if k.lower() in volatile)
        entries = memo.entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > ENTRIES:
            entries.popitem(last=False)
        x.static = entry

    @staticmethod
    def _owned(x: Exchange, forward_authorization: bool) -> set[str]:
        """The client headers the PEP sets itself on the way up: never the client's copy."""
        owned = {"x-forwarded-proto", "x-forwarded-host", "x-request-id", xfcc.HEADER}
        if x.source_ip:
            owned.add("x-forwarded-for")
        if not forward_authorization:
            owned.add("authorization")
        return owned


def policy_input(static: Static, facts: Facts) -> dict[str, Any]:
    """The request's input before risk: the draft with this request's id, clock and body."""
    return with_request_facts(static.draft, facts)


def redacted_input(static: Static, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]] | None:
    """``redact(doc)`` from the draft's redaction (None: redact ``doc`` itself).

    Only the per-request parts are new in ``doc``, and no redaction path reaches them.
    """
    if static.redacted is None:
        return None
    out, done = static.redacted
    draft = static.draft["request"]
    request = {**out["request"], "id": doc["request"]["id"]}
    for name, value in doc["request"].items():
        if name not in draft:
            request[name] = value  # the body's fields, where the route reads it
    return (
        {**out, "request": request, "time": doc["time"], "risk": doc["risk"]},
        {"erased": list(done["erased"]), "masked": list(done["masked"])},
    )


def _touches(dotted: str, part: tuple[str, ...]) -> bool:
    path = tuple(dotted.split("."))
    n = min(len(path), len(part))
    return path[:n] == part[:n]


__all__ = ["ENTRIES", "Memo", "Memoiser", "Static", "policy_input", "redacted_input"]
