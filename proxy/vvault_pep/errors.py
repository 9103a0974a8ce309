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
    "sanitize.body_timeout": (408, "Request body too slow"),
    "sanitize.body_deadline": (408, "Request body took too long"),
    "sanitize.invalid_json": (400, "Request body is not valid JSON"),
    "sanitize.bad_xfcc": (400, "Malformed forwarded client certificate"),
    "sanitize.unsupported_media_type": (415, "Unsupported media type"),
    "sanitize.unknown_host": (421, "Misdirected request"),
    # routing
    "route.not_found": (404, "No route"),
    "route.method_not_allowed": (405, "Method not allowed"),
    # listener / client certificate
    "tls.client_cert_required": (401, "Client certificate required"),
    "tls.client_cert_expired": (401, "Client certificate expired"),
    # authn: credentials (RFC 6750 error values go in WWW-Authenticate)
    "authn.required": (401, "Authentication required"),
    "authn.token_in_query": (400, "Token in query string"),
    "authn.token_too_large": (431, "Token too large"),
    "authn.malformed": (401, "Malformed token"),
    "authn.encrypted_token": (401, "Encrypted tokens are not accepted"),
    "authn.bad_algorithm": (401, "Algorithm not accepted"),
    "authn.unknown_issuer": (401, "Unknown issuer"),
    "authn.wrong_type": (401, "Wrong token type"),
    "authn.unsupported_crit": (401, "Unsupported critical header"),
    "authn.unknown_key": (401, "Unknown signing key"),
    "authn.bad_signature": (401, "Bad signature"),
    "authn.expired": (401, "Token expired"),
    "authn.not_yet_valid": (401, "Token not yet valid"),
    "authn.wrong_audience": (401, "Wrong audience"),
    "authn.wrong_issuer": (401, "Wrong issuer"),
    "authn.missing_claim": (401, "Missing claim"),
    "authn.cert_binding_mismatch": (401, "Token bound to another certificate"),
    "authn.unbound_token": (401, "Certificate-bound token required"),
    "authn.untrusted_workload": (401, "Workload identity required"),
    "authn.keys_unavailable": (503, "Signing keys unavailable"),
    # containment: quarantines, revocations, rate limits
    "containment.quarantined": (403, "Quarantined"),
    "ratelimit.exceeded": (429, "Too many requests"),
    "ratelimit.concurrency": (429, "Too many concurrent requests"),
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
    "enforce.redaction_impossible": (502, "Response withheld"),
    "enforce.partial_answer": (502, "Response withheld"),
    "enforce.conditional_refused": (400, "Conditional request refused"),
    "upstream.unavailable": (502, "Upstream unavailable"),
    "upstream.error": (502, "Bad gateway"),
    "upstream.timeout": (504, "Upstream timed out"),
    "upstream.saturated": (503, "Upstream busy"),
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
    headers: tuple[tuple[str, str], ...] = ()
    allow_methods: tuple[str, ...] = ()  # for the router's own 405 only


class PepError(Exception):
    """A request is refused.  ``detail`` is shown to the client: keep it safe."""

    def __init__(
        self,
        code: str,
        detail: str = "",
        *,
        status: int | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        allow_methods: tuple[str, ...] = (),
    ) -> None:
        if code not in STATUS:
            # An unknown code is a programming error; refuse loudly rather than
            # inventing a status.
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.status = status if status is not None else STATUS[code][0]
        self.headers = headers
        self.allow_methods = allow_methods

    def refusal(self) -> Refusal:
        return Refusal(self.code, self.status, STATUS[self.code][1], self.detail, self.headers, self.allow_methods)


class ConfigError(Exception):
    """The configuration cannot be used.  The message names file, line and field."""
