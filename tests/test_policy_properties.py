"""The policy library's invariants, tested like code: generated inputs, judged by the real OPA.

hypothesis draws batches of policy inputs (and JIT grants) from the shapes the PEP builds —
users of two issuers, workloads, anonymous callers, certificates whose CN spells a SPIFFE ID,
identity fields missing or of the wrong type, every route family, device and risk states —
and one OPA call judges a whole batch (a helper rule maps ``data.vvault.authz.decision`` over
it).  Each invariant below is checked against every allow:

* no cross-tenant allow without a matching grant (a live JIT grant of the same issuer and
  subject, or a workload grant of the same kind on a segment prefix);
* pii never without a verified, managed, encrypted device;
* a rotation never without MFA and a recent (not future) sign-in;
* no allow when an identity field the policy names by is missing or mistyped;
* a JIT grant never widens beyond its role, tenant, issuer and expiry.

The budget is bounded (examples × batch size below) so the file stays well under a minute on
a busy machine.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tests.support import POLICIES, OpaProcess, start_opa

NOW_S = 1_795_608_000
NOW_NS = NOW_S * 1_000_000_000
CORP, PARTNER = "https://idp.corp.example", "https://idp.partner.example"
TRUSTED_CA = "CN=vvault demo CA,O=vvault-pep demo"
TENANTS = ("acme", "globex", "initech")
DATA = json.loads((POLICIES / "vvault" / "roles" / "data.json").read_text())
ROLES = tuple(DATA)
WORKLOADS = json.loads((POLICIES / "vvault" / "workloads" / "data.json").read_text())
CLASSES = json.loads((POLICIES / "vvault" / "classes" / "data.json").read_text())
CONTROL = json.loads((POLICIES / "vvault" / "control" / "data.json").read_text())
BATCH = 40
EXAMPLES = 20

BATCH_POLICY = """package proptest

results := [d |
	some item in input.items
	d := data.vvault.authz.decision with input as item.input with data.vvault.grants as item.grants
]
"""


@pytest.fixture(scope="module")
def prop_opa() -> Iterator[OpaProcess]:
    proc = start_opa(paths=(POLICIES,))
    req = urllib.request.Request(
        f"{proc.url}/v1/policies/proptest",
        data=BATCH_POLICY.encode(),
        method="PUT",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    yield proc
    proc.stop()


def judge(opa: OpaProcess, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    body = json.dumps({"input": {"items": items}}).encode()
    req = urllib.request.Request(
        f"{opa.url}/v1/data/proptest/results", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        results: list[dict[str, Any]] = json.loads(resp.read())["result"]
    assert len(results) == len(items)
    return results


# ------------------------------------------------------------------ strategies

tenant = st.sampled_from(TENANTS)
odd = st.one_of(st.none(), st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=1))
segment = st.sampled_from(["pii", "ssn", "tokens", "api", "docs", "docs-hr", "docs-signing-key", "public", "readme"])


@st.composite
def request(draw: st.DrawFn) -> dict[str, Any]:
    family = draw(st.sampled_from(["secrets", "rotations", "query", "vectors", "collections", "admin"]))
    t = draw(tenant)
    if family in ("secrets", "rotations"):
        method = draw(st.sampled_from(["GET", "PUT", "DELETE"])) if family == "secrets" else "POST"
        segs = ["v1", "tenants", t, family, *draw(st.lists(segment, min_size=1, max_size=3))]
    elif family in ("query", "vectors"):
        method = "POST"
        segs = [
            "v1",
            "tenants",
            t,
            "collections",
            draw(st.sampled_from(["docs", "docs-hr", "customers", "audit"])),
            family,
        ]
    elif family == "collections":
        method = "GET"
        segs = ["v1", "tenants", t, "collections", *draw(st.lists(st.sampled_from(["docs", "customers"]), max_size=1))]
    else:
        method = draw(st.sampled_from(["GET", "POST"]))
        segs = ["v1", "admin", "tenants"]
    return {"method": method, "segments": segs}


def valid_or(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a well-formed value; one time in ten missing ("$drop", removed later) or mistyped."""
    return st.integers(0, 19).flatmap(lambda i: value if i < 18 else st.just("$drop") if i == 18 else odd)


