"""A refusal as the client sees it: an RFC 9457 problem+json body.

One shape for every refusal, whether the pipeline made it or the listener's HTTP parser did:
``type`` (a stable URI ending in the code), ``title``, ``status``, ``detail``, ``code`` and
``request_id`` (plus ``decision_id`` when a decision was asked).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import Refusal

PROBLEM_TYPE_BASE = "https://vvault-pep.dev/problems/"
# Headers a decision may never set on the upstream request: the PEP owns them.


def problem_body(refusal: Refusal, *, request_id: str, decision_id: str | None) -> bytes:
    doc: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + refusal.code,
        "title": refusal.title,
        "status": refusal.status,
        "detail": refusal.detail or refusal.title,
        "code": refusal.code,
        "request_id": request_id,
    }
    if decision_id is not None:
        doc["decision_id"] = decision_id
    return orjson.dumps(doc)
