"""The subject and the keys built from it: pure functions, tables."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from vvault_pep.config import RateLimit
from vvault_pep.core.principal import NOBODY, Identity, Subject, UserToken, Workload, subject_of
from vvault_pep.core.request import PeerCertificate
from vvault_pep.shared.ratelimit import key_of

ISS = "https://idp.example"
SVID = "spiffe://demo.vvault/client/reader"
TENANTS = {SVID: "registered"}


def user(sub: str | None = "alice", tenant: str | None = "acme", jti: str | None = "j-1") -> UserToken:
    return UserToken(ISS, sub, tenant, (), (), (), (), None, None, None, jti, 2_000_000_000, None)


def peer(sha: str = "ab" * 32, spiffe: str | None = SVID) -> PeerCertificate:
    now = dt.datetime.now(dt.UTC)
    return PeerCertificate(
        "CN=x", "CN=ca", "x", (), (spiffe,) if spiffe else (), spiffe, sha, "x5t", "1", "", "", now, now
    )


WORKLOAD = Workload(SVID, "demo.vvault", "/client/reader")
VERIFIED = {"verified": True, "id": "dev-1"}


@pytest.mark.parametrize(
    ("identity", "cert", "device", "scopes"),
    [
        (Identity(None, None), None, None, ()),
        # a certificate whose SPIFFE ID was not validated (no trust domain) is a certificate only
        (Identity(None, None), peer(), None, (("certificate", "ab" * 32),)),
        (
            Identity(None, WORKLOAD),
            peer(),
            None,
            (("subject", SVID), ("workload", SVID), ("certificate", "ab" * 32), ("tenant", "registered")),
        ),
        (
            Identity(user(), WORKLOAD),
            peer(),
            VERIFIED,
            (
                ("subject", f"{ISS}|alice"),
                ("subject", SVID),
                ("workload", SVID),
                ("certificate", "ab" * 32),
                ("token", "j-1"),
                ("device", "dev-1"),
                ("tenant", "acme"),
                ("tenant", "registered"),
            ),
        ),
        # an unverified device is whatever the client wrote: no scope
        (Identity(user(), None), None, {"verified": False, "id": "dev-1"}, (
            ("subject", f"{ISS}|alice"), ("token", "j-1"), ("tenant", "acme"))),
        (Identity(user(sub=None, tenant=None, jti=None), None), None, None, ()),
    ],
)  # fmt: skip
def test_scopes_are_every_verified_name(
    identity: Identity, cert: PeerCertificate | None, device: dict[str, Any] | None, scopes: tuple[Any, ...]
) -> None:
    assert subject_of(identity, cert, device, TENANTS).scopes == scopes


def test_the_tenant_is_the_tokens_then_the_workloads() -> None:
    assert subject_of(Identity(user(), WORKLOAD), peer(), None, TENANTS).tenant == "acme"
    assert subject_of(Identity(user(tenant=None), WORKLOAD), peer(), None, TENANTS).tenant == "registered"
    assert subject_of(Identity(user(tenant=None), None), peer(), None, TENANTS).tenant is None


ALICE = subject_of(Identity(user(), None), None, None, TENANTS)
NO_TENANT = subject_of(Identity(user(tenant=None), None), peer(), None, TENANTS)
BARE_CERT = subject_of(Identity(None, None), peer(), None, TENANTS)
WORKER = subject_of(Identity(None, WORKLOAD), peer(), None, TENANTS)


@pytest.mark.parametrize(
    ("per", "who", "key"),
    [
        ("subject", ALICE, f"r:subject:{ISS}|alice"),
        ("tenant", ALICE, "r:tenant:acme"),
        # no verified tenant: the caller's own bucket, never one a path parameter names
        ("tenant", NO_TENANT, f"r:subject:{ISS}|alice"),
        ("tenant", BARE_CERT, f"r:client:cert:{'ab' * 32}"),
        ("tenant", WORKER, "r:tenant:registered"),
        ("certificate", NO_TENANT, f"r:certificate:{'ab' * 32}"),
        ("certificate", ALICE, "r:client:ip:192.0.2.1"),
        ("workload", WORKER, f"r:workload:{SVID}"),
        ("workload", ALICE, f"r:subject:{ISS}|alice"),
        ("client", ALICE, "r:client:ip:192.0.2.1"),
        ("route", ALICE, "r:route:*"),
        ("subject", NOBODY, "r:client:ip:192.0.2.1"),
    ],
)
def test_rate_limit_keys_come_from_the_subject(per: Any, who: Subject, key: str) -> None:
    assert key_of(RateLimit(per=per, rate_per_s=1), "r", who, "192.0.2.1") == key


def test_obligation_values() -> None:
    who = subject_of(Identity(user(), WORKLOAD), peer(), VERIFIED, TENANTS)
    assert [who.value_of(s) for s in ("subject", "workload", "certificate", "token", "device", "tenant", "planet")] == [
        f"{ISS}|alice", SVID, "ab" * 32, "j-1", "dev-1", "acme", None,
    ]  # fmt: skip
    assert WORKER.value_of("subject") == SVID
