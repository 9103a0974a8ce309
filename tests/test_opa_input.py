"""OPA is sent only the input the policy reads: the projection on its derived input paths.

The decision must not change (the shipped library's generated inputs, judged whole and
projected by the real OPA), OPA must receive only the read fields (a loopback relay in front
of the real OPA records what arrives), and where the paths are unknown — or the route opts
out with ``opa_input: full`` — the whole input goes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from tests.support import POLICIES, OpaProcess, opa_binary, start_opa
from tests.test_policy_cache_key import SECRETS, SHIPPED, _doc, _pep, bundle_opa, layer
from tests.test_policy_properties import batches, budget, judge, prop_opa

from vvault_pep.decide import deps

__all__ = ["bundle_opa", "prop_opa"]  # fixtures, used by name below

DECISION = "vvault/authz/decision"
SECRET = "/v1/tenants/acme/secrets/db-password"


def test_a_projection_keeps_exactly_the_read_paths_and_the_version() -> None:
    doc = {
        "version": {"schema": 1},
        "request": {"method": "GET", "headers": {"cookie": "x"}, "segments": ["v1"]},
        "identity": {"kind": "user", "roles": ["r"], "email": "e"},
        "device": None,
    }
    got = deps.projection(doc, ("request.method", "request.segments", "identity.roles", "device.managed", "risk"))
    assert got == {
        "version": {"schema": 1},
        "request": {"method": "GET", "segments": ["v1"]},
        "identity": {"roles": ["r"]},
    }
    assert deps.projection(doc, ("",)) is None  # the whole input is read: nothing to leave out


@pytest.fixture(scope="module")
def shipped_paths() -> tuple[str, ...]:
    return tuple(deps.compute(opa_binary(), POLICIES, [DECISION])[DECISION])


@given(items=batches)
@budget
def test_the_decision_is_the_same_for_the_projected_and_the_whole_input(
    prop_opa: OpaProcess, shipped_paths: tuple[str, ...], items: list[dict[str, Any]]
) -> None:
    assert list(shipped_paths) == SHIPPED
    whole = judge(prop_opa, items)
    cut = [{**it, "input": deps.projection(it["input"], shipped_paths)} for it in items]
    assert judge(prop_opa, cut) == whole, "a projection changed a decision"


class Relay:
    """A loopback stand-in in front of the real OPA: forwards everything, keeps the inputs."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.inputs: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "POST" and request.path == f"/v1/data/{DECISION}":
            self.inputs.append(json.loads(body)["input"])
        async with aiohttp.ClientSession() as http:
            async with http.request(
                request.method,
                self.target + request.path_qs,
                data=body or None,
                headers={"Content-Type": "application/json"},
            ) as resp:
                return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")


async def _relay(target: str) -> AsyncIterator[tuple[Relay, str]]:
    relay = Relay(target)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield relay, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _leaves(doc: Any, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict) or not doc:
        return {prefix}
    return set().union(*(_leaves(v, f"{prefix}.{k}" if prefix else k) for k, v in doc.items()))


def _within(leaf: str, paths: list[str]) -> bool:
    return any(deps.covers(p, leaf) for p in paths) or deps.covers("version", leaf)


async def test_opa_receives_only_what_the_policy_reads(
    pki: Path, bundle_opa: tuple[OpaProcess, Path], upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async for relay, url in _relay(bundle_opa[0].url):
        runtime = await _pep(_doc(pki, url, upstream, [SECRETS]))
        try:
            assert await layer(runtime, pki, SECRET) == (200, "miss")
        finally:
            await runtime.stop()
        (sent,) = relay.inputs
        assert sent["version"]["schema"]
        assert all(_within(leaf, SHIPPED) for leaf in _leaves(sent)), sorted(_leaves(sent))
        assert "headers" not in sent["request"] and "query" not in sent["request"]
        assert sent["identity"]["workload"]  # and what it reads is there


async def test_opt_out_and_unknown_paths_send_the_whole_input(
    pki: Path, bundle_opa: tuple[OpaProcess, Path], upstream: Any
) -> None:
    plain = start_opa(paths=(POLICIES,))  # no bundle: nobody derived the paths
    try:
        for target, route in ((bundle_opa[0].url, {**SECRETS, "opa_input": "full"}), (plain.url, SECRETS)):
            async for relay, url in _relay(target):
                runtime = await _pep(_doc(pki, url, upstream, [route]))
                try:
                    assert (await layer(runtime, pki, SECRET))[0] == 200
                finally:
                    await runtime.stop()
                (sent,) = relay.inputs
                assert "headers" in sent["request"] and "query" in sent["request"], route
    finally:
        plain.stop()
