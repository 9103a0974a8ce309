"""Request bodies the policy may read: JSON, opt-in per route, bounded, read once.

A route with ``body: {inspect: json}`` has its JSON request body parsed
before the decision and placed in ``input.request.body``; every other route's
body is never read before the decision and streams straight through.  The
bytes read are kept and forwarded first, then the rest of the stream, so the
upstream receives exactly the bytes the policy judged (no re-serialisation).

* No body → ``body: null``, ``body_truncated: false``.
* A body longer than ``max_bytes`` (declared by Content-Length, or found so
  while reading a chunked one) → ``body: null``, ``body_truncated: true``,
  as opa-envoy marks a cut body; the policy decides (the shipped one denies).
* A body that is not ``application/json`` (or ``+json``) → 415; one that is
  not valid JSON → 400: the route said its bodies are JSON, so anything else
  is refused before the policy rather than shown to it as "no body".
  An object with the same key twice is not valid here either (400): parsers
  disagree on which one counts, and the upstream must see what the policy saw.
* The whole read runs under the route's ``body_deadline_s`` (else
  ``limits.body_deadline_s``) as well as the per-chunk idle timeout: a body
  trickled a byte at a time ends in 408 ``sanitize.body_deadline``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import PepError


@dataclass(frozen=True, slots=True)
class Inspected:
    value: Any  # the parsed document, or None
    truncated: bool
    raw: bytes  # what was read from the client: forwarded first, as it is
    continued: bool = False  # 100 Continue already sent to the client

    def as_input(self) -> dict[str, Any]:
        return {"body": self.value, "body_truncated": self.truncated}


NOTHING = Inspected(None, False, b"")


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse(raw: bytes, *, complete: bool) -> Inspected:
    """The policy's view of ``raw`` (pure); ``complete`` is False when the body went on past the limit."""
    if not complete:
        return Inspected(None, True, raw)
    if not raw:
        return Inspected(None, False, raw)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # also: nesting past orjson's depth limit
        raise PepError("sanitize.invalid_json", "the request body is not valid JSON") from exc
    if b"{" in raw and _has_duplicate_keys(raw):
        raise PepError("sanitize.invalid_json", "the request body repeats a key in an object")
    return Inspected(value, False, raw)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate
        out[key] = value
    return out


def _has_duplicate_keys(raw: bytes) -> bool:
    """Whether an object in ``raw`` (valid JSON: orjson parsed it) names a key twice."""
    try:
        json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate:
        return True
    except (ValueError, RecursionError):
        return True  # orjson took it, the standard parser cannot check it: refused, not believed
    return False
