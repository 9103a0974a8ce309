"""Where a config departs from the secure defaults: the hardening report.

``vvault-pep check`` prints one line per finding (the field, what it does, why
it is risky, the safe value) and ``check --strict`` fails on any of them, so a
deployment pipeline can insist on the hardened shape.  ``serve`` logs the
findings that change what the policy can know (risk without Redis).  Every
finding is a choice a config may have good reason to make; the report makes
it visible, it does not forbid it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.models import Config
from ..core.hosts import ANY

SAFE_MAX_BODY_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Finding:
    field: str
    what: str
    why: str
    safe: str

    def line(self) -> str:
        return f"{self.field}: {self.what} — {self.why} (safe: {self.safe})"


def findings(config: Config) -> list[Finding]:
    out: list[Finding] = []
    add = out.append
    listener = config.listener
    if listener.host in ("0.0.0.0", "::", ""):
        add(
            Finding(
                "listener.host",
                f"binds every interface ({listener.host})",
                "the PEP is reachable from every network the host is on",
                "the pod or host address it serves",
            )
        )
    if ANY in listener.hosts:
        add(
            Finding(
                "listener.hosts",
                "serves any Host",
                "a client chooses the Host (X-Forwarded-Host) the upstream sees",
                "the server certificate's names",
            )
        )
    if listener.tls.client_auth != "required":
        add(
            Finding(
                "listener.tls.client_auth",
                "client certificates are optional",
                "callers without a certificate reach authentication and the policy",
                "required",
            )
        )
    if config.limits.max_body_bytes > SAFE_MAX_BODY_BYTES:
        add(
            Finding(
                "limits.max_body_bytes",
                f"{config.limits.max_body_bytes} bytes on every route",
                "every route accepts bodies this large",
                f"{SAFE_MAX_BODY_BYTES}, raised per route",
            )
        )
    if not config.sanitize.reject_semicolon:
        add(
            Finding(
                "sanitize.reject_semicolon",
                "`;` path parameters are accepted",
                "`pii;v=1/ssn` is judged as another path than the `pii/ssn` some upstreams serve",
                "true",
            )
        )
    if not config.sanitize.reject_encoded_percent:
        add(
            Finding(
                "sanitize.reject_encoded_percent",
                "`%25` is accepted",
                "an upstream that decodes twice sees another path than the policy",
                "true",
            )
        )
    for i, route in enumerate(config.routes):
        where = f"routes[{i}] ({route.name})"
        if route.authn.require == "none":
            add(
                Finding(
                    f"{where}.authn.require",
                    "anonymous callers reach the policy",
                    "nothing but the policy stands between an unauthenticated caller and the upstream",
                    "any",
                )
            )
        if route.forward_authorization:
            add(
                Finding(
                    f"{where}.forward_authorization",
                    "the client's Authorization reaches the upstream",
                    "the upstream may re-read a credential instead of the PEP's verdict",
                    "false",
                )
            )
        if route.mode == "monitor":
            add(
                Finding(
                    f"{where}.mode",
                    "monitor: denies are logged, not enforced",
                    "the policy's denies let requests through",
                    "enforce",
                )
            )
    for i, issuer in enumerate(config.identity.issuers):
        where = f"identity.issuers[{i}] ({issuer.name})"
        if issuer.typ is None:
            add(
                Finding(
                    f"{where}.typ",
                    "any token type is accepted",
                    "an ID token or another JWT of the issuer passes as an access token",
                    "at+jwt",
                )
            )
        if "sub" not in issuer.required_claims:
            add(
                Finding(
                    f"{where}.required_claims",
                    "a token without `sub` is accepted",
                    "a token that names nobody reaches the policy",
                    "[sub]",
                )
            )
        if issuer.allow_http:
            add(
                Finding(
                    f"{where}.allow_http",
                    "discovery and keys over plain HTTP",
                    "anyone on the path can substitute the signing keys",
                    "false",
                )
            )
    if config.risk.enabled and config.redis is None:
        add(
            Finding(
                "risk.enabled",
                "risk is on without Redis",
                "risk is never available; the shipped policy treats writes, rotations and the control plane "
                "as read-only",
                "configure redis (or set risk.enabled: false and say so in the policy data)",
            )
        )
    if config.admin.token is not None and config.admin.policy is None:
        add(
            Finding(
                "admin.token",
                "the admin API takes one shared bearer secret",
                "no per-admin identity, no MFA, no per-action policy",
                "admin.tls with admin.policy",
            )
        )
    admin = config.admin
    if (admin.token is not None or admin.policy is not None) and admin.host in ("0.0.0.0", "::", ""):
        add(
            Finding(
                "admin.host",
                f"the admin API binds every interface ({admin.host})",
                "quarantines, grants and cache control are reachable from every network the host is on",
                "127.0.0.1, or a NetworkPolicy that admits only the operators' namespace",
            )
        )
    if admin.token is not None and admin.tls is None:
        add(
            Finding(
                "admin.tls",
                "the admin API is plain HTTP",
                "the admin token crosses the network in clear text",
                "admin.tls (with admin.policy)",
            )
        )
    if admin.token is not None and admin.token_may_push:
        add(
            Finding(
                "admin.token_may_push",
                "the shared admin token may push OPA data and policies",
                "one secret, no MFA, rewrites every rule and grant",
                "false (pushes through admin.tls with admin.policy)",
            )
        )
    if config.cache.debug_headers:
        add(
            Finding(
                "cache.debug_headers",
                "responses say which cache layer answered",
                "clients learn what others asked recently",
                "false",
            )
        )
    return out