def mostly(value: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``value`` three times in four, else something drawn from ``other``."""
    return st.integers(0, 3).flatmap(lambda i: st.just(value) if i < 3 else other)


@st.composite
def identity(draw: st.DrawFn, home: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["user", "user", "workload", "anonymous"]))
    if kind == "anonymous":
        return {"authenticated": False, "kind": "anonymous"}
    if kind == "workload":
        sid = draw(valid_or(st.sampled_from(sorted(WORKLOADS))))
        return {"authenticated": True, "kind": "workload", "subject": sid, "workload": {"spiffe_id": sid}}
    doc = {
        "authenticated": True,
        "kind": draw(st.sampled_from(["user", "user+workload"])),
        "subject": draw(valid_or(st.sampled_from(["kim", "alice"]))),
        "issuer": draw(valid_or(st.sampled_from([CORP, PARTNER]))),
        "tenant": draw(valid_or(mostly(home, tenant))),
        "roles": draw(valid_or(st.lists(st.sampled_from(ROLES), max_size=2, unique=True))),
        "amr": draw(valid_or(mostly(["pwd", "mfa"], st.lists(st.sampled_from(["pwd", "mfa", "otp"]), max_size=2)))),
        "auth_time": draw(
            valid_or(mostly(NOW_S - 60, st.sampled_from([NOW_S - 7200, NOW_S - 1000, NOW_S + 10, NOW_S + 3600])))
        ),
    }
    return {k: v for k, v in doc.items() if v != "$drop"}


@st.composite
def client_cert(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    sid = draw(st.one_of(st.none(), st.sampled_from(sorted(WORKLOADS))))
    cn = draw(st.one_of(st.sampled_from(sorted(WORKLOADS)), st.just("demo-reader")))  # a CN may spell a SPIFFE ID
    sans = [sid] if sid is not None and draw(st.booleans()) else draw(st.sampled_from([[], ["https://x"]]))
    return {
        "issuer": draw(st.sampled_from([TRUSTED_CA, "CN=evil"])),
        "spiffe_id": sid,
        "uri_sans": sans,
        "common_name": cn,
        "subject": f"CN={cn}",
        "sha256": "00",
    }


@st.composite
def grants(draw: st.DrawFn, home: str) -> dict[str, Any]:
    out = {}
    for i in range(draw(st.integers(0, 3))):
        grant = {
            "subject": draw(st.sampled_from(["kim", "alice"])),
            "issuer": draw(valid_or(st.sampled_from([CORP, PARTNER]))),
            "role": draw(st.sampled_from([*ROLES, "no-such-role"])),
            "tenant": draw(mostly(home, tenant)),
            "not_after": draw(st.sampled_from(["2026-11-25T11:00:00Z", "2026-11-25T13:00:00Z"])),
            "ticket": f"T{i}",
        }
        out[f"T{i}"] = {k: v for k, v in grant.items() if v != "$drop"}
    return out


@st.composite
def item(draw: st.DrawFn) -> dict[str, Any]:
    req = draw(request())
    home = req["segments"][2] if req["segments"][1] == "tenants" else "acme"
    doc = {
        "request": req,
        "identity": draw(identity(home)),
        "tls": {"client_cert": draw(client_cert())},
        "device": {
            "verified": draw(mostly(True, st.booleans())),
            "managed": draw(mostly(True, st.booleans())),
            "disk_encrypted": draw(mostly(True, st.booleans())),
            "patch_age_days": draw(mostly(3, st.sampled_from([29, 31, 200]))),
        },
        "risk": draw(
            mostly(
                {"available": True, "score": 0},
                st.one_of(
                    st.just({"available": False, "score": None}),
                    st.builds(lambda s: {"available": True, "score": s}, st.integers(0, 100)),
                ),
            )
        ),
        "time": {"unix_ns": NOW_NS},
    }
    return {"input": doc, "grants": draw(grants(home))}


batches = st.lists(item(), min_size=BATCH, max_size=BATCH)
# No shrinking: each OPA call judges a whole batch, and shrinking a 40-item batch would cost
# hundreds of calls; every assertion carries the offending item instead.
budget = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# ------------------------------------------------------------------ the oracle's small facts


def why(it: dict[str, Any]) -> str:
    """The offending item in full (pytest would shorten a dict), ready to paste into an opa test."""
    return json.dumps(it, sort_keys=True)


def path_tenant(doc: dict[str, Any]) -> str | None:
    segs = doc["request"]["segments"]
    return segs[2] if segs[:2] == ["v1", "tenants"] else None


def live(grant: dict[str, Any]) -> bool:
    return grant["not_after"] > "2026-11-25T12:00:00Z" and grant.get("role") in DATA


def user_grants(doc: dict[str, Any], granted: dict[str, Any], t: str | None) -> list[dict[str, Any]]:
    ident = doc["identity"]
    return [
        g
        for g in granted.values()
        if live(g)
        and g.get("issuer") == ident.get("issuer")
        and g["subject"] == ident.get("subject")
        and g["tenant"] == t
    ]


def workload_of(doc: dict[str, Any]) -> str | None:
    ident = doc["identity"]
    if ident["kind"] == "workload":
        sid = (ident.get("workload") or {}).get("spiffe_id")
        return sid if isinstance(sid, str) else None
    cert = doc["tls"]["client_cert"]
    if cert and cert["issuer"] == TRUSTED_CA and cert["spiffe_id"] and cert["spiffe_id"] in cert["uri_sans"]:
        return str(cert["spiffe_id"])
    return None


def kind_of(doc: dict[str, Any]) -> str | None:
    segs = doc["request"]["segments"]
    family = segs[3] if len(segs) > 3 and segs[:2] == ["v1", "tenants"] else None
    return {"secrets": "secrets", "rotations": "secrets", "collections": "collections"}.get(family or "")


def resource_of(doc: dict[str, Any]) -> list[str]:
    segs = doc["request"]["segments"]
    return segs[4:] if kind_of(doc) == "secrets" else segs[4:5]


def on_segments(path: str, resource: list[str]) -> bool:
    want = [s for s in path.split("/") if s]
    return bool(want) and resource[: len(want)] == want


def is_user(doc: dict[str, Any]) -> bool:
    return doc["identity"]["kind"] in ("user", "user+workload")


# ------------------------------------------------------------------ invariants


@budget
@given(batch=batches)
def test_no_cross_tenant_allow_without_a_matching_grant(prop_opa: OpaProcess, batch: list[dict[str, Any]]) -> None:
    for it, d in zip(batch, judge(prop_opa, batch), strict=True):
        doc, t = it["input"], path_tenant(it["input"])
        if not d["allow"] or t is None:
            continue
        if is_user(doc):
            assert doc["identity"].get("tenant") == t or user_grants(doc, it["grants"], t), why(it)
        else:
            sid = workload_of(doc)
            assert sid is not None, why(it)
            w = WORKLOADS[sid]
            assert t in w["tenants"] or any(
                g["tenant"] == t
                and g["kind"] == kind_of(doc)
                and any(on_segments(p, resource_of(doc)) for p in g["paths"])
                for g in w.get("grants", [])
            ), why(it)


@budget
@given(batch=batches)
def test_pii_never_without_a_verified_device(prop_opa: OpaProcess, batch: list[dict[str, Any]]) -> None:
    for it, d in zip(batch, judge(prop_opa, batch), strict=True):
        if d["allow"] and d["upstream_headers"]["X-Vvault-Data-Class"] == "pii":
            device = it["input"]["device"]
            assert device["verified"] and device["managed"] and device["disk_encrypted"], why(it)
            assert device["patch_age_days"] <= 30, why(it)


@budget
@given(batch=batches)
def test_rotate_never_without_mfa_and_recent_auth(prop_opa: OpaProcess, batch: list[dict[str, Any]]) -> None:
    for it, d in zip(batch, judge(prop_opa, batch), strict=True):
        segs = it["input"]["request"]["segments"]
        if not d["allow"] or len(segs) < 4 or segs[3] != "rotations":
            continue
        ident = it["input"]["identity"]
        amr = ident.get("amr")
        assert isinstance(amr, list) and set(amr) & set(CONTROL["mfa_methods"]), why(it)
        auth_time = ident.get("auth_time")
        assert isinstance(auth_time, int), why(it)
        assert -CONTROL["max_clock_skew_s"] <= NOW_S - auth_time <= CONTROL["max_auth_age_s"], why(it)


@budget
@given(batch=batches)
def test_no_allow_when_identity_fields_are_missing_or_mistyped(
    prop_opa: OpaProcess, batch: list[dict[str, Any]]
) -> None:
    for it, d in zip(batch, judge(prop_opa, batch), strict=True):
        if not d["allow"]:
            continue
        doc = it["input"]
        if is_user(doc):
            ident = doc["identity"]
            assert isinstance(ident.get("subject"), str) and isinstance(ident.get("issuer"), str), why(it)
            assert d["upstream_headers"]["X-Vvault-Client"] == ident["subject"], why(it)
        else:
            sid = workload_of(doc)
            assert sid is not None and sid in WORKLOADS, why(it)  # never a CN, never an unvalidated ID
            assert d["upstream_headers"]["X-Vvault-Client"] == sid, why(it)


@budget
@given(batch=batches)
def test_a_grant_never_widens_beyond_its_role_tenant_issuer_or_expiry(
    prop_opa: OpaProcess, batch: list[dict[str, Any]]
) -> None:
    ops = {"GET": "read", "PUT": "write", "DELETE": "delete", "POST": None}
    for it, d in zip(batch, judge(prop_opa, batch), strict=True):
        doc = it["input"]
        t = path_tenant(doc)
        if not d["allow"] or not is_user(doc) or t is None:
            continue
        ident = doc["identity"]
        own = ident.get("tenant") == t and isinstance(ident.get("roles"), list)
        roles = set(ident["roles"]) if own else set()
        by_grant = {g["role"] for g in user_grants(doc, it["grants"], t)}
        klass = d["upstream_headers"]["X-Vvault-Data-Class"]
        segs = doc["request"]["segments"]
        op = "rotate" if segs[3] == "rotations" else ops[doc["request"]["method"]]
        if segs[3] == "collections" and doc["request"]["method"] == "POST":
            op = "query" if segs[-1] == "query" else "write"
        if segs[3] == "collections" and doc["request"]["method"] == "GET":
            op = "read"

        def allows(role: str, op: str | None = op, klass: str = klass) -> bool:
            perms = DATA.get(role, {})
            return op in perms.get(klass, []) or op in perms.get("*", [])

        assert any(allows(r) for r in roles | by_grant), why(it)
        if op == "rotate":
            # elevation: a standing admin role here, or a live grant whose own role permits it
            assert roles & set(CONTROL["standing_roles"]) or any(allows(r) for r in by_grant), why(it)
