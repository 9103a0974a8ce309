"""The OTLP audit sink against real collectors: OTLP/HTTP, OTLP/gRPC in plaintext and over TLS.

What a collector receives is checked: one log record per audit record, its body the record's
JSON line, its few indexable attributes, the instrumentation scope — and that the transport
is the one the config names (an ``http://`` endpoint is plaintext whatever the environment
says; an endpoint without a scheme is TLS).
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.test_proofs_sinks import wait_for

from vvault_pep.config import AuditSink
from vvault_pep.observe import sinks
from vvault_pep.observe.sinks import encode


def log_records(raw: list[bytes]) -> list[Any]:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    out = []
    for body in raw:
        request = ExportLogsServiceRequest()
        request.ParseFromString(body)
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                out.extend((sl.scope.name, lr) for lr in sl.log_records)
    return out


AUDIT = {"decision_id": "d-1", "request_id": "r-1", "trace_id": "t-1", "route": 7, "status": 403, "s": "\ud800"}


def check_shipped(raw: list[bytes]) -> None:
    [(scope, record)] = log_records(raw)
    assert scope == "vvault_pep.audit"
    line = encode(dict(AUDIT), 16_384)[0]
    assert record.body.string_value == line[:-1].decode() and line.endswith(b"}\n")
    assert {a.key: a.value.string_value for a in record.attributes} == {
        "decision_id": "d-1",
        "request_id": "r-1",
        "trace_id": "t-1",
        "route": "7",
    }


def test_the_otlp_sink_over_http() -> None:
    received: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))  # type: ignore[arg-type]
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = AuditSink(type="otlp", protocol="http", endpoint=f"http://127.0.0.1:{server.server_port}/v1/logs")
        sink = sinks._OtlpSink("otlp-3", cfg)
        assert (sink.sink, sink.name, sink.capacity) == ("otlp-3", "audit-sink-otlp-3", 10_000)
        sink.write([dict(AUDIT)])
        sink.close()  # flushes
        wait_for(lambda: received)
    finally:
        server.shutdown()
        server.server_close()
    assert [p for p, _ in received] == ["/v1/logs"]  # type: ignore[misc]
    check_shipped([b for _, b in received])  # type: ignore[misc]
    assert sink.escaped == 1


class GrpcCollector:
    """A real OTLP/gRPC logs collector, plaintext or TLS."""

    def __init__(self, tls: tuple[bytes, bytes] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

        self.received: list[bytes] = []
        outer = self

        class Servicer(logs_service_pb2_grpc.LogsServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                outer.received.append(request.SerializeToString())
                return logs_service_pb2.ExportLogsServiceResponse()

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Servicer(), self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("localhost:0", grpc.ssl_server_credentials([tls]))
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def test_the_otlp_sink_over_plaintext_grpc_whatever_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # an http:// endpoint is plaintext because the config says so, not because the environment does
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_INSECURE", "false")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "false")
    collector = GrpcCollector()
    try:
        sink = sinks._OtlpSink("otlp-0", AuditSink(type="otlp", endpoint=f"http://127.0.0.1:{collector.port}"))
        assert AuditSink(type="otlp", endpoint="http://x").protocol == "grpc"
        sink.write([dict(AUDIT)])
        sink.close()
        wait_for(lambda: collector.received)
    finally:
        collector.stop()
    check_shipped(collector.received)


def test_the_otlp_sink_over_grpc_with_tls(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an endpoint without a scheme is not plaintext: TLS, with the CA the environment names
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE", str(pki / "ca.pem"))
    collector = GrpcCollector(tls=((pki / "server-key.pem").read_bytes(), (pki / "server.pem").read_bytes()))
    try:
        sink = sinks._OtlpSink("otlp-0", AuditSink(type="otlp", endpoint=f"localhost:{collector.port}"))
        sink.write([dict(AUDIT)])
        sink.close()
        wait_for(lambda: collector.received)
    finally:
        collector.stop()
    check_shipped(collector.received)
