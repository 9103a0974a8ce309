"""Audit sinks, function by function: the bounded buffer, the writer thread, the encoding.

What an operator relies on: a full buffer drops and counts (never blocks), a batch is at
most 256 records and one write, a failing sink counts its losses and warns once per
thousand, ``stop`` writes what came before it, and every record becomes exactly one JSON
line — escaped when JSON cannot carry it, cut to ``max_record_bytes`` keeping the fields an
investigation needs.  The sinks here are real threads writing real files.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from vvault_pep.config import AuditSink
from vvault_pep.observe import sinks
from vvault_pep.observe.sinks import _ESSENTIAL, SINKS, Sink, _FileSink, _scrub, _shorten, _StdoutSink, encode


def wait_for(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class Recording(Sink):
    """A sink that keeps its batches (the sizes are what is checked)."""

    def __init__(self, name: str = "rec", capacity: int = 10_000) -> None:
        super().__init__(name, capacity)
        self.batches: list[list[dict[str, Any]]] = []
        self.seen_in_flight: list[int] = []
        self.closed = 0

    def write(self, batch: list[dict[str, Any]]) -> None:
        self.seen_in_flight.append(self.in_flight)
        self.batches.append(batch)

    def close(self) -> None:
        self.closed += 1


# -- the registry --------------------------------------------------------------------------


def test_the_built_in_sink_types() -> None:
    assert SINKS["stdout"] is _StdoutSink and SINKS["file"] is _FileSink
    assert SINKS["otlp"] is sinks._OtlpSink


def test_register_and_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SINKS, "stdout", lambda name, cfg: Recording(name, cfg.buffer_records))
    built = sinks.build("mine-3", AuditSink(type="stdout", buffer_records=7))
    assert isinstance(built, Recording) and built.sink == "mine-3" and built.capacity == 7
    sinks.register("stdout", _StdoutSink)
    assert SINKS["stdout"] is _StdoutSink


def test_now_rfc3339() -> None:
    text = sinks.now_rfc3339()
    assert text.endswith("Z") and "+00:00" not in text
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert when.tzinfo == dt.UTC
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60


# -- the buffer and the thread -------------------------------------------------------------


def test_a_new_sink() -> None:
    sink = Recording("file-2", 5)
    assert sink.name == "audit-sink-file-2" and sink.daemon is True
    assert (sink.sink, sink.capacity) == ("file-2", 5)
    assert (sink.dropped, sink.failures, sink.escaped, sink.truncated, sink.in_flight) == (0, 0, 0, 0, 0)
    assert sink.max_record_bytes == 16_384
    assert Sink.flush_s == 0.05


def test_a_full_buffer_drops_and_counts_exactly() -> None:
    sink = Recording(capacity=3)
    for i in range(5):
        sink.offer({"n": i})
    assert sink.dropped == 2
    sink.start()
    sink.stop(10)
    assert [r["n"] for b in sink.batches for r in b] == [0, 1, 2]


def test_a_batch_worth_waiting_wakes_the_thread_not_less() -> None:
    sink = Recording()
    for i in range(255):
        sink.offer({"n": i})
    assert not sink._wake.is_set()
    sink.offer({"n": 255})
    assert sink._wake.is_set()
    sink._wake.clear()
    sink.offer({"n": 256})
    assert not sink._wake.is_set()  # only the 256th record wakes, not every one after it


def test_a_full_batch_is_written_without_waiting_for_the_flush_interval() -> None:
    sink = Recording()
    sink.flush_s = 3600.0
    sink.start()
    try:
        time.sleep(0)  # let the thread reach its wait
        for i in range(256):
            sink.offer({"n": i})
        wait_for(lambda: sum(len(b) for b in sink.batches) == 256)
    finally:
        sink.stop(10)


def test_batches_are_at_most_256_records_and_in_order() -> None:
    sink = Recording(capacity=1000)
    for i in range(600):
        sink.offer({"n": i})
    sink.start()
    sink.stop(10)
    assert [len(b) for b in sink.batches] == [256, 256, 88]
    assert [r["n"] for b in sink.batches for r in b] == list(range(600))
    assert sink.seen_in_flight == [256, 256, 88] and sink.in_flight == 0
    assert sink.closed == 1 and not sink.is_alive()


def test_a_quiet_sink_writes_within_the_flush_interval() -> None:
    sink = Recording()
    sink.start()
    try:
        sink.offer({"n": 1})
        wait_for(lambda: sink.batches)
        sink.offer({"n": 2})
        wait_for(lambda: len(sink.batches) == 2)  # the thread keeps going after a batch
    finally:
        sink.stop(10)
    assert sink.batches == [[{"n": 1}], [{"n": 2}]]


class Failing(Recording):
    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail

    def write(self, batch: list[dict[str, Any]]) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("disk full")
        super().write(batch)


def test_a_failed_batch_is_counted_and_the_next_one_still_written(caplog: pytest.LogCaptureFixture) -> None:
    sink = Failing(fail=1)
    for i in range(300):
        sink.offer({"n": i})
    with caplog.at_level(logging.WARNING, logger="vvault_pep.audit.sink"):
        sink.start()
        sink.stop(10)
    assert sink.failures == 256 and sink.in_flight == 0
    assert [len(b) for b in sink.batches] == [44]
    [warning] = caplog.records
    assert warning.name == "vvault_pep.audit.sink" and warning.levelno == logging.WARNING
    assert warning.getMessage() == "audit sink rec failing (256 records): OSError"
    assert "disk full" not in warning.getMessage()


@pytest.mark.parametrize(
    ("before", "n", "warns"),
    [
        (0, 1, True),
        (0, 5, True),
        (1, 1, False),
        (5, 994, False),
        (998, 1, False),
        (999, 1, True),
        (998, 5, True),
        (1000, 999, False),
        (1999, 1, True),
        (1500, 1000, True),
    ],
)
def test_a_failing_sink_warns_once_per_thousand(
    caplog: pytest.LogCaptureFixture, before: int, n: int, warns: bool
) -> None:
    sink = Recording("s")
    sink.failures = before
    with caplog.at_level(logging.WARNING, logger="vvault_pep.audit.sink"):
        sink._failed(n, BrokenPipeError())
    assert sink.failures == before + n
    assert [r.getMessage() for r in caplog.records] == (
        [f"audit sink s failing ({before + n} records): BrokenPipeError"] if warns else []
    )


class Stuck(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, batch: list[dict[str, Any]]) -> None:
        self.entered.set()
        self.release.wait(30)
        super().write(batch)


def test_a_stuck_sink_is_abandoned_after_the_timeout_and_not_closed() -> None:
    sink = Stuck()
    sink.offer({"n": 1})
    sink.start()
    assert sink.entered.wait(10)
    started = time.monotonic()
    sink.stop(0.2)
    assert time.monotonic() - started < 5
    assert sink.is_alive() and sink.closed == 0 and sink.in_flight == 1
    sink.release.set()
    sink.join(10)
    assert not sink.is_alive() and sink.batches == [[{"n": 1}]]


def test_what_comes_before_stop_is_written() -> None:
    sink = Recording()
    sink.flush_s = 3600.0
    sink.start()
    for i in range(10):
        sink.offer({"n": i})
    sink.stop(10)
    assert [r["n"] for b in sink.batches for r in b] == list(range(10))
    assert not sink.is_alive()


def test_the_base_sink_cannot_write() -> None:
    sink = Sink("base", 1)
    with pytest.raises(NotImplementedError):
        sink.write([{}])
    sink.close()  # nothing to close


def test_lines_count_escaped_and_truncated_records() -> None:
    sink = Recording()
    sink.max_record_bytes = 2048
    out = sink.lines([{"a": 1}, {"b": "\ud800"}, {"c": "x" * 3000}, {"d": "\udfff" + "y" * 3000}])
    assert len(out) == 4 and all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in out)
    assert out[0] == b'{"a":1}\n'
    assert (sink.escaped, sink.truncated) == (2, 2)
    assert all(len(line) <= 2048 for line in out)


# -- making a record JSON can carry ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "scrubbed"),
    [
        ("plain", "plain"),
        ("é", "é"),
        ("a\ud800b", "a\\ud800b"),
        (True, True),
        (False, False),
        (None, None),
        (1.5, 1.5),
        (0, 0),
        (-(1 << 63), -(1 << 63)),
        (-(1 << 63) - 1, str(-(1 << 63) - 1)),
        ((1 << 64) - 1, (1 << 64) - 1),
        (1 << 64, str(1 << 64)),
        ({1: "a", "k": "\udc80"}, {"1": "a", "k": "\\udc80"}),
        ({"\ud800": 1}, {"\\ud800": 1}),
        ((1, "x"), [1, "x"]),
        ([1 << 70, ["\ud800"]], [str(1 << 70), ["\\ud800"]]),
        (Path("/tmp/x"), "/tmp/x"),
        (b"raw", "b'raw'"),
    ],
)
def test_scrub(value: Any, scrubbed: Any) -> None:
    out = _scrub(value)
    assert out == scrubbed and type(out) is type(scrubbed)
    orjson.dumps(out)  # JSON can carry it now


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_scrub_stops_at_depth_64() -> None:
    assert _scrub(nested(65)) == nested(65)  # the deepest list sits at depth 64: kept
    deep = _scrub(nested(66))
    inner = deep
    for _ in range(65):
        inner = inner[0]
    assert inner == "…"
    shallow = _scrub(nested(65))
    inner = shallow
    for _ in range(65):
        inner = inner[0]
    assert inner == "leaf"
    keyed: Any = "leaf"
    for _ in range(66):
        keyed = {"k": keyed}
    inner = _scrub(keyed)
    for _ in range(65):
        inner = inner["k"]
    assert inner == "…"


@pytest.mark.parametrize(
    ("value", "short"),
    [
        ("x" * 512, "x" * 512),
        ("x" * 513, "x" * 512 + "…"),
        (list(range(32)), list(range(32))),
        (list(range(33)), [*range(32), "… 1 more"]),
        (list(range(40)), [*range(32), "… 8 more"]),
        ({f"k{i}": i for i in range(32)}, {f"k{i}": i for i in range(32)}),
        ({f"k{i}": i for i in range(34)}, {**{f"k{i}": i for i in range(32)}, "…": "2 more"}),
        ({"a": ["y" * 600]}, {"a": ["y" * 512 + "…"]}),
        ([{"b": "z" * 513}], [{"b": "z" * 512 + "…"}]),
        (7, 7),
        (None, None),
        ((1, 2), (1, 2)),
    ],
)
def test_shorten(value: Any, short: Any) -> None:
    assert _shorten(value) == short


def test_the_essential_fields() -> None:
    assert _ESSENTIAL == (
        "timestamp", "decision_id", "request_id", "trace_id", "route", "method", "path", "request_path",
        "source_ip", "client_cert_sha256", "spiffe_id", "subject", "issuer", "tenant", "device_id", "status",
        "result", "admin_action", "admin", "enforced", "cache", "latency_ms", "upstream_status", "bytes_in",
    )  # fmt: skip


# -- encode ----------------------------------------------------------------------------------


def test_a_plain_record_is_one_line_as_it_is() -> None:
    assert encode({"a": 1, "b": "é"}, 2048) == ('{"a":1,"b":"é"}\n'.encode(), False, False)


def test_values_json_does_not_know_are_written_as_text() -> None:
    line, escaped, truncated = encode({"p": Path("/x"), "when": dt.date(2024, 1, 2)}, 2048)
    assert json.loads(line) == {"p": "/x", "when": "2024-01-02"}
    assert (escaped, truncated) == (False, False)


@pytest.mark.parametrize("bad", [{"s": "\ud800"}, {1: "x"}, {"n": 1 << 64}])
def test_a_record_json_cannot_carry_is_escaped_and_marked(bad: dict[Any, Any]) -> None:
    line, escaped, truncated = encode({"request_id": "r", **bad, "obj": Path("/y")}, 2048)
    doc = json.loads(line)
    assert doc["escaped"] is True and doc["request_id"] == "r" and doc["obj"] == "/y"
    assert (escaped, truncated) == (True, False)
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_the_limit_is_exact() -> None:
    record = {"v": ""}
    base = len(encode(record, 1 << 20)[0])
    at = {"v": "x" * (3000 - base)}
    line, _, truncated = encode(at, 3000)
    assert len(line) == 3000 and not truncated
    line, _, truncated = encode({"v": "x" * (3001 - base)}, 3000)
    assert truncated and json.loads(line)["truncated"] == {"bytes": 3001}


def big_record() -> dict[str, Any]:
    return {
        "timestamp": "t",
        "decision_id": "d",
        "request_id": "r",
        "status": 403,
        "note": "n" * 2000,
        "input": {"request": {"headers": {f"h{i}": "v" * 100 for i in range(20)}}},
    }


def test_shortening_is_tried_first() -> None:
    line, _, truncated = encode(big_record(), 4096)
    doc = json.loads(line)
    assert truncated and len(line) <= 4096
    assert doc["note"] == "n" * 512 + "…" and "input" in doc
    assert doc["truncated"] == {"bytes": len(encode(big_record(), 1 << 20)[0])}


def test_then_the_input_is_dropped() -> None:
    line, _, truncated = encode(big_record(), 2048)
    doc = json.loads(line)
    assert truncated and len(line) <= 2048
    assert "input" not in doc and doc["note"] == "n" * 512 + "…" and doc["status"] == 403


def test_then_only_the_essential_fields_are_kept() -> None:
    record = {**big_record(), **{f"extra{i}": "e" * 500 for i in range(8)}, "route": "r1"}
    line, _, truncated = encode(record, 2048)
    doc = json.loads(line)
    assert truncated and len(line) <= 2048
    assert doc == {
        "timestamp": "t",
        "decision_id": "d",
        "request_id": "r",
        "route": "r1",
        "status": 403,
        "truncated": {"bytes": len(encode(record, 1 << 20)[0])},
    }


def test_and_last_the_three_ids() -> None:
    record = {**{k: "z" * 500 for k in _ESSENTIAL}, "timestamp": "t", "decision_id": "d", "request_id": "r"}
    line, _, truncated = encode(record, 2048)
    assert truncated
    assert json.loads(line) == {
        "timestamp": "t",
        "decision_id": "d",
        "request_id": "r",
        "truncated": {"bytes": len(encode(record, 1 << 20)[0])},
    }


def test_an_escaped_record_that_is_also_too_long() -> None:
    line, escaped, truncated = encode({"request_id": "r", "s": "\ud800" * 3000}, 2048)
    doc = json.loads(line)
    assert (escaped, truncated) == (True, True)
    assert doc["escaped"] is True and doc["request_id"] == "r" and len(line) <= 2048


# -- stdout and file ------------------------------------------------------------------------


def test_the_stdout_sink_writes_lines_to_the_stdout_it_was_built_with(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    sink = _StdoutSink("stdout-0", AuditSink(type="stdout", buffer_records=4))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert sink.capacity == 4 and sink.sink == "stdout-0"
    sink.write([{"a": 1}, {"b": "\ud800"}])
    assert out.getvalue() == '{"a":1}\n{"b":"\\\\ud800","escaped":true}\n'
    assert sink.escaped == 1


def test_the_stdout_sink_flushes_each_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    class Counting(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            super().flush()

    out = Counting()
    monkeypatch.setattr(sys, "stdout", out)
    sink = _StdoutSink("stdout-0", AuditSink(type="stdout"))
    sink.write([{"a": 1}, {"a": 2}])
    sink.write([{"a": 3}])
    assert out.flushes == 2


def file_sink(path: Path, **kw: Any) -> _FileSink:
    return _FileSink("file-0", AuditSink(type="file", path=path, **kw))


def test_the_file_sink_appends_to_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b'{"old":1}\n')
    sink = file_sink(path, buffer_records=9)
    assert (sink.path, sink.capacity, sink.max_bytes, sink.backups) == (str(path), 9, 100 << 20, 5)
    sink.write([{"n": 1}])
    assert sink._size == len(b'{"old":1}\n{"n":1}\n')
    sink.write([{"n": 2}, {"n": 3}])
    assert path.read_bytes() == b'{"old":1}\n{"n":1}\n{"n":2}\n{"n":3}\n'  # flushed: readable at once
    sink.close()
    assert sink._file.closed


def test_the_file_sink_rotates_past_max_bytes_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink(path, max_bytes=20, backups=2)
    line = b'{"n":0,"p":"xx"}\n'  # 17 bytes
    assert len(line) == 17
    for n in range(5):
        sink.write([{"n": n, "p": "xx"}])
    sink.close()
    assert path.read_bytes() == b'{"n":4,"p":"xx"}\n'
    assert (tmp_path / "a.log.1").read_bytes() == b'{"n":3,"p":"xx"}\n'
    assert (tmp_path / "a.log.2").read_bytes() == b'{"n":2,"p":"xx"}\n'
    assert not (tmp_path / "a.log.3").exists()


def test_a_write_that_fits_exactly_does_not_rotate(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink(path, max_bytes=21, backups=1)
    sink.write([{"a": "xxxxxxxx"}])  # 17 bytes
    sink.write([{}])  # 3 more: 20 ≤ 21
    sink.write([])  # nothing: 20 ≤ 21
    assert not (tmp_path / "a.log.1").exists()
    sink.write([{"a": 1}])  # 8 more: 28 > 21
    sink.close()
    assert (tmp_path / "a.log.1").read_bytes() == b'{"a":"xxxxxxxx"}\n{}\n'
    assert path.read_bytes() == b'{"a":1}\n'


def test_exactly_max_bytes_does_not_rotate(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink(path, max_bytes=20, backups=1)
    sink.write([{"a": "xxxxxxxx"}])  # 17
    sink.write([{}])  # 20 == max_bytes
    assert path.stat().st_size == 20
    sink.close()
    assert not (tmp_path / "a.log.1").exists()


def test_one_record_larger_than_max_bytes_goes_to_an_empty_file_unrotated(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink(path, max_bytes=5, backups=1)
    sink.write([{"a": "long"}])
    assert not (tmp_path / "a.log.1").exists()
    sink.write([{"a": "next"}])
    sink.close()
    assert (tmp_path / "a.log.1").read_bytes() == b'{"a":"long"}\n'


def test_no_backups_means_no_rotation(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink(path, max_bytes=10, backups=0)
    for n in range(3):
        sink.write([{"n": n}])
    sink.close()
    assert path.read_bytes() == b'{"n":0}\n{"n":1}\n{"n":2}\n'
    assert list(tmp_path.iterdir()) == [path]


def test_an_existing_file_counts_toward_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"x" * 15 + b"\n")
    sink = file_sink(path, max_bytes=20, backups=3)
    sink.write([{"n": 1}])  # 16 + 8 > 20
    sink.close()
    assert (tmp_path / "a.log.1").read_bytes() == b"x" * 15 + b"\n"
    assert path.read_bytes() == b'{"n":1}\n'


def test_rotation_shifts_every_backup(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    for i in (1, 2, 3):
        (tmp_path / f"a.log.{i}").write_text(f"b{i}\n")
    path.write_text("cur\n")
    sink = file_sink(path, max_bytes=4, backups=3)
    sink.write([{"n": 1}])
    sink.close()
    assert [(tmp_path / f"a.log.{i}").read_text() for i in (1, 2, 3)] == ["cur\n", "b1\n", "b2\n"]
    assert path.read_text() == '{"n":1}\n'


def test_rotation_with_backups_missing(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    (tmp_path / "a.log.2").write_text("b2\n")
    path.write_text("cur\n")
    sink = file_sink(path, max_bytes=4, backups=3)
    sink.write([{"n": 1}])
    sink.close()
    assert (tmp_path / "a.log.1").read_text() == "cur\n"
    assert (tmp_path / "a.log.3").read_text() == "b2\n"
    assert not (tmp_path / "a.log.2").exists()
    assert sink.failures == 0


def test_the_size_is_zero_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink(path, max_bytes=10, backups=1)
    sink.write([{"n": 1}])  # 8
    sink.write([{"n": 2}])  # rotates: the new file holds 8
    assert sink._size == 8
    sink.write([{"n": 3}])  # 16 > 10: rotates again
    sink.close()
    assert (tmp_path / "a.log.1").read_bytes() == b'{"n":2}\n'
    assert path.read_bytes() == b'{"n":3}\n'


def test_closing_a_file_sink_that_never_wrote(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "a.log")
    sink.close()
    assert not (tmp_path / "a.log").exists()


def test_a_running_file_sink_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink(path, buffer_records=100)
    sink.max_record_bytes = 2048
    sink.start()
    for i in range(50):
        sink.offer({"n": i})
    sink.offer({"big": "x" * 5000, "request_id": "r"})
    sink.stop(10)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["n"] for r in records[:50]] == list(range(50))
    assert records[50]["request_id"] == "r" and records[50]["truncated"]["bytes"] > 5000
    assert sink.truncated == 1 and sink._file.closed


def test_a_truncated_record_keeps_values_json_does_not_know_as_text() -> None:
    line, escaped, truncated = encode({"request_id": "r", "p": Path("/x"), "big": "x" * 5000}, 2048)
    doc = json.loads(line)
    assert (escaped, truncated) == (False, True)
    assert doc["p"] == "/x" and doc["request_id"] == "r"


def test_a_shortened_record_of_exactly_max_bytes_is_kept_whole() -> None:
    """The first cut that fits is taken — even one that fits to the byte."""
    for k in range(513):  # every string at most 512 characters but the first: only that one is cut
        record = {"note": "n" * 600, "a": "a" * 500, "b": "b" * 500, "c": "c" * k}
        full = len(orjson.dumps(record)) + 1
        shortened = {**record, "note": "n" * 512 + "…", "truncated": {"bytes": full}}
        expected = orjson.dumps(shortened) + b"\n"
        if len(expected) == 2048:
            break
    else:
        raise AssertionError("no record fits 2048 bytes exactly")
    assert encode(record, 2048) == (expected, False, True)


def test_a_file_of_one_byte_counts_toward_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"\n")
    sink = file_sink(path, max_bytes=5, backups=1)
    sink.write([{"n": 1}])  # 1 + 8 > 5
    sink.close()
    assert (tmp_path / "a.log.1").read_bytes() == b"\n"
    assert path.read_bytes() == b'{"n":1}\n'
