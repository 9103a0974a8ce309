"""Scopes: the names a request carries for quarantine, cache epochs, risk and rate limits.

A user's subject is only unique within its issuer: ``alice`` at the corporate IdP and
``alice`` at a partner IdP are different people, so the subject scope is
``<issuer>|<subject>``.  A workload's subject is its SPIFFE ID (unique by itself).  A
device id counts only when the posture assertion that carried it was verified —
otherwise it is whatever the client wrote.
"""

from __future__ import annotations

from typing import Any


def subject_key(doc: dict[str, Any]) -> str | None:
    identity = doc.get("identity") or {}
    subject = identity.get("subject")
    if not isinstance(subject, str) or not subject:
        return None
    issuer = identity.get("issuer")
    return f"{issuer}|{subject}" if isinstance(issuer, str) and issuer else subject


def client_key(doc: dict[str, Any]) -> str:
    cert = (doc.get("tls") or {}).get("client_cert") or {}
    if isinstance(cert.get("sha256"), str):
        return f"cert:{cert['sha256']}"
    ip = (doc.get("source") or {}).get("ip")
    return f"ip:{ip}" if isinstance(ip, str) else "unknown"


def scope_values(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The (scope, value) pairs a request carries, from its policy input."""
    identity = doc.get("identity") or {}
    device = doc.get("device") or {}
    pairs = [
        ("subject", subject_key(doc)),
        ("tenant", identity.get("tenant")),
        ("tenant", (doc.get("route") or {}).get("params", {}).get("tenant")),
        ("token", identity.get("token_id")),
        ("device", device.get("id") if device.get("verified") is True else None),
    ]
    out: list[tuple[str, str]] = []
    for scope, value in pairs:
        if isinstance(value, str) and value and (scope, value) not in out:
            out.append((scope, value))
    return out
