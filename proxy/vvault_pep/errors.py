"""One error type, stable codes, one code → status table.

Every way a request can fail ends as a :class:`PepError` carrying a stable
string code (``sanitize.ambiguous_path``, ``pdp.timeout`` …).  The same code is
written into the problem+json body, the audit record and (later) metric labels,
so it must never change meaning once released.

Exception tree::

    PepError                    a request is refused; .code → status via STATUS
    ConfigError                 the config file is unusable (names file/line/field)

Lower-level exceptions (aiohttp, OSError, asyncio timeouts) are mapped to a
``PepError`` at exactly one boundary per stage, with ``raise … from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass

# code → (HTTP status, title).  The only place that decides which status a
# failure gets; the policy may override the status of its own denies only.
STATUS: dict[str, tuple[int, str]] = {
    # sanitize: the request is malformed or ambiguous; refused before routing.
    "sanitize.malformed": (400, "Malformed request"),
    "sanitize.bad_request_target": (400, "Bad request target"),
    "sanitize.ambiguous_path": (400, "Ambiguous path"),
    "sanitize.path_escape": (400, "Path escapes the root"),
    "sanitize.bad_query": (400, "Malformed query string"),
    "sanitize.bad_header": (400, "Malformed header"),
    "sanitize.duplicate_header": (400, "Duplicate header"),
    "sanitize.framing": (400, "Ambiguous message framing"),
    "sanitize.expectation": (417, "Expectation failed"),
    "sanitize.headers_too_large": (431, "Request headers too large"),
    "sanitize.body_too_large": (413, "Request body too large"),
    # routing
    "route.not_found": (404, "No route"),
    "route.method_not_allowed": (405, "Method not allowed"),
    # listener / client certificate
    "tls.client_cert_required": (401, "Client certificate required"),
    # policy said no (the policy may name another 4xx/5xx status)
    "policy.denied": (403, "Forbidden"),
    "pdp.undefined": (403, "Forbidden"),
    "pdp.malformed_decision": (403, "Forbidden"),
    "enforce.unsupported_obligation": (403, "Forbidden"),
    # the policy decision point could not answer: never allow
    "pdp.unavailable": (503, "Policy decision point unavailable"),
    "pdp.timeout": (503, "Policy decision point timed out"),
    "pdp.error": (503, "Policy decision point error"),
    # upstream
    "upstream.unavailable": (502, "Upstream unavailable"),
    "upstream.error": (502, "Bad gateway"),
    "upstream.timeout": (504, "Upstream timed out"),
    # the PEP itself
    "internal.error": (500, "Internal error"),
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the client is told: a stable code, a status and a safe detail."""

    code: str
    status: int
    title: str
    detail: str


class PepError(Exception):
    """A request is refused.  ``detail`` is shown to the client: keep it safe."""

    def __init__(self, code: str, detail: str = "", *, status: int | None = None) -> None:
        if code not in STATUS:
            # An unknown code is a programming error; refuse loudly rather than
            # inventing a status.
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.status = status if status is not None else STATUS[code][0]

    def refusal(self) -> Refusal:
        return Refusal(self.code, self.status, STATUS[self.code][1], self.detail)


class ConfigError(Exception):
    """The configuration cannot be used.  The message names file, line and field."""
