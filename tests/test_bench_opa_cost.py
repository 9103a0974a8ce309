"""bench.opa_policy_cost's parts, against the real OPA: the constant-decision policy it
measures OPA's floor with, the library's evaluation cost, and its refusal to measure an
undefined decision (which would cost less than a real one and say nothing)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import pytest
from bench.common import ROOT
from bench.opa_gc import example_bodies
from bench.opa_policy_cost import FLOOR_VALUE, eval_cost, floor_module, require_results
from tests.support import opa_binary, run_on_own_loop

pytestmark = pytest.mark.timeout(120)


def _floor_dir(tmp_path: Path, path: str) -> Path:
    (tmp_path / "floor.rego").write_text(floor_module(path))
    return tmp_path


def test_the_floor_answers_a_constant_decision_at_the_asked_path(tmp_path: Path) -> None:
    policies = _floor_dir(tmp_path, "/vvault/authz/decision/")
    done = subprocess.run(
        [opa_binary(), "eval", "-d", str(policies), "--format", "json", "data.vvault.authz.decision"],
        capture_output=True,
        check=True,
    )
    assert orjson.loads(done.stdout)["result"][0]["expressions"][0]["value"] == FLOOR_VALUE


@pytest.mark.parametrize(
    "path", ["decision", "vvault/", "vvault/au-thz/decision", "vvault//decision", "1a/decision", ""]
)
def test_a_path_that_names_no_package_and_rule_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="--path"):
        floor_module(path)


def test_eval_cost_reads_opa_bench_for_the_library_and_each_input() -> None:
    body = example_bodies()[0]
    cost = eval_cost(ROOT / "policies", orjson.dumps(orjson.loads(body)["input"]), "vvault/authz/decision")
    assert cost.allocs_per_op > 0 and cost.bytes_per_op > 0 and cost.ns_per_op > 0


def test_an_input_without_a_decision_stops_the_measurement(tmp_path: Path) -> None:
    policies = _floor_dir(tmp_path, "vvault/authz/decision")
    bodies = example_bodies()
    run_on_own_loop(require_results(policies, bodies, "vvault/authz/decision"))  # every input answered: no error
    with pytest.raises(SystemExit, match="input 1: no decision at vvault/authz/other"):
        run_on_own_loop(require_results(policies, bodies, "vvault/authz/other"))
