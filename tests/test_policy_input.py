"""policy_input: the v1 contract — schema, examples and what the PEP really builds."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import jsonschema
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.support import ROOT, OpaProcess

from vvault_pep.config import Limits, Route, Sanitize
from vvault_pep.core.policy_input import Facts, build_input
from vvault_pep.core.request import Connection, parse_peer
from vvault_pep.core.routing import RouteTable
from vvault_pep.core.sanitize import canonical_target, check_headers

SCHEMA = json.loads((ROOT / "docs" / "policy-input.v1.schema.json").read_text())
EXAMPLES = sorted((ROOT / "examples" / "policy-input").glob("*.json"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def test_schema_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_match_the_schema(path: Path) -> None:
    VALIDATOR.validate(json.loads(path.read_text()))


def _facts(pki: Path, raw_target: str, with_cert: bool = True) -> Facts:
    der = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    target = canonical_target(raw_target, Sanitize())
    headers = check_headers(
        [
            (b"Host", b"vvault.example:8443"),
            (b"Accept", b"application/json"),
            (b"Authorization", b"Bearer x"),
            (b"Cookie", b"s=1"),
        ],
        Sanitize(),
        Limits(),
    )
    table = RouteTable(
        (
            Route(
                name="secrets",
                path="/v1/tenants/{tenant}/secrets/{path*}",
                upstream="u",
                policy="vvault/authz/decision",
            ),
        )
    )
    return Facts(
        request_id="0" * 32,
        method="GET",
        http_version="HTTP/1.1",
        target=target,
        headers=headers,
        source_ip="127.0.0.1",
        source_port=50000,
        connection=Connection("TLSv1.3", "TLS_AES_128_GCM_SHA256", "http/1.1", parse_peer(der) if with_cert else None),
        match=table.match(headers.host, "GET", target.segments, target.trailing_slash),
        now=dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC),
    )


@pytest.mark.parametrize("with_cert", [True, False])
def test_built_input_matches_the_schema(pki: Path, with_cert: bool) -> None:
    doc = build_input(
        _facts(pki, "/v1/tenants/acme/secrets/a/../db%2Dpassword?x=1&x=2", with_cert), pep_version="0.1.0"
    )
    VALIDATOR.validate(orjson.loads(orjson.dumps(doc)))
    assert doc["request"]["path"] == "/v1/tenants/acme/secrets/db-password"
    assert doc["request"]["query"] == {"x": ["1", "2"]}
    assert doc["route"]["params"] == {"tenant": "acme", "path": "db-password"}
    # secrets never reach the policy input unless allow-listed
    assert "authorization" not in doc["request"]["headers"]
    assert "cookie" not in doc["request"]["headers"]


def test_identity_block_matches_the_schema(pki: Path) -> None:
    import dataclasses

    from vvault_pep.core.principal import Identity, UserToken, Workload

    user = UserToken(
        issuer="https://idp.example.com",
        subject="alice",
        tenant="acme",
        roles=("reader",),
        groups=(),
        scopes=("secrets:read",),
        amr=("mfa",),
        acr=None,
        auth_time=1,
        client_id="cli",
        token_id="j1",
        expires_at=2,
        cnf_x5t_s256=None,
        claims={"email": "a@example.com"},
    )
    for identity in (
        Identity(user, None),
        Identity(None, Workload("spiffe://demo.vvault/w", "demo.vvault", "/w")),
        Identity(user, Workload("spiffe://demo.vvault/w", "demo.vvault", "/w"), cert_bound=True),
    ):
        facts = dataclasses.replace(_facts(pki, "/v1/tenants/acme/secrets/x"), identity=identity)
        doc = build_input(facts, pep_version="0.1.0")
        VALIDATOR.validate(orjson.loads(orjson.dumps(doc)))
        assert doc["identity"]["kind"] == identity.kind


@pytest.mark.parametrize(
    ("name", "allow", "code"),
    [("read-secret.json", True, "policy.allowed"), ("query-collection-no-cert.json", False, "policy.no_client_cert")],
)
async def test_examples_drive_the_starter_policy(opa: OpaProcess, name: str, allow: bool, code: str) -> None:
    import aiohttp

    doc = json.loads((ROOT / "examples" / "policy-input" / name).read_text())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{opa.url}/v1/data/vvault/authz/decision", json={"input": doc}) as resp:
            result = (await resp.json())["result"]
    assert result["allow"] is allow
    assert result["code"] == code or code in result["reasons"]
