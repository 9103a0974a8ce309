"""Telemetry: OpenTelemetry traces, Prometheus metrics, owned by one runtime.

Providers and registries are per runtime, never the process-global ones, so
two PEPs in one process (tests) do not mix their data.

Traces go to the configured OTLP exporter (gRPC or HTTP; none by default).
When nothing receives spans, a request still gets a trace id (the trusted
caller's, or a fresh one) and ``traceparent`` still reaches OPA and the
upstream, but no span object is built: the SDK's span machinery costs tens of
microseconds per request for data nobody reads.

Metrics live in this runtime's Prometheus registry, served as text on the
admin listener's ``/metrics``.  The per-request instruments are plain
counters and histograms kept by the event loop's thread (:class:`LoopCounter`,
:class:`LoopHistogram`: well under a µs per update, where the OTel SDK's view
machinery costs tens and prometheus_client's locked metrics a few); values
read at scrape time are collected from the parts that own them at scrape time.
No OTel meter sits in between: its Prometheus bridge added ``otel_scope_*``
labels to every series and was the one beta dependency.

* [vvault_pep_requests_total] — route, method class, status
* [vvault_pep_decisions_total] — result, code, enforced
* [vvault_pep_would_deny_total] — route, code (monitor mode)
* [vvault_pep_stage_duration_seconds] — stage
* [vvault_pep_cache_lookups_total] — result (hit/miss/bypass), layer (l1/l2/opa)
* [http_server_request_duration_seconds] — OTel's HTTP server duration, by method, route, status
* [vvault_pep_build_info] — version, python; process_* (CPU, memory, open fds)
* [vvault_pep_pdp_errors_total] — code
* [vvault_pep_upstream_duration_seconds] — upstream, status class
* observed on scrape: JWKS fetches and failures per issuer, Redis errors,
  open client connections, audit records dropped per sink.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import platform
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracer,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..config.models import Telemetry as TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

PROPAGATOR = TraceContextTextMapPropagator()
disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: the same exposition as before, less to scrape
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# OTel HTTP semantic conventions: http.server.request.duration's advised boundaries.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# http.request.method: the methods the conventions know; any other is reported as _OTHER.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"})
# Codes whose series exist from the first scrape (at 0), so rate() and alerts see them at once.
PDP_ERROR_CODES = ("pdp.error", "pdp.timeout", "pdp.unavailable")
CACHE_RESULTS = (("hit", "l1"), ("hit", "l2"), ("miss", "opa"), ("bypass", "opa"))
_CACHE_LAYER = {"l1": ("hit", "l1"), "l2": ("hit", "l2"), "miss": ("miss", "opa"), "bypass": ("bypass", "opa")}


def method_of(method: str) -> str:
    """``http.request.method`` as the conventions want it: known methods as they are, else ``_OTHER``."""
    return method if method in KNOWN_METHODS else "_OTHER"


class Telemetry:
    def __init__(self, cfg: TelemetryConfig, *, span_processors: Iterable[SpanProcessor] = ()) -> None:
        self.cfg = cfg
        exporter = _span_exporter(cfg)
        processors = list(span_processors)
        # Spans (server and per stage) only when someone receives them; the SDK's tracer
        # (and its import, ~0.45 MB) only then too.
        self.recording = exporter is not None or bool(processors)
        self.tracer_provider: TracerProvider | None = None
        self.tracer: Tracer = NoOpTracer()
        if self.recording:
            self.tracer_provider = _tracer_provider(cfg, exporter, processors)
            self.tracer = self.tracer_provider.get_tracer("vvault_pep", __version__)
        self._sample_bound = round(min(max(cfg.traces.sample_ratio, 0.0), 1.0) * (1 << 64))

        self.registry = registry = CollectorRegistry()
        self._observed: list[tuple[str, str, Callable[[], Mapping[tuple[tuple[str, str], ...], float]], bool]] = []
        self.requests = LoopCounter("vvault_pep_requests", "requests answered", ("route", "method_class", "status"))
        self.decisions = LoopCounter("vvault_pep_decisions", "decisions by result", ("result", "code", "enforced"))
        self.would_deny = LoopCounter("vvault_pep_would_deny", "denies not enforced (monitor mode)", ("route", "code"))
        self.stage_duration = LoopHistogram(
            "vvault_pep_stage_duration_seconds", "time per stage of the walk", ("stage",), _STAGE_BUCKETS
        )
        self.cache_lookups = LoopCounter(
            "vvault_pep_cache_lookups",
            "decision cache lookups: hit, miss or bypass, and the layer",
            ("result", "layer"),
        )
        for result_layer in CACHE_RESULTS:
            self.cache_lookups.values[result_layer] = 0.0
        self.pdp_errors = LoopCounter("vvault_pep_pdp_errors", "OPA faults by code", ("code",))
        for code in PDP_ERROR_CODES:
            self.pdp_errors.values[(code,)] = 0.0
        self.upstream_duration = LoopHistogram(
            "vvault_pep_upstream_duration_seconds", "upstream round trip", ("upstream", "status_class"), _STAGE_BUCKETS
        )
        self.http_duration = LoopHistogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests (OTel http.server.request.duration)",
            ("http_request_method", "http_route", "http_response_status_code", "url_scheme"),
            _HTTP_BUCKETS,
        )
        registry.register(
            _LoopCollector(
                [self.requests, self.decisions, self.would_deny, self.cache_lookups, self.pdp_errors],
                [self.stage_duration, self.upstream_duration, self.http_duration],
            )
        )
        registry.register(_ObservedCollector(self._observed))
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, …
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
        """Register a value read at scrape time: ``read()`` → {label pairs: value}.

        ``vvault_pep.jwks.fetches`` is exposed as ``vvault_pep_jwks_fetches_total`` (a counter)
        or ``vvault_pep_connections_open`` (a gauge).
        """
        self._observed.append((name.replace(".", "_"), description, read, gauge))

    def cache_lookup(self, layer: str) -> None:
        self.cache_lookups.inc(*_CACHE_LAYER.get(layer, ("miss", "opa")))

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
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


class LoopCounter:
    """A labelled counter updated from the event loop's thread only: no lock per update.

    prometheus_client's metrics take a lock on every update (they may be shared by
    threads); the walk updates a dozen series per request from one thread, and a scrape
    reads them from that same thread, so a dict does.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + 1.0

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        return family


