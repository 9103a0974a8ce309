"""The subject: every verified name a request carries, derived once after authentication.

Containment, rate limits, risk signals, cache epochs and the audit record all
read this one frozen object; none of them looks at the policy input or at
anything the client wrote (path parameters, headers).  Each name comes from a
check the PEP made itself:

=============  ==============================================================
``user``       ``<issuer>|<sub>`` of a token the PEP verified (a ``sub`` is
               only unique within its issuer)
``workload``   the SPIFFE ID of a validated SVID (URI SAN, configured trust
               domain), never a CN
``certificate`` the SHA-256 thumbprint of the client certificate the TLS
               handshake verified
``token``      the verified token's ``jti``
``device``     the device id of a *verified* posture assertion
``tenants``    the verified token's tenant claim, then the tenant registered
               for the workload in ``identity.workload.tenants``
=============  ==============================================================

:attr:`Subject.scopes` is what containment checks and cache epochs follow:
every applicable scope, whichever credentials are presented together.  The
``subject`` scope names each principal the request carries — the user and the
workload — so a workload quarantined as a subject stays contained when a user
token rides on its certificate, and a user stays contained on any certificate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .request import PeerCertificate

SCOPES = ("subject", "workload", "certificate", "token", "device", "tenant")


@dataclass(frozen=True, slots=True)
class Subject:
    user: str | None = None
    workload: str | None = None
    certificate: str | None = None
    token: str | None = None
    device: str | None = None
    tenants: tuple[str, ...] = ()
    scopes: tuple[tuple[str, str], ...] = ()

    @property
    def principal(self) -> str | None:
        """Who is acting: the user, else the workload."""
        return self.user or self.workload

    @property
    def tenant(self) -> str | None:
        """The verified tenant: the token's, else the workload's registered one."""
        return self.tenants[0] if self.tenants else None

    def value_of(self, scope: str) -> str | None:
        """The value a quarantine obligation of ``scope`` contains for this request."""
        if scope == "subject":
            return self.principal
        if scope == "tenant":
            return self.tenant
        if scope in ("workload", "certificate", "token", "device"):
            value: str | None = getattr(self, scope)
            return value
        return None


NOBODY = Subject()


def subject_of(
    identity: Identity,
    peer: PeerCertificate | None,
    device: Mapping[str, Any] | None,
    workload_tenants: Mapping[str, str],
) -> Subject:
    user = identity.user
    workload = identity.workload.spiffe_id if identity.workload is not None else None
    user_key = None
    if user is not None and user.subject:
        user_key = f"{user.issuer}|{user.subject}"
    token = user.token_id if user is not None and user.token_id else None
    certificate = peer.sha256 if peer is not None and peer.sha256 else None
    device_id = None
    if device is not None and device.get("verified") is True:
        raw = device.get("id")
        device_id = raw if isinstance(raw, str) and raw else None
    tenants: list[str] = []
    if user is not None and user.tenant:
        tenants.append(user.tenant)
    registered = workload_tenants.get(workload) if workload is not None else None
    if registered and registered not in tenants:
        tenants.append(registered)
    scopes: list[tuple[str, str]] = []
    for scope, value in (
        ("subject", user_key),
        ("subject", workload),
        ("workload", workload),
        ("certificate", certificate),
        ("token", token),
        ("device", device_id),
        *(("tenant", t) for t in tenants),
    ):
        if value is not None and (scope, value) not in scopes:
            scopes.append((scope, value))
    return Subject(user_key, workload, certificate, token, device_id, tuple(tenants), tuple(scopes))


def client_key(subject: Subject, source_ip: str | None) -> str:
    """The client when nothing better names it: its certificate, else its address."""
    if subject.certificate is not None:
        return f"cert:{subject.certificate}"
    return f"ip:{source_ip}" if source_ip else "unknown"


@dataclass(frozen=True, slots=True)
class UserToken:
    issuer: str
    subject: str | None
    tenant: str | None
    roles: tuple[str, ...]
    groups: tuple[str, ...]
    scopes: tuple[str, ...]
    amr: tuple[str, ...]
    acr: str | None
    auth_time: int | None
    client_id: str | None
    token_id: str | None
    expires_at: int
    cnf_x5t_s256: str | None
    claims: Mapping[str, Any] = field(default_factory=dict)
    key_id: str | None = None  # the JWS header's kid: a cached token ends when its key is withdrawn


@dataclass(frozen=True, slots=True)
class Workload:
    spiffe_id: str
    trust_domain: str
    path: str


@dataclass(frozen=True, slots=True)
class Identity:
    user: UserToken | None
    workload: Workload | None
    cert_bound: bool = False

    @property
    def kind(self) -> str:
        if self.user and self.workload:
            return "user+workload"
        if self.user:
            return "user"
        if self.workload:
            return "workload"
        return "anonymous"

    def as_input(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"authenticated": self.kind != "anonymous", "kind": self.kind}
        u = self.user
        if u is not None:
            doc.update(
                subject=u.subject,
                issuer=u.issuer,
                tenant=u.tenant,
                roles=list(u.roles),
                groups=list(u.groups),
                scopes=list(u.scopes),
                amr=list(u.amr),
                acr=u.acr,
                auth_time=u.auth_time,
                client_id=u.client_id,
                token_id=u.token_id,
                expires_at=u.expires_at,
                cert_bound=self.cert_bound,
                claims=dict(u.claims),
            )
        if self.workload is not None:
            w = self.workload
            doc["workload"] = {"spiffe_id": w.spiffe_id, "trust_domain": w.trust_domain, "path": w.path}
            if u is None:
                doc["subject"] = w.spiffe_id
        return doc


ANONYMOUS = Identity(None, None)
