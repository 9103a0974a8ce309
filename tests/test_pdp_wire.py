"""The decision POST on the wire: the lean keep-alive client against what an OPA may do.

Each test runs a loopback server that answers in exact bytes (its requests parsed by llhttp,
``httptools``), so the answers a real OPA will not give on demand can be given: a connection
closed between two decisions, a late answer after the deadline, ambiguous framing, an answer
too large.  The real OPA's side of the same client is in ``test_proofs_opa_client.py`` and
``test_pdp.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httptools
import orjson
import pytest

from vvault_pep.config.models import Opa
from vvault_pep.decide import pdp
from vvault_pep.decide.pdp import PdpClient
from vvault_pep.errors import PepError

PATH = "vvault/authz/decision"

# (request number over the server's life, its body) -> what to write back, and whether to close after
Reply = Callable[[int, bytes], Any]


def answer(doc: Any, *, extra: bytes = b"") -> bytes:
    body = orjson.dumps(doc)
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


class Wire:
    """A loopback server that writes what ``reply`` says, counting connections and requests."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, unix: str | None = None) -> None:
        if unix is not None:
            self.server = await asyncio.start_unix_server(self._serve, unix)
            return
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        done: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

        class Sink:
            def __init__(self) -> None:
                self.headers: dict[bytes, bytes] = {}
                self.body = b""
                self.url = b""

            def on_url(self, url: bytes) -> None:
                self.url += url

            def on_header(self, name: bytes, value: bytes) -> None:
                self.headers[name.lower()] = value

            def on_body(self, body: bytes) -> None:
                self.body += body

            def on_message_complete(self) -> None:
                done.append((self.url, self.headers, self.body))
                self.__init__()  # type: ignore[misc]

        parser = httptools.HttpRequestParser(Sink())
        try:
            while data := await reader.read(65536):
                parser.feed_data(data)
                while done:
                    request = done.pop(0)
                    self.requests.append(request)
                    out, close = await self.reply(len(self.requests), request[2])
                    writer.write(out)
                    await writer.drain()
                    if close:
                        return
        except (ConnectionError, httptools.HttpParserError):
            return
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def wire() -> AsyncIterator[Callable[[Reply], Any]]:
    made: list[Wire] = []
    clients: list[PdpClient] = []

    async def make(reply: Reply) -> tuple[Wire, PdpClient]:
        w = Wire(reply)
        await w.start()
        made.append(w)
        c = PdpClient(Opa(url=f"http://127.0.0.1:{w.port}", timeout_ms=2000))
        clients.append(c)
        return w, c

    yield make
    for c in clients:
        await c.close()
    for w in made:
        await w.stop()


async def test_the_trace_headers_go_with_the_decision(wire: Any) -> None:
    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return answer({"result": True}), False

    w, c = await wire(reply)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await c.decide(PATH, {}, headers={"traceparent": parent, "tracestate": "v=1"})
    await c.decide(PATH, {})
    first, second = w.requests
    assert (first[1][b"traceparent"], first[1][b"tracestate"]) == (parent.encode(), b"v=1")
    assert b"traceparent" not in second[1]  # what one call carried is not kept for the next
    assert first[0] == second[0] == b"/v1/data/vvault/authz/decision"
    assert first[1][b"content-type"] == b"application/json" and first[1][b"host"] == f"127.0.0.1:{w.port}".encode()


async def test_decisions_share_one_keep_alive_connection(wire: Any) -> None:
    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return answer({"result": n}), False

    w, c = await wire(reply)
    results = [(await c.decide(PATH, {"i": i})).result for i in range(5)]
    assert results == [1, 2, 3, 4, 5] and w.connections == 1
    assert [orjson.loads(body) for _, _, body in w.requests] == [{"input": {"i": i}} for i in range(5)]


async def test_a_connection_opa_closed_while_idle_is_replaced_once(wire: Any) -> None:
    """OPA (or a restart of it) closed a pooled connection: the next decision goes out again
    on a fresh one instead of failing, since a decision changes nothing in OPA."""

    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return answer({"result": n}), True  # answers, then closes without saying so

    w, c = await wire(reply)
    assert (await c.decide(PATH, {})).result == 1
    assert (await c.decide(PATH, {})).result == 2
    assert (await c.decide(PATH, {})).result == 3
    assert w.connections == 3 and len(w.requests) == 3


async def test_an_answer_cut_short_is_not_asked_again(wire: Any) -> None:
    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return answer({"result": "x" * 100})[:-20], True

    w, c = await wire(reply)
    with pytest.raises(PepError) as exc:
        await c.decide(PATH, {})
    assert (exc.value.code, exc.value.status) == ("pdp.unavailable", 503)
    assert len(w.requests) == 1  # bytes of an answer came: never resent


async def test_a_late_answer_never_answers_the_next_decision(wire: Any) -> None:
    """The first decision times out; OPA's late answer to it must not be read as the answer
    to the second (the connection the first used is closed, never pooled)."""
    release = asyncio.Event()

    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        if n == 1:
            await release.wait()
        return answer({"result": orjson.loads(body)["input"]}), False

    w, c = await wire(reply)
    with pytest.raises(PepError) as exc:
        await c.decide(PATH, {"who": "first"}, deadline_s=0.1)
    assert exc.value.code == "pdp.timeout"
    release.set()
    assert (await c.decide(PATH, {"who": "second"})).result == {"who": "second"}
    assert w.connections == 2


