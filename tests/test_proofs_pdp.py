"""The PDP promises of the README fault table, measured.

* "never a retry": an OPA that answers 500 receives exactly one POST for the
  request, and the client gets 503 ``pdp.error``;
* "within the deadline": an OPA that never answers is given up at
  ``opa.timeout_ms`` — not before, and not at some multiple of it; still one POST;
* "503 while the managed OPA is down, restarted with backoff": while the
  managed OPA cannot come back (its port is taken), every request is a 503
  ``pdp.unavailable``, the restarts back off 0.1 → 0.2 → 0.4 s…, and once the
  port is free it is serving again.

The OPA stand-in below is a loopback aiohttp server that counts POSTs: real
OPA cannot be made to answer 500 for one path only or hang on demand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from tests.conftest import Upstream
from tests.support import POLICIES, client_context, free_port, get, make_config, opa_binary, raw_https

from vvault_pep.app.runtime import PepRuntime

DECISION = "faults/plain_true"  # the route /v1/tenants/{tenant}/stream/{n} (open_stream) asks this
PATH = "/v1/tenants/acme/stream/1"
SECRET = "/v1/tenants/acme/secrets/db-password"  # the policy library only (the managed OPA loads policies/)
DEADLINE_MS = 1000
# The deadline is a promise about time: a refusal before it would be a different fault, and
# one well after it (e.g. a retry, or a deadline multiplied) breaks it. 0.9 s of slack
# holds on 2 busy cores; a doubled deadline does not fit in it.
SLACK_S = 0.9


class StandIn:
    """Answers what the PEP asks at start-up like OPA; the decision POSTs as told."""

    def __init__(self) -> None:
        self.mode = "error"
        self.posts: list[float] = []
        self.port = 0
        self._never = asyncio.Event()

    def app(self) -> web.Application:
        async def health(_: web.Request) -> web.Response:
            return web.json_response({})

        async def policies(_: web.Request) -> web.Response:
            return web.json_response({"result": [{"id": "faults.rego", "raw": "package faults", "ast": {}}]})

        async def data(request: web.Request) -> web.Response:
            path = request.match_info["path"]
            if request.method == "POST" and path == DECISION:
                self.posts.append(time.monotonic())
                if self.mode == "hang":
                    await self._never.wait()
                return web.json_response({"code": "internal_error", "message": "boom"}, status=500)
            return web.json_response({"result": {}})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/policies", policies)
        app.router.add_route("*", "/v1/data/{path:.*}", data)
        return app

    def release(self) -> None:
        self._never.set()


@pytest.fixture
async def stand_in(pki: Path, upstream: Upstream) -> AsyncIterator[tuple[StandIn, PepRuntime]]:
    opa = StandIn()
    runner = web.AppRunner(opa.app(), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    opa.port = runner.addresses[0][1]
    config = make_config(
        pki, opa_url=f"http://127.0.0.1:{opa.port}", upstream_port=upstream.port, opa={"timeout_ms": DEADLINE_MS}
    )
    runtime = PepRuntime(config)
    await runtime.start()
    try:
        yield opa, runtime
    finally:
        opa.release()
        await runtime.stop()
        await runner.cleanup()


async def test_an_answered_error_gets_exactly_one_post(
    stand_in: tuple[StandIn, PepRuntime], pki: Path, upstream: Upstream
) -> None:
    opa, pep = stand_in
    resp = await raw_https(pep.port, client_context(pki, "reader"), get(PATH))
    assert (resp.status, orjson.loads(resp.body)["code"]) == (503, "pdp.error")
    assert upstream.seen_with(resp.headers["x-request-id"]) == []
    # the refusal is out; a retry would be in flight by now or already counted
    assert len(opa.posts) == 1


async def test_a_silent_opa_is_given_up_at_the_deadline_once(
    stand_in: tuple[StandIn, PepRuntime], pki: Path, upstream: Upstream
) -> None:
    opa, pep = stand_in
    opa.mode = "hang"
    started = time.monotonic()
    resp = await raw_https(pep.port, client_context(pki, "reader"), get(PATH))
    elapsed = time.monotonic() - started
    assert (resp.status, orjson.loads(resp.body)["code"]) == (503, "pdp.timeout")
    assert upstream.seen_with(resp.headers["x-request-id"]) == []
    assert len(opa.posts) == 1
    # measured from the POST's arrival: the deadline itself, not the TLS handshake before it
    waited = started + elapsed - opa.posts[0]
    assert DEADLINE_MS / 1000 * 0.95 <= waited <= DEADLINE_MS / 1000 + SLACK_S, waited


_RESTARTING = re.compile(r"managed OPA exited with status \S+; restarting in ([\d.]+)s")


@pytest.mark.slow
async def test_managed_opa_down_is_503_then_backs_off_and_recovers(
    pki: Path, upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The managed binary is a wrapper that refuses to start while `block` exists: OPA stays
    # down for as long as the test wants, the way a crash-looping sidecar would.
    block = tmp_path / "block"
    wrapper = tmp_path / "opa"
    wrapper.write_text(f'#!/bin/sh\n[ -e "{block}" ] && exit 1\nexec "{opa_binary()}" "$@"\n')
    wrapper.chmod(0o755)
    config = make_config(
        pki,
        opa_url=f"http://127.0.0.1:{free_port()}",
        upstream_port=upstream.port,
        opa={"managed": True, "binary": str(wrapper), "policy_dir": str(POLICIES)},
    )
    runtime = PepRuntime(config)
    await runtime.start()
    try:
        sup = runtime.supervisor
        assert sup is not None and sup.pid is not None
        assert (await raw_https(runtime.port, client_context(pki, "reader"), get(SECRET))).status == 200
        with caplog.at_level(logging.WARNING, logger="vvault_pep.opa"):
            block.touch()
            os.kill(sup.pid, signal.SIGKILL)

            def backoffs() -> list[float]:
                return [float(m.group(1)) for r in caplog.records if (m := _RESTARTING.search(r.getMessage()))]

            async with asyncio.timeout(30):
                while len(backoffs()) < 4:
                    resp = await raw_https(runtime.port, client_context(pki, "reader"), get(SECRET))
                    if resp.status == 200 and not backoffs():
                        continue  # the kill has not landed yet
                    assert (resp.status, orjson.loads(resp.body)["code"]) == (503, "pdp.unavailable")
                    await asyncio.sleep(0.05)
            assert backoffs()[:4] == [0.1, 0.2, 0.4, 0.8]
            assert sup.restarts == 0
            block.unlink()
            async with asyncio.timeout(40):
                while sup.restarts < 1:
                    await asyncio.sleep(0.05)
        resp = await raw_https(runtime.port, client_context(pki, "reader"), get(SECRET))
        assert resp.status == 200
    finally:
        await runtime.stop()
