"""Hostile values in tokens, posture assertions, methods and queries: a precise refusal, one record."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import Upstream
from tests.idp import Issuer, unsigned
from tests.support import OpaProcess, client_context, config_doc, get, raw_https, start_serve
from tests.test_authn import SECRET, USER, call, id_pep  # noqa: F401  (the module's PEP fixture)
from tests.test_posture_risk import assertion, pair, query  # noqa: F401

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.observe.sinks import encode


def _records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]


# --- strict claims -----------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "9999999999"},
        {"nbf": "0"},
        {"iat": "1700000000"},
        {"auth_time": "1700000000"},
        {"exp": True},
        {"sub": "\ud800"},
        {"email": "a\udfffb"},
        {"roles": ["reader", "\ud83d"]},
        {"extra": {"\ud800": 1}},
        {"big": 10**30},
    ],
    ids=lambda c: next(iter(c)) + ":" + type(next(iter(c.values()))).__name__,
)
async def test_loosely_typed_claims_are_refused_with_one_record(
    id_pep: PepRuntime,  # noqa: F811
    pki: Path,
    idp: Issuer,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    claims: dict[str, Any],
) -> None:
    before = upstream.count()
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, doc, headers = await call(id_pep, pki, USER, idp.token(**claims))
    assert (status, doc["code"]) == (401, "authn.malformed")
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    [record] = _records(caplog, headers["X-Request-Id"])
    assert record["result"]["code"] == "authn.malformed"
    assert upstream.count() == before


async def test_a_lone_surrogate_in_the_header_of_a_token_is_refused(
    id_pep: PepRuntime,  # noqa: F811
    pki: Path,
    idp: Issuer,
) -> None:
    token = unsigned({"alg": "RS256", "kid": "\ud800", "typ": "at+jwt"}, idp.claims())
    status, doc, _ = await call(id_pep, pki, USER, token)
    assert (status, doc["code"]) == (401, "authn.malformed")


async def test_numeric_dates_as_numbers_still_pass(id_pep: PepRuntime, pki: Path, idp: Issuer) -> None:  # noqa: F811
    import time

    now = time.time()
    token = idp.token(exp=now + 300.5, iat=now - 1.25, nbf=int(now) - 5, auth_time=int(now) - 60)
    assert (await call(id_pep, pki, USER, token))[0] == 200


@pytest.mark.parametrize("over", [{"iat": "now"}, {"exp": "9999999999"}, {"device_id": "\ud800"}])
async def test_loosely_typed_posture_assertions_are_not_verified(
    pair: tuple[PepRuntime, PepRuntime],  # noqa: F811
    pki: Path,
    idp: Issuer,
    devices: Issuer,
    caplog: pytest.LogCaptureFixture,
    over: dict[str, Any],
) -> None:
    a, _ = pair
    token = idp.token(sub="alice", roles=["pii-analyst"])
    status, record = await query(a, pki, token, assertion(devices, **over), caplog)
    assert record["input"]["device"] == {"verified": False, "reason": "invalid"}
    assert status == 403  # the pii class needs a verified device


# --- audit records ---------------------------------------------------------------


def test_a_record_with_values_json_cannot_carry_is_written_escaped() -> None:
    record = {"request_id": "r1", "subject": "a\ud800b", "input": {1: "x", "n": 10**30}}
    line, escaped, truncated = encode(record, 16_384)
    doc = json.loads(line)
    assert (escaped, truncated) == (True, False)
    assert doc["subject"] == "a\\ud800b" and doc["escaped"] is True
    assert doc["input"] == {"1": "x", "n": str(10**30)}


def test_an_oversized_record_is_cut_and_marked() -> None:
    record = {
        "request_id": "r2",
        "status": 400,
        "input": {"request": {"query": {f"k{i}": ["v" * 900] for i in range(200)}}},
    }
    line, escaped, truncated = encode(record, 4096)
    doc = json.loads(line)
    assert truncated and not escaped
    assert len(line) <= 4096
    assert doc["request_id"] == "r2" and doc["status"] == 400
    assert doc["truncated"]["bytes"] > 100_000


async def test_the_file_sink_keeps_the_record_of_a_request_with_a_lone_surrogate(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    from tests.test_authn import ID_ROUTES, identity_config

    from vvault_pep.config import Config

    log = tmp_path / "audit.jsonl"
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=ID_ROUTES,
        identity=identity_config(idp),
        audit={"sinks": [{"type": "file", "path": str(log)}], "max_record_bytes": 8192},
    )
    pep = PepRuntime(Config.model_validate(doc))
    await pep.start()
    try:
        ids = []
        for token in (idp.token(sub="\ud800"), idp.token()):
            ids.append((await call(pep, pki, USER, token))[2]["X-Request-Id"])
        # A request the PEP allows, carrying a query just under the parameter limit.
        amp = get(SECRET + "?" + "&".join(f"a{i}=" + "x" * 100 for i in range(63)), host=USER)
        amp = amp.replace(b"Connection: close", f"Authorization: Bearer {idp.token()}\r\nConnection: close".encode())
        resp = await raw_https(pep.port, client_context(pki, "reader"), amp)
        ids.append(resp.headers["x-request-id"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline:
            lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            if len(lines) >= 3:
                break
            await asyncio.sleep(0.05)
        assert [r["request_id"] for r in lines] == ids
        assert lines[0]["result"]["code"] == "authn.malformed"
        big = log.read_text().splitlines()[2]
        assert len(big) <= 8192
        print(f"amplification: request {len(amp)} B -> record {len(big)} B = {len(big) / len(amp):.2f}x")
    finally:
        await pep.stop()


# --- methods, query parameters and the HTTP parser -----------------------------------


@pytest.mark.parametrize("request_line", [b"get / HTTP/1.1", b"Get /v1/x HTTP/1.1"])
async def test_a_lower_case_method_is_400(pep: PepRuntime, pki: Path, upstream: Upstream, request_line: bytes) -> None:
    before = upstream.count()
    resp = await raw_https(
        pep.port, client_context(pki, "reader"), request_line + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 400
    assert json.loads(resp.body)["code"] == "sanitize.malformed"
    assert upstream.count() == before


async def test_too_many_query_parameters_is_400(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    before = upstream.count()
    resp = await raw_https(pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/blobs/x?" + "a&" * 64 + "a"))
    assert resp.status == 400
    assert json.loads(resp.body)["code"] == "sanitize.bad_query"
    assert upstream.count() == before
    ok = await raw_https(pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/blobs/x?" + "&".join("a" * 64)))
    assert ok.status != 400 and upstream.count() == before + 1  # 64 parameters: forwarded


async def test_serve_refuses_the_pure_python_parser(
    pki: Path, opa: OpaProcess, upstream: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(config_doc(pki, opa_url=opa.url, upstream_port=upstream.port)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(path),
        env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    [line] = err.decode().splitlines()
    assert "C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS is set)" in line
    assert "--allow-python-http-parser" in line


async def test_with_the_override_the_python_parser_still_refuses_lower_case_methods(
    pki: Path, opa: OpaProcess, upstream: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(config_doc(pki, opa_url=opa.url, upstream_port=upstream.port)))
    served = await start_serve(path, extra=("--allow-python-http-parser",), env={"AIOHTTP_NO_EXTENSIONS": "1"})
    try:
        before = upstream.count()
        ctx = client_context(pki, "reader")
        resp = await raw_https(
            served.port, ctx, b"get /v1/tenants/acme/blobs/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert resp.status == 400
        assert json.loads(resp.body)["code"] == "sanitize.malformed"
        assert upstream.count() == before
        assert (await raw_https(served.port, ctx, get("/v1/tenants/acme/blobs/x"))).status != 400
        assert upstream.count() == before + 1
    finally:
        served.proc.terminate()
        await served.proc.wait()


async def test_audit_amplification_is_bounded(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    """Record bytes per request byte for the shapes that used to blow records up.

    ``pytest tests/test_input_hardening.py -k amplification -s`` prints the table.
    """
    from tests.test_authn import ID_ROUTES, identity_config

    from vvault_pep.config import Config

    log = tmp_path / "audit.jsonl"
    doc = config_doc(
        pki, opa_url=opa.url, upstream_port=upstream.port, routes=ID_ROUTES, identity=identity_config(idp),
        audit={"sinks": [{"type": "file", "path": str(log)}]},
    )  # fmt: skip
    pep = PepRuntime(Config.model_validate(doc))
    await pep.start()
    auth = f"Authorization: Bearer {idp.token()}"
    shapes = {
        "minimal, no token": get(SECRET, host=USER),
        "token only": get(SECRET, auth, host=USER),
        "63 x '?a&a'": get(SECRET + "?" + "&".join("a" * 63), auth, host=USER),
        "63 distinct keys": get(SECRET + "?" + "&".join(f"k{i}" for i in range(63)), auth, host=USER),
        "63 long values": get(SECRET + "?" + "&".join(f"k{i}=" + "v" * 120 for i in range(63)), auth, host=USER),
        "65 params (refused)": get(SECRET + "?" + "&".join("a" * 65), auth, host=USER),
        "long path": get(SECRET + "/" + "p" * 7000, auth, host=USER),
        "90 headers": get(SECRET, auth, *(f"X-H{i}: {'h' * 60}" for i in range(90)), host=USER),
        "policy headers": get(SECRET, auth, *(f"Accept: {'a' * 7000}",), host=USER),
        "lone surrogate sub": get(SECRET, f"Authorization: Bearer {idp.token(sub=chr(0xD800))}", host=USER),
    }
    cap = pep.config.audit.max_record_bytes
    try:
        for request in shapes.values():
            await raw_https(pep.port, client_context(pki, "reader"), request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline and (not log.exists() or len(log.read_bytes().splitlines()) < len(shapes)):
            await asyncio.sleep(0.05)
        records = log.read_bytes().splitlines()
        assert len(records) == len(shapes)  # one record each, none lost
        print(f"\n{'request':<22}{'request B':>10}{'record B':>10}{'ratio':>8}")
        for (name, request), record in zip(shapes.items(), records, strict=True):
            print(f"{name:<22}{len(request):>10}{len(record):>10}{len(record) / len(request):>8.2f}")
            assert len(record) <= cap
            if len(request) >= 4096:
                assert len(record) / len(request) <= 2.0, name
    finally:
        await pep.stop()
