"""bench.module_check against the real OPA: both ways of reading the listing name one revision."""

from __future__ import annotations

import subprocess
import sys

import pytest
from bench.common import ROOT

pytestmark = pytest.mark.timeout(120)


def test_both_ways_name_the_same_revision_and_the_figures_are_printed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.module_check", "--checks", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("GET /v1/policies: ") and lines[0].endswith("; 3 checks")
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert set(rows) == {"whole", "sources"}
    assert all(float(row[1]) > 0 for row in rows.values())
    assert lines[-1].startswith("same revision: yes (p:")
