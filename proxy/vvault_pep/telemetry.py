"""Telemetry: OpenTelemetry traces, Prometheus metrics, owned by one runtime.

Providers and registries are per runtime, never the process-global ones, so
two PEPs in one process (tests) do not mix their data.

Traces go to the configured OTLP exporter (gRPC or HTTP; none by default).
When nothing receives spans, a request still gets a trace id (the trusted
caller's, or a fresh one) and ``traceparent`` still reaches OPA and the
upstream, but no span object is built: the SDK's span machinery costs tens of
microseconds per request for data nobody reads.

Metrics live in this runtime's Prometheus registry, served as text on the
admin listener's ``/metrics``.  The per-request instruments are
prometheus_client ones (a few µs per update; the OTel SDK's view machinery
costs ~10x that); values read at scrape time go through an OTel meter with a
Prometheus reader into the same registry.

* [vvault_pep_requests_total] — route, method class, status
* [vvault_pep_decisions_total] — result, code, enforced
* [vvault_pep_would_deny_total] — route, code (monitor mode)
* [vvault_pep_stage_duration_seconds] — stage
* [vvault_pep_cache_lookups_total] — layer
* [vvault_pep_pdp_errors_total] — code
* [vvault_pep_upstream_duration_seconds] — upstream, status class
* observed on scrape: JWKS fetches and failures per issuer, Redis errors,
  open client connections, audit records dropped per sink.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest

from . import __version__
from .config import Telemetry as TelemetryConfig

PROPAGATOR = TraceContextTextMapPropagator()
disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: the same exposition as before, less to scrape
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Telemetry:
    def __init__(self, cfg: TelemetryConfig, *, span_processors: Iterable[SpanProcessor] = ()) -> None:
        self.cfg = cfg
        resource = Resource.create({"service.name": cfg.service_name, "service.version": __version__})
        self.tracer_provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(cfg.traces.sample_ratio))
        )
        exporter = _span_exporter(cfg)
        if exporter is not None:
            self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        processors = list(span_processors)
        for processor in processors:
            self.tracer_provider.add_span_processor(processor)
        # Spans (server and per stage) only when someone receives them.
        self.recording = exporter is not None or bool(processors)
        self.tracer: Tracer = self.tracer_provider.get_tracer("vvault_pep", __version__)
        self._sample_bound = round(min(max(cfg.traces.sample_ratio, 0.0), 1.0) * (1 << 64))

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry, disable_target_info=True)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self._meter = self.meter_provider.get_meter("vvault_pep", __version__)
        self.requests = Counter(
            "vvault_pep_requests", "requests answered", ["route", "method_class", "status"], registry=registry
        )
        self.decisions = Counter(
            "vvault_pep_decisions", "decisions by result", ["result", "code", "enforced"], registry=registry
        )
        self.would_deny = Counter(
            "vvault_pep_would_deny", "denies not enforced (monitor mode)", ["route", "code"], registry=registry
        )
        self.stage_duration = Histogram(
            "vvault_pep_stage_duration_seconds", "time per stage of the walk", ["stage"],
            registry=registry, buckets=_STAGE_BUCKETS,
        )  # fmt: skip
        self.cache_lookups = Counter("vvault_pep_cache_lookups", "decision cache lookups by layer", ["layer"],
                                     registry=registry)  # fmt: skip
        self.pdp_errors = Counter("vvault_pep_pdp_errors", "OPA faults by code", ["code"], registry=registry)
        self.upstream_duration = Histogram(
            "vvault_pep_upstream_duration_seconds", "upstream round trip", ["upstream", "status_class"],
            registry=registry, buckets=_STAGE_BUCKETS,
        )  # fmt: skip
        trusted = cfg.trusted_trace_sources
        self._trusted_nets = [ipaddress.ip_network(c, strict=False) for c in trusted.cidrs]
        self._trusted_ids = frozenset(trusted.spiffe_ids)

    def labelled(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: label lookup is most of an update's cost."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(
        self,
        name: str,
        description: str,
        read: Callable[[], Mapping[tuple[tuple[str, str], ...], float]],
        *,
        gauge: bool = False,
    ) -> None:
        """Register a value read at scrape time: ``read()`` → {label pairs: value}."""

        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(v, dict(labels)) for labels, v in read().items()]

        if gauge:
            self._meter.create_observable_gauge(name, [callback], unit="{item}", description=description)
        else:
            self._meter.create_observable_counter(name, [callback], unit="1", description=description)

    def trusted_context(
        self, headers: Mapping[str, str], source_ip: str | None, spiffe_id: str | None
    ) -> otel_context.Context | None:
        """The caller's trace context, only when the caller is trusted to give one."""
        if "traceparent" not in headers:
            return None
        trusted = spiffe_id is not None and spiffe_id in self._trusted_ids
        if not trusted and source_ip is not None and self._trusted_nets:
            try:
                ip = ipaddress.ip_address(source_ip)
                trusted = any(ip in net for net in self._trusted_nets)
            except ValueError:
                trusted = False
        if not trusted:
            return None
        carrier = {k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
        return PROPAGATOR.extract(carrier)

    @contextlib.contextmanager
    def server_span(
        self, name: str, parent: otel_context.Context | None, attributes: Mapping[str, Any]
    ) -> Iterator[Span]:
        """The request's span: a real one when spans are received, else only its identity."""
        if self.recording:
            with self.tracer.start_as_current_span(
                name,
                context=parent,
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                yield span
            return
        remote = get_current_span(parent).get_span_context() if parent is not None else None
        if remote is not None and remote.is_valid:
            trace_id, flags, state = remote.trace_id, remote.trace_flags, remote.trace_state
        else:
            trace_id, state = random.getrandbits(128) or 1, None
            # The SDK's TraceIdRatioBased rule, so the upstream sees the same sampling either way.
            sampled = (trace_id & 0xFFFFFFFFFFFFFFFF) < self._sample_bound
            flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        ctx = SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=flags, trace_state=state)
        yield NonRecordingSpan(ctx)

    @staticmethod
    def inject(span: Span) -> dict[str, str]:
        """``traceparent``/``tracestate`` naming ``span`` as the parent, for OPA and upstreams."""
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return {}
        carrier = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
        if ctx.trace_state:
            carrier["tracestate"] = ctx.trace_state.to_header()
        return carrier

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _span_exporter(cfg: TelemetryConfig) -> Any:
    traces = cfg.traces
    if traces.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=traces.endpoint, insecure=traces.insecure)
    if traces.exporter == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=traces.endpoint)
    return None
