"""The benchmark harness's pure parts: round order, least-squares slope, vegeta's report, targets."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.lab import Endpoint, compile_package
from bench.proxy_bench import rounds_of
from bench.report import Target
from bench.soak import caches_full_s, slope_after, slope_per_minute
from bench.vegeta import Report, write_targets

VEGETA_JSON = {
    "latencies": {
        "total": 0,
        "mean": 0,
        "50th": 1_500_000,
        "90th": 2_000_000,
        "95th": 0,
        "99th": 9_000_000,
        "max": 12_000_000,
        "min": 0,
    },
    "requests": 1000,
    "rate": 200.0,
    "throughput": 199.5,
    "success": 0.99,
    "duration": 5_000_000_000,
    "wait": 1_000_000,
    "status_codes": {"200": 990, "503": 10},
    "errors": ["503 Service Unavailable"],
}


def test_every_round_visits_every_scenario_and_the_first_rotates() -> None:
    eps = [Endpoint(name, "http://x", None) for name in ("a", "b", "c")]
    order = [[ep.name for ep in r] for r in rounds_of(eps, 4)]
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


@pytest.mark.parametrize(
    ("points", "slope"),
    [
        ([(0, 50.0), (60, 50.0), (120, 50.0)], 0.0),
        ([(0, 50.0), (60, 52.0), (120, 54.0)], 2.0),
        ([(0, 60.0), (30, 59.5), (60, 59.0)], -1.0),
        ([(0, 50.0), (5, 51.0)], None),
    ],
)
def test_slope_is_megabytes_per_minute(points: list[tuple[float, float]], slope: float | None) -> None:
    got = slope_per_minute(points)
    assert got == slope if slope is None else got == pytest.approx(slope)


def test_the_soak_knows_when_its_caches_are_full_and_slopes_only_what_follows() -> None:
    assert caches_full_s((10_000, 5_000), 40) == 250
    assert caches_full_s((0, 0), 40) is None and caches_full_s((10_000,), 0) is None
    filling = [(float(t), 80 + t / 25) for t in range(0, 250, 5)]
    flat = [(float(t), 90.0) for t in range(250, 600, 5)]
    assert slope_per_minute([p for p in filling + flat if 150 <= p[0] < 300]) > 1  # a 5-min run: half sees the fill
    assert slope_after(filling + flat, 250, 600) == pytest.approx(0)
    assert slope_after(filling + flat, 250, 300) is None  # under a minute after it: no figure


def test_vegeta_report_in_milliseconds_and_any_non_2xx_is_a_failure() -> None:
    report = Report.parse(VEGETA_JSON, [Path("x.bin")])
    assert (report.p50_ms, report.p90_ms, report.p99_ms) == (1.5, 2.0, 9.0)
    assert report.duration_s == pytest.approx(5.001)
    assert not report.all_2xx
    assert not report.ran_out_of_targets
    assert Report.parse({**VEGETA_JSON, "status_codes": {"200": 1000}}, []).all_2xx


def test_targets_file_has_one_target_per_token(tmp_path: Path) -> None:
    path = write_targets(tmp_path / "t.txt", "https://127.0.0.1:1/p", ["t1", "t2"])
    assert path.read_text() == (
        "GET https://127.0.0.1:1/p\nAuthorization: Bearer t1\n\nGET https://127.0.0.1:1/p\nAuthorization: Bearer t2\n\n"
    )


@pytest.mark.parametrize(
    ("measured", "at_most", "met"),
    [(0.9, False, True), (0.7, False, False), (0.4, True, True), (0.6, True, False), (None, True, None)],
)
def test_a_target_says_whether_it_is_met(measured: float | None, at_most: bool, met: bool | None) -> None:
    assert Target("t", measured, 0.5 if at_most else 0.8, "", at_most=at_most).met is met


def test_every_measured_visit_is_preceded_by_an_unmeasured_one_of_the_same_load() -> None:
    from typing import Any

    from bench.proxy_bench import Bench, Sample, run_phase
    from bench.vegeta import Load

    calls: list[tuple[str, Load, bool]] = []
    report = Report.parse(VEGETA_JSON, [])

    class Recording(Bench):
        def measure(self, ep: Endpoint, load: Load, side: Any = "driver", *, settling: bool = False) -> Sample:
            calls.append((ep.name, load, settling))
            return Sample(report, None, 0.0, 0.0)

    bench = Recording(lab=None, vegeta=None, settle_s=0.5)  # type: ignore[arg-type]
    eps = [Endpoint(name, "http://x", None) for name in ("a", "b")]
    samples = run_phase(bench, eps, "t", 1, Load(100, 4, 5.0))
    assert [(n, s, load.seconds, load.rate) for n, load, s in calls] == [
        ("a", True, 0.5, 100),
        ("a", False, 5.0, 100),
        ("b", True, 0.5, 100),
        ("b", False, 5.0, 100),
    ]
    assert {k: len(v) for k, v in samples.items()} == {"a": 1, "b": 1}  # only the measured visits


def test_non_2xx_coming_out_of_idle_is_counted_apart_and_fails_nothing() -> None:
    from bench.proxy_bench import Bench

    bench = Bench(lab=None, vegeta=None)  # type: ignore[arg-type]
    ep = Endpoint("pep-opa", "http://x", None)
    bench._cold(ep, Report.parse(VEGETA_JSON, []))
    bench._cold(ep, Report.parse(VEGETA_JSON, []))
    assert bench.cold == {"pep-opa": {"503": 20}}
    assert bench.failures == {}


def test_the_lab_compiles_the_package_it_runs_even_where_bytecode_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    package = tmp_path / "vvault_pep"
    (package / "app").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "app" / "walk.py").write_text("STEP = 1\n")
    compile_package(tmp_path)
    compiled = {p.name.split(".")[0] for p in package.rglob("__pycache__/*.pyc")}
    assert compiled == {"__init__", "walk"}
