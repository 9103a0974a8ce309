"""The request path's own counters and histograms, as Prometheus reads them.

The walk updates them without locks (one thread); what matters to a user is the
exposition: cumulative buckets with ``le`` inclusive, sums and counts that add up, the
same names as before.  ``tests/test_audit.py`` checks them moving through a live PEP.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from vvault_pep.config import Telemetry as TelemetryConfig
from vvault_pep.observe.telemetry import Telemetry


def samples(tel: Telemetry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(tel.metrics_text().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    tel = Telemetry(TelemetryConfig())
    for value in (0.0001, 0.0002, 0.0025, 0.003, 20.0):  # 0.0001 and 0.0025 sit on a bound
        tel.stage_duration.observe(value, "authn")
    tel.stage_duration.observe(0.5, "pdp")
    got = samples(tel)

    def bucket(le: str, stage: str = "authn") -> float:
        return got[("vvault_pep_stage_duration_seconds_bucket", (("le", le), ("stage", stage)))]

    assert bucket("0.0001") == 1
    assert bucket("0.00025") == 2
    assert bucket("0.0025") == 3
    assert bucket("0.005") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert got[("vvault_pep_stage_duration_seconds_count", (("stage", "authn"),))] == 5
    assert abs(got[("vvault_pep_stage_duration_seconds_sum", (("stage", "authn"),))] - 20.0058) < 1e-9
    assert bucket("0.25", "pdp") == 0 and bucket("0.5", "pdp") == 1


def test_counters_keep_their_names_and_labels() -> None:
    tel = Telemetry(TelemetryConfig())
    tel.requests.inc("secrets", "read", "200")
    tel.requests.inc("secrets", "read", "200")
    tel.requests.inc("none", "unknown", "400")
    tel.decisions.inc("deny", "policy.tenant_not_entitled", "true")
    got = samples(tel)
    assert got[("vvault_pep_requests_total", (("method_class", "read"), ("route", "secrets"), ("status", "200")))] == 2
    assert got[("vvault_pep_requests_total", (("method_class", "unknown"), ("route", "none"), ("status", "400")))] == 1
    key = (("code", "policy.tenant_not_entitled"), ("enforced", "true"), ("result", "deny"))
    assert got[("vvault_pep_decisions_total", key)] == 1
    assert not any(name.endswith("_created") for name, _ in got)
