"""What an OTel collector, Prometheus and an OPA with auth expect: conventions, metrics, /version, OPA auth."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import Upstream
from tests.support import POLICIES, TEST_POLICIES, OpaProcess, client_context, config_doc, free_port, opa_binary

from vvault_pep import __version__
from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.observe.telemetry import Telemetry

SECRET = "/v1/tenants/acme/secrets/db-password"
OPA_TOKEN = "opa-token-" + "k" * 30


@contextlib.asynccontextmanager
async def running(doc: dict[str, Any], spans: InMemorySpanExporter | None = None) -> AsyncIterator[PepRuntime]:
    config = Config.model_validate(doc)
    processors = [SimpleSpanProcessor(spans)] if spans is not None else []
    runtime = PepRuntime(config, telemetry=Telemetry(config.telemetry, span_processors=processors))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def request(
    pep: PepRuntime, pki: Path, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.request(method, f"https://localhost:{pep.port}{path}", headers=headers or {}) as resp:
            await resp.read()
            return resp.status, resp.headers["X-Request-Id"]


async def scrape(pep: PepRuntime) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{pep.admin_port}/metrics") as resp:
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


async def test_server_and_client_spans_follow_the_http_conventions(
    pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    spans = InMemorySpanExporter()
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port)
    async with running(doc, spans) as pep:
        _, ok = await request(pep, pki, "GET", SECRET + "?version=3&api_key=s3cr3t", {"User-Agent": "probe/1.0"})
        _, odd = await request(pep, pki, "PROPFIND", SECRET)
        down_status, down = await request(pep, pki, "GET", "/down/x")
    finished = spans.get_finished_spans()
    servers = {s.attributes["vvault_pep.request_id"]: s for s in finished if s.kind == SpanKind.SERVER}
    server = servers[ok]
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["server.address"] == "localhost"
    assert server.attributes["server.port"] == pep.port
    assert server.attributes["user_agent.original"] == "probe/1.0"
    assert server.attributes["url.scheme"] == "https"
    assert "error.type" not in server.attributes
    client = next(
        s
        for s in finished
        if s.name == "upstream" and s.parent is not None and s.parent.span_id == server.context.span_id
    )
    assert client.kind == SpanKind.CLIENT
    assert client.attributes["http.request.method"] == "GET"
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == upstream.port
    # query values are redacted in spans as in the audit log (redact.query: mask)
    assert (
        client.attributes["url.full"] == f"http://127.0.0.1:{upstream.port}{SECRET}?version=REDACTED&api_key=REDACTED"
    )
    assert client.attributes["http.response.status_code"] == 200
    # an unknown method is _OTHER, with the original beside it, and the span is named HTTP
    other = servers[odd]
    assert other.attributes["http.request.method"] == "_OTHER"
    assert other.attributes["http.request.method_original"] == "PROPFIND"
    assert other.name.startswith("HTTP")
    # a 5xx names its class of error: the PEP's stable code
    assert down_status == 502
    assert servers[down].attributes["error.type"] == "upstream.unavailable"


async def test_prometheus_exposition_is_clean_and_complete_from_the_start(
    pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port)
    async with running(doc) as pep:
        text, before = await scrape(pep)
        assert "otel_scope" not in text
        assert before[("vvault_pep_build_info", (("python", platform.python_version()), ("version", __version__)))] == 1
        assert before[("process_cpu_seconds_total", ())] >= 0
        assert before[("process_resident_memory_bytes", ())] > 0
        # error series exist at 0 before any error, so rate() and alerts work from the first scrape
        for code in ("pdp.error", "pdp.timeout", "pdp.unavailable"):
            assert before[("vvault_pep_pdp_errors_total", (("code", code),))] == 0
        for result, layer in (("hit", "l1"), ("hit", "l2"), ("miss", "opa"), ("bypass", "opa")):
            assert before[("vvault_pep_cache_lookups_total", (("layer", layer), ("result", result)))] == 0
        assert before[("vvault_pep_audit_dropped_total", (("sink", "stdout-0"),))] == 0
        status, _ = await request(pep, pki, "GET", SECRET)
        assert status == 200
        _, after = await scrape(pep)
    labels = (
        ("http_request_method", "GET"),
        ("http_response_status_code", "200"),
        ("http_route", "/v1/tenants/{tenant}/secrets/{path*}"),
        ("url_scheme", "https"),
    )
    assert after[("http_server_request_duration_seconds_count", labels)] == 1
    assert after[("http_server_request_duration_seconds_bucket", tuple(sorted((*labels, ("le", "10.0")))))] == 1
    assert after[("vvault_pep_cache_lookups_total", (("layer", "opa"), ("result", "bypass")))] == 1


async def test_version_endpoint_names_the_pep_and_its_opa(pki: Path, opa: OpaProcess, upstream: Upstream) -> None:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port)
    async with running(doc) as pep:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{pep.admin_port}/version") as resp:
                assert resp.status == 200
                body = await resp.json()
    assert body["version"] == __version__
    assert body["input_schema"] == "vvault-pep/input/v1"
    assert body["opa"] == "1.22.3"


async def test_the_revision_check_does_not_download_every_policy_source(
    pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, cache=True)
    doc["cache"] = {"revision_check_s": 0.02}
    async with running(doc) as pep:
        assert pep.pdp is not None
        async with asyncio.timeout(20):
            while pep.pdp.revision_checks < 20:
                await asyncio.sleep(0.02)
        # once at start; then the one-line provenance probe only (policy_check_s: 30 by default)
        assert pep.pdp.module_downloads == 1


# ---------------------------------------------------------------- OPA with auth and TLS

AUTHZ = f"""package system.authz

