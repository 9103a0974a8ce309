"""The cache key comes from the policy: what `opa deps` says it reads, shipped with the bundle.

Real OPA (loading the signed bundle `make bundle` builds), real PEP, real mTLS: a request
that differs only in what the policy never reads is answered from the same entry; one that
differs in a path the policy reads is not; a hand-written key that leaves out such a path is
refused, naming it; a policy that reads the clock is stored only as long as it says.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from deploy.compose_kit import bundle
from tests.conftest import Upstream
from tests.support import POLICIES, OpaProcess, _wait_healthy, client_context, config_doc, free_port, opa_binary

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.decide import deps

SHIPPED = [
    "device.disk_encrypted",
    "device.managed",
    "device.patch_age_days",
    "device.verified",
    "identity.amr",
    "identity.auth_time",
    "identity.issuer",
    "identity.kind",
    "identity.roles",
    "identity.subject",
    "identity.tenant",
    "identity.workload",
    "request.body",
    "request.body_truncated",
    "request.method",
    "request.segments",
    "risk.available",
    "risk.score",
    "time.unix_ns",
    "tls.client_cert",
]

SECRETS = {
    "name": "secrets",
    "path": "/v1/tenants/{tenant}/secrets/{path*}",
    "methods": ["GET"],
    "upstream": "vvault",
    "policy": "vvault/authz/decision",
    "authn": {"require": "workload"},
}


def test_opa_deps_names_exactly_what_the_library_reads() -> None:
    found = deps.compute(opa_binary(), POLICIES, ["vvault/authz/decision"])
    assert found == {"vvault/authz/decision": SHIPPED}


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["identity.subject", "identity", "time.unix_ns"], ("identity", "time.unix_ns")),
        (["identity.sub", "identity.subject"], ("identity.sub", "identity.subject")),
        ([], ()),
    ],
)
def test_covered_paths_are_dropped(paths: list[str], expected: tuple[str, ...]) -> None:
    assert deps.minimal(paths) == expected


def test_a_ref_with_a_variable_keeps_its_prefix() -> None:
    ref = [{"type": "var", "value": "input"}, {"type": "string", "value": "request"}, {"type": "var", "value": "x"}]
    whole = [{"type": "var", "value": "input"}]
    assert deps.input_paths({"base": [ref]}) == ("request",)
    assert deps.input_paths({"base": [whole]}) == ("",)


@pytest.fixture(scope="module")
def bundle_opa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpaProcess, Path]]:
    out = tmp_path_factory.mktemp("bundle")
    target = bundle(out_dir=out, env_file=None, revision="rev-keys")
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            opa_binary(),
            "run",
            "--server",
            "--addr",
            listen,
            "--skip-version-check",
            "--log-level",
            "error",
            "--bundle",
            "--verification-key",
            str(out / "bundle-signer.pub.pem"),
            "--signing-alg",
            "ES256",
            str(target),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    if not _wait_healthy(proc, f"http://{listen}"):
        proc.kill()
        raise RuntimeError("OPA did not start with the bundle")
    opa = OpaProcess(proc, f"http://{listen}")
    yield opa, target
    opa.stop()


def test_the_bundle_carries_its_input_paths_tied_to_its_revision(bundle_opa: tuple[OpaProcess, Path]) -> None:
    _, target = bundle_opa
    with tarfile.open(target, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/data.json"))
        data = json.load(io.BytesIO(tar.extractfile(member).read()))  # type: ignore[union-attr]
    assert data["vvault_pep"]["input_paths"] == {"revision": "rev-keys", "paths": {"vvault/authz/decision": SHIPPED}}


async def _pep(doc: dict[str, Any]) -> PepRuntime:
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    return runtime


def _doc(pki: Path, opa_url: str, upstream: Upstream, routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc = config_doc(
        pki,
        opa_url=opa_url,
        upstream_port=upstream.port,
        routes=routes,
        cache=True,
        identity={"workload": {"trust_domains": ["demo.vvault"]}},
        **extra,
    )
    doc["cache"] = {"debug_headers": True}
    return doc


@pytest.fixture
async def bundle_pep(pki: Path, bundle_opa: tuple[OpaProcess, Path], upstream: Upstream) -> AsyncIterator[PepRuntime]:
    runtime = await _pep(_doc(pki, bundle_opa[0].url, upstream, [SECRETS]))
    yield runtime
    await runtime.stop()


async def layer(pep: PepRuntime, pki: Path, path: str, **headers: str) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"https://localhost:{pep.port}{path}", headers=headers) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Decision-Cache", "")


async def test_the_default_key_is_exactly_what_the_policy_reads(bundle_pep: PepRuntime, pki: Path) -> None:
    secret = "/v1/tenants/acme/secrets/db-password"
    assert await layer(bundle_pep, pki, secret, **{"User-Agent": "curl/8"}) == (200, "miss")
    # Only what the policy never reads differs: the same entry answers.
    assert await layer(bundle_pep, pki, secret, **{"User-Agent": "evil/1"}) == (200, "l1")
    assert await layer(bundle_pep, pki, secret + "?x=1", **{"User-Agent": "a"}) == (200, "l1")
    # request.segments is read: another path is another question.
    assert (await layer(bundle_pep, pki, "/v1/tenants/acme/secrets/keys-test/other"))[1] == "miss"


async def test_a_key_that_omits_a_read_path_is_not_used_under_that_bundle(
    pki: Path, bundle_opa: tuple[OpaProcess, Path], upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    route = {**SECRETS, "cache": {"key": ["identity.workload", "request.segments"]}}
    runtime = await _pep(_doc(pki, bundle_opa[0].url, upstream, [route]))
    try:
        secret = "/v1/tenants/acme/secrets/db-password"
        assert await layer(runtime, pki, secret) == (200, "bypass")
        assert await layer(runtime, pki, secret) == (200, "bypass")
    finally:
        await runtime.stop()
    assert any("routes[0] (secrets).cache.key omits input.device.disk_encrypted" in r.message for r in caplog.records)


async def test_a_managed_opa_refuses_a_key_that_omits_a_read_path(pki: Path, upstream: Upstream) -> None:
    route = {**SECRETS, "cache": {"key": ["identity.workload", "tls.client_cert", "device", "risk", "identity"]}}
    managed = {
        "managed": True,
        "binary": opa_binary(),
        "policy_dir": str(POLICIES),
        "url": f"http://127.0.0.1:{free_port()}",
    }
    runtime = PepRuntime(Config.model_validate(_doc(pki, "http://127.0.0.1:1", upstream, [route], opa=managed)))
    with pytest.raises(RuntimeError, match=r"routes\[0\] \(secrets\)\.cache\.key omits input\.request\.method"):
        await runtime.start()
    await runtime.stop()


CLOCK_POLICY = """package clock