class LoopHistogram:
    """A labelled histogram updated from the event loop's thread only (see LoopCounter)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = buckets
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        series[0][bisect.bisect_left(self.bounds, value)] += 1  # first bucket with value <= le
        series[1][0] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, (counts, total) in self.series.items():
            cumulative, running = [], 0
            for le, n in zip((*map(floatToGoString, self.bounds), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((le, running))
            family.add_metric(list(labels), cumulative, total[0])
        return family


class _LoopCollector(Collector):
    def __init__(self, counters: list[LoopCounter], histograms: list[LoopHistogram]) -> None:
        self.counters, self.histograms = counters, histograms

    def collect(self) -> Iterable[Metric]:
        for counter in self.counters:
            yield counter.family()
        for histogram in self.histograms:
            yield histogram.family()


class _ObservedCollector(Collector):
    """Values owned elsewhere (JWKS, Redis, sinks, connections), read at scrape time."""

    def __init__(
        self, observed: list[tuple[str, str, Callable[[], Mapping[tuple[tuple[str, str], ...], float]], bool]]
    ) -> None:
        self.observed = observed

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "vvault_pep_build_info", "the running PEP's version (always 1)", labels=("version", "python")
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        for name, description, read, gauge in self.observed:
            values = read()
            names = sorted({k for labels in values for k, _ in labels})
            family: CounterMetricFamily | GaugeMetricFamily
            if gauge:
                family = GaugeMetricFamily(name, description, labels=names)
            else:
                family = CounterMetricFamily(name, description, labels=names)
            for labels, value in values.items():
                by_name = dict(labels)
                family.add_metric([by_name.get(n, "") for n in names], value)
            yield family


def _tracer_provider(cfg: TelemetryConfig, exporter: Any, processors: list[SpanProcessor]) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": cfg.service_name, "service.version": __version__})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(cfg.traces.sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _span_exporter(cfg: TelemetryConfig) -> Any:
    traces = cfg.traces
    if traces.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=traces.endpoint, insecure=traces.insecure)
    if traces.exporter == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=traces.endpoint)
    return None
