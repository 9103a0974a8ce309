"""The heap trimmer: what a burst freed in the middle of the C heap goes back to the kernel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.conftest import Upstream
from tests.support import OpaProcess, config_doc
from tests.test_conventions import running, scrape

# A burst's leftovers: 64 KiB blocks (malloc'd from the heap, under the mmap threshold),
# every tenth kept alive, so that the freed runs between them are not at the heap's top.
BURST = """
import sys
from vvault_pep.app.heap import HeapTrimmer, _resident_bytes

trimmer = HeapTrimmer(float(sys.argv[1]))
base = _resident_bytes()
blocks = [bytes(65536) for _ in range(400)]
kept = blocks[9::10]
del blocks
left = _resident_bytes()
released = trimmer.trim()
print(trimmer.enabled, base, left, released, _resident_bytes(), trimmer.trims)
"""


def _burst(interval_s: float) -> tuple[bool, int, int, int, int, int]:
    done = subprocess.run([sys.executable, "-c", BURST, str(interval_s)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    enabled, *figures = done.stdout.split()
    base, left, released, after, trims = (int(f) for f in figures)
    return enabled == "True", base, left, released, after, trims


def test_a_trim_gives_back_the_freed_runs_a_burst_left_in_the_heap() -> None:
    enabled, base, left, released, after, trims = _burst(10.0)
    assert enabled and trims == 1
    freed = 360 * 65536  # some of it is carved from memory the heap already held
    assert left - base > freed / 2  # without a trim the freed runs stay resident
    assert released > freed / 2, (base, left, released)
    assert after < left - freed / 2


def test_a_trimmer_set_to_never_trims_and_the_memory_stays() -> None:
    enabled, base, left, released, after, trims = _burst(0.0)
    assert not enabled and trims == 0 and released == 0
    assert abs(after - left) < 1 << 20 and after - base > 360 * 65536 / 2


async def test_the_pep_trims_on_its_interval_and_says_so_on_metrics(
    pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, limits={"heap_trim_interval_s": 0.05})
    async with running(doc) as pep:
        async with asyncio.timeout(20):
            while True:
                _, samples = await scrape(pep)
                if samples.get(("vvault_pep_heap_trims_total", ()), 0) >= 3:
                    break
                await asyncio.sleep(0.05)
    assert samples[("vvault_pep_heap_trim_seconds_total", ())] > 0
    assert ("vvault_pep_heap_released_bytes_total", ()) in samples


async def test_a_pep_told_never_to_trim_runs_no_trimmer_and_shows_no_series(
    pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, limits={"heap_trim_interval_s": 0})
    async with running(doc) as pep:
        _, samples = await scrape(pep)
        assert pep._heap_task is None
    assert not [name for name, _ in samples if name.startswith("vvault_pep_heap_")]