decision := {"allow": true, "reason": sprintf("%d", [input.time.unix_ns])} if input.request.method

plain := {"allow": true} if input.request.method

stated := {"allow": true, "cache": {"ttl_s": 30}} if input.time.unix_ns > 0
"""


async def test_a_policy_that_reads_the_clock_is_stored_only_as_long_as_it_says(
    tmp_path: Path, pki: Path, upstream: Upstream
) -> None:
    (tmp_path / "clock.rego").write_text(CLOCK_POLICY)
    routes = [
        {**SECRETS, "name": name, "path": f"/{name}/v1/tenants/{{tenant}}/secrets/{{path*}}", "policy": f"clock/{name}"}
        for name in ("decision", "plain", "stated")
    ]
    managed = {
        "managed": True,
        "binary": opa_binary(),
        "policy_dir": str(tmp_path),
        "url": f"http://127.0.0.1:{free_port()}",
    }
    runtime = await _pep(_doc(pki, "http://127.0.0.1:1", upstream, routes, opa=managed))
    try:
        for name, second in (("decision", "miss"), ("plain", "l1"), ("stated", "l1")):
            path = f"/{name}/v1/tenants/acme/secrets/db-password"
            assert (await layer(runtime, pki, path))[1] == "miss", name
            assert (await layer(runtime, pki, path))[1] == second, name  # the clock, no TTL: never stored
    finally:
        await runtime.stop()
