"""Audit redaction and the audit log itself, function by function.

``redact`` decides what of the policy input an audit record may show: each always-erased
header, the configured erase and mask paths, the query by its mode, and which of them the
record lists as ``erased`` / ``masked``.  The masked form is fixed (``masked:sha256:`` and
the first 16 hex digits of the SHA-256 of the value's sorted JSON), so records stay
correlatable across replicas and releases; the tables compute it independently here.
Then the operational log line format, and the audit log's sinks, counters and hand-off to
a listening logger — with real sinks (a file, stdout) and real threads.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vvault_pep.config import AuditSink
from vvault_pep.config.models import Audit
from vvault_pep.observe.audit import ALWAYS_ERASE, AuditLog, JsonLines, configure_logging, redact


def masked(raw: bytes) -> str:
    """What a masked value reads: the digest of its JSON (keys sorted), independently computed."""
    return "masked:sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def policy_input() -> dict[str, Any]:
    return {
        "request": {
            "method": "GET",
            "headers": {
                "authorization": ["Bearer abc"],
                "cookie": ["s=1"],
                "set-cookie": ["t=2"],
                "proxy-authorization": ["Basic Zm9v"],
                "x-device-posture": ["eyJ..."],
                "accept": ["*/*"],
                "x-api-key": ["k-1"],
            },
            "query": {"q": ["secret", "two"], "page": ["1"]},
        },
        "identity": {"claims": {"email": "a@example.com", "dept": "x", "nested": {"b": 1, "a": [2, 3]}}},
        "route": {"name": "r"},
    }


def test_the_always_erased_headers() -> None:
    assert ALWAYS_ERASE == (
        "request.headers.authorization",
        "request.headers.cookie",
        "request.headers.set-cookie",
        "request.headers.proxy-authorization",
        "request.headers.x-device-posture",
    )


def test_every_always_erased_header_is_erased_and_listed_in_order() -> None:
    out, done = redact(policy_input(), (), ())
    assert out["request"]["headers"] == {"accept": ["*/*"], "x-api-key": ["k-1"]}
    assert done == {"erased": list(ALWAYS_ERASE), "masked": ["request.query"]}


def test_erase_and_mask_paths_from_the_config() -> None:
    out, done = redact(policy_input(), ("request.headers.x-api-key",), ("identity.claims.email",))
    assert "x-api-key" not in out["request"]["headers"]
    assert out["identity"]["claims"]["email"] == masked(b'"a@example.com"')
    assert out["identity"]["claims"]["dept"] == "x"
    assert done["erased"] == [*ALWAYS_ERASE, "request.headers.x-api-key"]
    assert done["masked"] == ["request.query", "identity.claims.email"]


def test_a_masked_value_is_the_digest_of_its_sorted_json() -> None:
    out, done = redact(policy_input(), (), ("identity.claims.nested", "request.method"), query="keep")
    assert out["identity"]["claims"]["nested"] == masked(b'{"a":[2,3],"b":1}')
    assert out["request"]["method"] == masked(b'"GET"')
    assert len(out["request"]["method"]) == len("masked:sha256:") + 16
    assert done["masked"] == ["identity.claims.nested", "request.method"]


@pytest.mark.parametrize(
    ("mode", "query", "listed"),
    [
        ("mask", {"q": [masked(b'"secret"'), masked(b'"two"')], "page": [masked(b'"1"')]}, ("masked",)),
        ("erase", {}, ("erased",)),
        ("keep", {"q": ["secret", "two"], "page": ["1"]}, ()),
    ],
)
def test_the_query_by_its_mode(mode: str, query: dict[str, list[str]], listed: tuple[str, ...]) -> None:
    out, done = redact(policy_input(), (), (), query=mode)
    assert out["request"]["query"] == query
    for kind in ("erased", "masked"):
        assert ("request.query" in done[kind]) == (kind in listed)


def test_the_query_is_masked_by_default() -> None:
    out, done = redact(policy_input(), (), ())
    assert out["request"]["query"]["page"] == [masked(b'"1"')]
    assert done["masked"] == ["request.query"]


@pytest.mark.parametrize("mode", ["mask", "erase"])
@pytest.mark.parametrize("query", [{}, None, "a=1", ["a"]])
def test_an_empty_or_absent_query_is_not_listed(mode: str, query: Any) -> None:
    doc = {"request": {"headers": {}, "query": query}}
    out, done = redact(doc, (), (), query=mode)
    assert out["request"]["query"] == query
    assert done == {"erased": [], "masked": []}


def test_no_request_at_all() -> None:
    out, done = redact({"route": "r"}, ("request.headers.x",), ("identity.claims.email",))
    assert out == {"route": "r"}
    assert done == {"erased": [], "masked": []}


@pytest.mark.parametrize(
    "doc",
    [
        {"request": {"headers": "not a dict"}},
        {"request": {"headers": ["authorization"]}},
        {"request": None},
    ],
)
def test_a_path_through_something_that_is_not_an_object_is_left_alone(doc: dict[str, Any]) -> None:
    before = copy.deepcopy(doc)
    out, done = redact(doc, (), ("request.headers.accept",))
    assert out == before and doc == before
    assert done == {"erased": [], "masked": []}


def test_an_absent_leaf_is_not_listed() -> None:
    out, done = redact({"request": {"headers": {"accept": ["*/*"]}}}, ("request.headers.x-api-key",), ("a.b",))
    assert out == {"request": {"headers": {"accept": ["*/*"]}}}
    assert done == {"erased": [], "masked": []}


def test_a_leaf_holding_null_is_still_erased_or_masked() -> None:
    doc = {"request": {"headers": {"x-a": None, "x-b": None}}}
    out, done = redact(doc, ("request.headers.x-a",), ("request.headers.x-b",))
    assert out["request"]["headers"] == {"x-b": masked(b"null")}
    assert done == {"erased": ["request.headers.x-a"], "masked": ["request.headers.x-b"]}


def test_a_top_level_path() -> None:
    out, done = redact({"secret": 1, "kept": 2}, ("secret",), ("kept",))
    assert out == {"kept": masked(b"2")}
    assert done == {"erased": ["secret"], "masked": ["kept"]}


def test_the_policy_input_is_never_changed_and_untouched_parts_are_shared() -> None:
    doc = policy_input()
    original = copy.deepcopy(doc)
    out, _ = redact(doc, ("request.headers.x-api-key",), ("identity.claims.email",))
    assert doc == original
    # copied: every dict on a changed path; shared: the rest
    assert out is not doc
    assert out["request"] is not doc["request"] and out["request"]["headers"] is not doc["request"]["headers"]
    assert out["identity"] is not doc["identity"] and out["identity"]["claims"] is not doc["identity"]["claims"]
    assert out["route"] is doc["route"]
    assert out["identity"]["claims"]["nested"] is doc["identity"]["claims"]["nested"]


def test_deep_paths_change_only_the_copy() -> None:
    doc = {"a": {"b": {"c": {"d": 1, "e": 2}, "f": {"g": 3}}}, "x": {"y": 4}}
    original = copy.deepcopy(doc)
    out, done = redact(doc, ("a.b.c.d",), ("a.b.c.e",), query="keep")
    assert doc == original
    assert out == {"a": {"b": {"c": {"e": masked(b"2")}, "f": {"g": 3}}}, "x": {"y": 4}}
    assert out["a"]["b"]["f"] is doc["a"]["b"]["f"]
    assert done == {"erased": ["a.b.c.d"], "masked": ["a.b.c.e"]}


def test_a_path_that_stops_at_a_non_object_does_not_copy_beyond() -> None:
    doc: dict[str, Any] = {"a": "text", "b": {"c": {"d": 1}}}
    out, done = redact(doc, ("a.x.y", "b.c.d"), (), query="keep")
    assert out == {"a": "text", "b": {"c": {}}}
    assert doc == {"a": "text", "b": {"c": {"d": 1}}}
    assert done["erased"] == ["b.c.d"]


def test_two_paths_through_one_object_both_apply() -> None:
    doc = {"request": {"headers": {"a": 1, "b": 2, "c": 3}}}
    out, done = redact(doc, ("request.headers.a",), ("request.headers.b",), query="keep")
    assert out == {"request": {"headers": {"b": masked(b"2"), "c": 3}}}
    assert done == {"erased": ["request.headers.a"], "masked": ["request.headers.b"]}
    assert doc == {"request": {"headers": {"a": 1, "b": 2, "c": 3}}}


# -- the operational log line ------------------------------------------------------------


def log_record(msg: str = "hello %s", args: tuple[Any, ...] = ("world",), **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("vvault_pep.test", logging.WARNING, __file__, 1, msg, args, None)
    record.created = 1_700_000_000.25
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_an_operational_line() -> None:
    line = JsonLines().format(log_record())
    assert json.loads(line) == {
        "timestamp": "2023-11-14T22:13:20.250000Z",
        "level": "warning",
        "logger": "vvault_pep.test",
        "msg": "hello world",
    }


def test_peer_and_why_are_kept_as_text_and_nothing_else() -> None:
    line = JsonLines().format(log_record(peer=("10.0.0.1", 443), why=ValueError("bad"), other="x"))
    doc = json.loads(line)
    assert doc["peer"] == "('10.0.0.1', 443)" and doc["why"] == "bad"
    assert "other" not in doc


def test_an_exception_is_named_by_its_type_only() -> None:
    try:
        raise KeyError("a-secret-value")
    except KeyError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonLines().format(record)
    assert json.loads(line)["error"] == "KeyError"
    assert "a-secret-value" not in line


def test_exc_info_without_an_exception_adds_nothing() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), (None, None, None))
    assert "error" not in json.loads(JsonLines().format(record))


def test_an_audit_record_is_written_as_it_is_on_one_line() -> None:
    audit = {"request_id": "r-1", "status": 200, "text": "a\nb"}
    line = JsonLines().format(log_record(audit=audit))
    assert "\n" not in line
    assert json.loads(line) == audit


def test_an_audit_attribute_that_is_not_a_record_is_a_plain_line() -> None:
    line = JsonLines().format(log_record(audit="not a record"))
    assert json.loads(line)["msg"] == "hello world"


def test_configure_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    audit_logger, access = logging.getLogger("vvault_pep.audit"), logging.getLogger("aiohttp.access")
    saved = (root.handlers[:], root.level, audit_logger.propagate, access.level)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        configure_logging("DEBUG")
        [handler] = [h for h in root.handlers if h not in saved[0]]
        assert isinstance(handler, logging.StreamHandler) and handler.stream is stderr
        assert isinstance(handler.formatter, JsonLines)
        assert root.level == logging.DEBUG
        assert audit_logger.propagate is False
        assert access.level == logging.WARNING
        logging.getLogger("vvault_pep.probe").debug("one %d", 1)
        assert json.loads(stderr.getvalue().splitlines()[-1])["msg"] == "one 1"
        configure_logging()
        assert root.level == logging.INFO
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        audit_logger.propagate = saved[2]
        access.setLevel(saved[3])


# -- the audit log -----------------------------------------------------------------------


def wait_for(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_each_sink_is_built_named_and_given_the_record_limit(tmp_path: Path) -> None:
    cfg = Audit(
        sinks=(
            AuditSink(type="file", path=tmp_path / "a.log", buffer_records=3),
            AuditSink(type="file", path=tmp_path / "b.log"),
        ),
        max_record_bytes=4096,
    )
    log = AuditLog(cfg)
    assert log.sinks == []
    log.start()
    try:
        assert [s.sink for s in log.sinks] == ["file-0", "file-1"]
        assert [s.max_record_bytes for s in log.sinks] == [4096, 4096]
        assert [s.capacity for s in log.sinks] == [3, 10_000]
        assert all(s.is_alive() for s in log.sinks)
        log.emit({"request_id": "r-1", "big": "x" * 8000})
        wait_for(lambda: lines(tmp_path / "a.log") and lines(tmp_path / "b.log"))
        for name in ("a.log", "b.log"):
            [record] = lines(tmp_path / name)
            assert record["request_id"] == "r-1" and record["truncated"]["bytes"] > 8000
        assert log.truncated() == {"file-0": 1, "file-1": 1}
        assert log.escaped() == {"file-0": 0, "file-1": 0}
        log.emit({"request_id": "r-2", "bad": "\ud800"})
        wait_for(lambda: len(lines(tmp_path / "b.log")) == 2)
        wait_for(lambda: log.escaped() == {"file-0": 1, "file-1": 1})
    finally:
        running = log.sinks
        log.stop()
    assert log.sinks == []
    assert not any(s.is_alive() for s in running)


def test_dropped_counts_a_full_buffer_and_failed_writes(tmp_path: Path) -> None:
    cfg = Audit(sinks=(AuditSink(type="file", path=tmp_path / "a.log", buffer_records=2),))
    log = AuditLog(cfg)
    log.start()
    [sink] = log.sinks
    sink.dropped, sink.failures = 3, 4
    try:
        assert log.dropped() == {"file-0": 7}
    finally:
        log.stop()


def test_the_opa_format_and_the_listening_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = Audit(sinks=(AuditSink(type="file", path=tmp_path / "a.log"),), format="opa", labels={"env": "t"})
    log = AuditLog(cfg)
    assert log.logger.name.startswith("vvault_pep.audit.")
    assert log.logger.level == logging.INFO
    assert AuditLog(cfg).logger.name != log.logger.name
    log.start()
    try:
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            log.emit(
                {"decision_id": "d-1", "path": "vvault/authz", "input": {"a": 1}}, result={"ok": 1}, has_result=True
            )
        wait_for(lambda: lines(tmp_path / "a.log"))
    finally:
        log.stop()
    [written] = lines(tmp_path / "a.log")
    assert written["decision_id"] == "d-1" and written["result"] == {"ok": 1}
    assert written["labels"]["env"] == "t" and written["input"] == {"a": 1}
    [handed] = [r for r in caplog.records if hasattr(r, "audit")]
    assert handed.getMessage() == "decision" and handed.levelno == logging.INFO
    assert handed.audit == written


def test_the_pep_format_writes_the_record_unchanged(tmp_path: Path) -> None:
    log = AuditLog(Audit(sinks=(AuditSink(type="file", path=tmp_path / "a.log"),)))
    log.start()
    try:
        log.emit({"request_id": "r-1", "status": 403}, result={"x": 1}, has_result=True)
        wait_for(lambda: lines(tmp_path / "a.log"))
    finally:
        log.stop()
    assert lines(tmp_path / "a.log") == [{"request_id": "r-1", "status": 403}]


def test_stop_waits_for_what_is_buffered(tmp_path: Path) -> None:
    log = AuditLog(Audit(sinks=(AuditSink(type="file", path=tmp_path / "a.log"),)))
    log.start()
    for i in range(20):
        log.emit({"n": i})
    log.stop()
    assert [r["n"] for r in lines(tmp_path / "a.log")] == list(range(20))


@pytest.mark.parametrize("extension", [True, False])
def test_the_opa_format_without_a_result_and_its_extension_block(tmp_path: Path, extension: bool) -> None:
    cfg = Audit(sinks=(AuditSink(type="file", path=tmp_path / "a.log"),), format="opa", extension=extension)
    log = AuditLog(cfg)
    log.start()
    try:
        log.emit({"decision_id": "d-2", "status": 403, "route": "r"})
        wait_for(lambda: lines(tmp_path / "a.log"))
    finally:
        log.stop()
    [written] = lines(tmp_path / "a.log")
    assert written["decision_id"] == "d-2"
    assert "result" not in written  # no policy answer: OPA's event has no result field
    if extension:
        assert written["vvault_pep"]["status"] == 403 and written["vvault_pep"]["route"] == "r"
    else:
        assert "vvault_pep" not in written


def test_stop_gives_each_sink_two_seconds_by_default(tmp_path: Path) -> None:
    log = AuditLog(Audit(sinks=(AuditSink(type="file", path=tmp_path / "a.log"),)))
    log.start()
    timeouts: list[float] = []
    for sink in log.sinks:
        real = sink.stop
        sink.stop = lambda t, real=real: (timeouts.append(t), real(t))[1]  # type: ignore[method-assign]
    log.stop()
    assert timeouts == [2.0]
    assert log.sinks == []