@pytest.mark.parametrize(
    "raw",
    [
        # two lengths: which one frames the body is the smuggler's question
        b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nContent-Length: 4\r\n\r\n" + b'{"result":true}',
        # a length and chunking together
        b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nTransfer-Encoding: chunked\r\n\r\nf\r\n"
        + b'{"result":true}\r\n0\r\n\r\n',
        # a chunk size that is not hex
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + b'{"result":true}\r\n0\r\n\r\n',
        # a header line folded onto the next
        b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nX-A: 1\r\n folded\r\n\r\n" + b'{"result":true}',
        # not HTTP at all
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ],
    ids=["two-lengths", "length-and-chunked", "bad-chunk-size", "folded-header", "not-http"],
)
async def test_ambiguous_framing_from_opa_is_no_decision(wire: Any, raw: bytes) -> None:
    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return raw, False

    _, c = await wire(reply)
    with pytest.raises(PepError) as exc:
        await c.decide(PATH, {}, deadline_s=1.0)
    assert (exc.value.code, exc.value.status) == ("pdp.unavailable", 503)


async def test_bytes_after_the_answer_cost_the_connection_not_the_decision(wire: Any) -> None:
    """A second answer smuggled behind the first is never read as the next decision's."""

    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return answer({"result": n}) + answer({"result": "smuggled"}), False

    w, c = await wire(reply)
    assert (await c.decide(PATH, {})).result == 1
    assert (await c.decide(PATH, {})).result == 2
    assert w.connections == 2


async def test_an_answer_over_the_limit_is_refused(
    wire: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limit = len(orjson.dumps({"result": "y" * 10}))
    monkeypatch.setattr(pdp, "ANSWER_LIMIT", limit)

    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return answer({"result": "y" * (10 if n == 1 else 11)}), False

    _, c = await wire(reply)
    assert (await c.decide(PATH, {})).result == "y" * 10  # exactly the limit: taken
    with caplog.at_level(logging.WARNING, logger="vvault_pep.pdp"), pytest.raises(PepError) as exc:
        await c.decide(PATH, {})  # one byte over it: refused
    assert (exc.value.code, exc.value.status, exc.value.detail) == (
        "pdp.error",
        503,
        "the policy decision point answered garbage",
    )
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.pdp"] == [
        f"OPA answered more than {limit} bytes"
    ]


async def test_a_chunked_answer_is_read_whole(wire: Any) -> None:
    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        doc = b'{"result":{"allow":true}}'
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n" + doc[:5] + b"\r\n%x\r\n" % (
            len(doc) - 5
        ) + doc[5:] + b"\r\n0\r\n\r\n", False

    _, c = await wire(reply)
    assert (await c.decide(PATH, {})).result == {"allow": True}
    assert (await c.decide(PATH, {})).result == {"allow": True}


async def test_an_interim_answer_is_skipped(wire: Any) -> None:
    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return b"HTTP/1.1 100 Continue\r\n\r\n" + answer({"result": "final"}), False

    _, c = await wire(reply)
    assert (await c.decide(PATH, {})).result == "final"


async def test_decisions_over_a_unix_socket(tmp_path: Path) -> None:
    """OPA's socket, as deploy/ runs the sidecar: one connection, the Host header ``opa``."""

    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        return answer({"result": n}), n == 2  # the second answer closes the connection

    w = Wire(reply)
    await w.start(unix=str(tmp_path / "opa.sock"))
    c = PdpClient(Opa(), url=f"unix://{tmp_path / 'opa.sock'}")
    try:
        assert [(await c.decide(PATH, {})).result for _ in range(3)] == [1, 2, 3]
    finally:
        await c.close()
        await w.stop()
    assert w.connections == 2
    assert [headers[b"host"] for _, headers, _ in w.requests] == [b"opa"] * 3


async def test_a_decision_past_its_deadline_says_where_it_waited(wire: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The log line and the count say where the time went: OPA's answer, a free connection
    (opa.max_connections in flight), or the connect itself; at most one line per second."""
    release = asyncio.Event()

    async def reply(n: int, body: bytes) -> tuple[bytes, bool]:
        await release.wait()
        return answer({"result": True}), False

    w, _ = await wire(reply)
    c = PdpClient(Opa(url=f"http://127.0.0.1:{w.port}", max_connections=1))
    # a port that listens but never accepts, its queue full: the kernel drops further SYNs
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    stuck = PdpClient(Opa(url=f"http://127.0.0.1:{port}"))
    try:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.pdp"):
            first = asyncio.create_task(c.decide(PATH, {}, deadline_s=0.3))
            await asyncio.sleep(0)  # the first takes the one connection
            for task in await asyncio.gather(c.decide(PATH, {}, deadline_s=0.1), first, return_exceptions=True):
                assert isinstance(task, PepError) and task.code == "pdp.timeout"
            with pytest.raises(PepError, match="did not answer in time"):
                await stuck.decide(PATH, {}, deadline_s=0.1)
        assert c.timeouts == {"slot": 1, "sent": 1}
        assert stuck.timeouts == {"connecting": 1}
        lines = [r.getMessage() for r in caplog.records if "in time" in r.getMessage()]
        assert lines[0].startswith("OPA did not answer in time: ")
        assert lines[0].endswith("ms waiting for a free connection (opa.max_connections in flight)")
        # the answer's wait ended within the same second: counted, not logged (the next
        # line would say so); the other client logs its own
        assert lines[1].endswith("ms connecting to OPA") and len(lines) == 2
    finally:
        release.set()
        await c.close()
        await stuck.close()
        for s in (*fillers, listener):
            s.close()