default allow := false

allow if input.identity == "{OPA_TOKEN}"
"""


@contextlib.contextmanager
def opa_with(tmp_path: Path, *args: str, scheme: str = "http", ca: Path | None = None) -> Any:
    (tmp_path / "authz.rego").write_text(AUTHZ)
    port = free_port()
    proc = subprocess.Popen(
        [
            opa_binary(),
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{port}",
            "--skip-version-check",
            "--log-level",
            "error",
            *args,
            str(POLICIES),
            str(TEST_POLICIES),
            str(tmp_path / "authz.rego"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield OpaProcess(proc, f"{scheme}://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_up(url: str, ca: Path | None = None) -> None:
    tls = ssl.create_default_context(cafile=str(ca)) if ca else None
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(20):
            while True:
                try:
                    async with http.get(
                        f"{url}/health", ssl=tls if tls else True, headers={"Authorization": f"Bearer {OPA_TOKEN}"}
                    ) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)


async def test_opa_with_token_authentication(pki: Path, upstream: Upstream, tmp_path: Path) -> None:
    with opa_with(tmp_path, "--authentication=token", "--authorization=basic") as opa:
        await wait_up(opa.url)
        good = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, opa={"token": OPA_TOKEN})
        async with running(good) as pep:
            status, _ = await request(pep, pki, "GET", SECRET)
            assert status == 200
            _, checks = await pep.readiness()  # health and policy listing pass OPA's authz too
            assert checks["opa"] is True and checks["policies"]["vvault/authz/decision"] is True
        # a wrong token: OPA answers 401, the PEP fails closed
        bad = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, opa={"token": "wrong-" + "x" * 30})
        async with running(bad) as pep:
            status, _ = await request(pep, pki, "GET", SECRET)
            assert status == 503
            assert (await pep.readiness())[1]["opa"] is False


async def test_https_opa_is_verified_against_the_configured_ca(pki: Path, upstream: Upstream, tmp_path: Path) -> None:
    tls = ("--tls-cert-file", str(pki / "server.pem"), "--tls-private-key-file", str(pki / "server-key.pem"))
    with opa_with(tmp_path, *tls, scheme="https") as opa:
        await wait_up(opa.url, ca=pki / "ca.pem")
        trusted = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, opa={"ca_file": str(pki / "ca.pem")})
        async with running(trusted) as pep:
            assert (await request(pep, pki, "GET", SECRET))[0] == 200
        # the system CAs do not know the demo CA: no decision, 503
        unknown = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port)
        async with running(unknown) as pep:
            assert (await request(pep, pki, "GET", SECRET))[0] == 503


def test_an_opa_token_never_travels_in_clear_text_off_the_machine() -> None:
    from vvault_pep.config import Opa

    with pytest.raises(ValueError, match="token"):
        Opa.model_validate({"url": "http://opa.internal:8181", "token": OPA_TOKEN})
    assert Opa.model_validate({"url": "http://127.0.0.1:8181", "token": OPA_TOKEN}).token == OPA_TOKEN
    assert OPA_TOKEN not in repr(Opa.model_validate({"url": "https://opa.internal", "token": OPA_TOKEN}))
