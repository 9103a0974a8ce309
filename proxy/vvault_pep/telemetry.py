"""Telemetry: OpenTelemetry traces and metrics, owned by one runtime.

Providers are per runtime, never the process-global ones, so two PEPs in one
process (tests) do not mix their data.  Traces go to the configured OTLP
exporter (gRPC or HTTP; none by default).  Metrics are read by a Prometheus
reader into this runtime's own registry and served as text on the admin
listener's ``/metrics``.

Instrument names (Prometheus form in brackets):

* ``vvault_pep.requests`` [vvault_pep_requests_total] — route, method class, status
* ``vvault_pep.decisions`` [vvault_pep_decisions_total] — result, code, enforced
* ``vvault_pep.would_deny`` [vvault_pep_would_deny_total] — route, code (monitor mode)
* [vvault_pep_stage_duration_seconds] — stage (a prometheus_client histogram: see below)
* ``vvault_pep.cache.lookups`` [vvault_pep_cache_lookups_total] — layer
* ``vvault_pep.pdp.errors`` [vvault_pep_pdp_errors_total] — code
* ``vvault_pep.upstream.duration`` [vvault_pep_upstream_duration_seconds] — upstream, status class
* observed on scrape: JWKS fetches and failures per issuer, Redis errors,
  open client connections, audit records dropped per sink.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from . import __version__
from .config import Telemetry as TelemetryConfig

PROPAGATOR = TraceContextTextMapPropagator()
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
        # Per-stage child spans cost real time per request: only when someone receives them.
        self.stage_spans = exporter is not None or bool(processors)
        self.tracer: Tracer = self.tracer_provider.get_tracer("vvault_pep", __version__)

        self.registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=self.registry, disable_target_info=True)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self.meter_provider.get_meter("vvault_pep", __version__)
        self.requests = meter.create_counter("vvault_pep.requests", unit="1", description="requests answered")
        self.decisions = meter.create_counter("vvault_pep.decisions", unit="1", description="decisions by result")
        self.would_deny = meter.create_counter(
            "vvault_pep.would_deny", unit="1", description="denies not enforced (monitor mode)"
        )
        # Several observations per request: the OTel SDK's histogram costs ~50 µs each, so this
        # one is a prometheus_client histogram in the same registry (~2 µs), same name.
        self.stage_duration = Histogram(
            "vvault_pep_stage_duration_seconds", "time per stage of the walk", ["stage"],
            registry=self.registry, buckets=_STAGE_BUCKETS,
        )  # fmt: skip
        self.cache_lookups = meter.create_counter("vvault_pep.cache.lookups", unit="1", description="by layer")
        self.pdp_errors = meter.create_counter("vvault_pep.pdp.errors", unit="1", description="OPA faults by code")
        self.upstream_duration = meter.create_histogram(
            "vvault_pep.upstream.duration", unit="s", description="upstream round trip",
            explicit_bucket_boundaries_advisory=_STAGE_BUCKETS,
        )  # fmt: skip
        self._meter = meter
        trusted = cfg.trusted_trace_sources
        self._trusted_nets = [ipaddress.ip_network(c, strict=False) for c in trusted.cidrs]
        self._trusted_ids = frozenset(trusted.spiffe_ids)

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

    def inject(self) -> dict[str, str]:
        """``traceparent``/``tracestate`` for the current span, to send to OPA and upstreams."""
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
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
