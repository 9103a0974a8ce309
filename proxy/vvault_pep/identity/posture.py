"""Posture: the device a request comes from, as a signed assertion says — or not.

A device trust service signs a short-lived JWT about a device (managed,
platform, OS version, patch age, disk encryption, screen lock, EDR, a
compliance score).  The client presents it in the posture header
(``X-Device-Posture`` by default, a header the PEP owns: it is never
forwarded).  The PEP verifies it with the same machinery as bearer tokens,
against the posture issuers' keys only, then checks:

* freshness: ``iat`` no older than ``posture.max_age_s`` (``stale``);
* binding to the caller: its ``sub`` is the token's subject, or its
  ``cnf.x5t#S256`` is the client certificate's thumbprint (``not_bound``) —
  an assertion lifted from another device or user is worthless.

The outcome is data, never a refusal: ``input.device`` carries ``verified``,
the claims, ``age_s`` and, when not verified, a ``reason`` (``absent``,
``expired``, ``bad_signature``, ``not_bound``, ``stale``, ``invalid``).
The policy decides which data needs which device.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from ..config.models import Posture as PostureConfig
from ..core.principal import Identity
from ..core.request import PeerCertificate
from ..errors import PepError
from .jwt import JwtVerifier

_CLAIMS = {
    "device_id": "id",
    "managed": "managed",
    "platform": "platform",
    "os_version": "os_version",
    "patch_age_days": "patch_age_days",
    "disk_encryption": "disk_encrypted",
    "screen_lock": "screen_lock",
    "edr_running": "edr_running",
    "compliance_score": "compliance_score",
}
_REASONS = {"authn.expired": "expired", "authn.bad_signature": "bad_signature", "authn.unknown_key": "bad_signature"}


def absent() -> dict[str, Any]:
    return {"verified": False, "reason": "absent"}


class PostureVerifier:
    def __init__(self, cfg: PostureConfig) -> None:
        self.cfg = cfg
        self.jwt = JwtVerifier(cfg.issuers, max_bytes=8192, realm="vvault-pep")

    async def start(self) -> None:
        await self.jwt.start()

    async def stop(self) -> None:
        await self.jwt.stop()

    async def assess(self, assertions: list[str], identity: Identity, peer: PeerCertificate | None) -> dict[str, Any]:
        if not self.cfg.issuers or not assertions:
            return absent()
        if len(assertions) > 1:
            return {"verified": False, "reason": "invalid"}
        token = assertions[0].strip()
        try:
            issuer, alg, kid = self.jwt.precheck(token)
            claims = await self.jwt.claims(token, issuer, alg, kid)
        except PepError as err:
            if err.code == "authn.keys_unavailable":
                raise  # the device service's keys are gone: a dependency fault, fail closed
            return {"verified": False, "reason": _REASONS.get(err.code, "invalid")}
        device: dict[str, Any] = {"issuer": issuer.issuer}
        for claim, name in _CLAIMS.items():
            if claim in claims:
                device[name] = claims[claim]
        iat = claims.get("iat")
        age = time.time() - iat if isinstance(iat, int | float) and not isinstance(iat, bool) else None
        device["age_s"] = round(age, 3) if age is not None else None
        if age is None or age > self.cfg.max_age_s:
            return {**device, "verified": False, "reason": "stale"}
        if not self._bound(claims, identity, peer):
            return {**device, "verified": False, "reason": "not_bound"}
        return {**device, "verified": True, "reason": None}

    def _bound(self, claims: dict[str, Any], identity: Identity, peer: PeerCertificate | None) -> bool:
        mode = self.cfg.binding
        subject = identity.user.subject if identity.user else None
        by_subject = (
            isinstance(claims.get("sub"), str)
            and subject is not None
            and hmac.compare_digest(claims["sub"].encode(), subject.encode())
        )
        cnf = claims.get("cnf")
        thumb = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        by_cert = (
            isinstance(thumb, str) and peer is not None and hmac.compare_digest(thumb.encode(), peer.x5t_s256.encode())
        )
        if mode == "subject":
            return by_subject
        if mode == "cnf" or thumb is not None:
            # An assertion bound to a device certificate is worth nothing from another
            # device, whatever its subject says.
            return by_cert
        return by_subject
