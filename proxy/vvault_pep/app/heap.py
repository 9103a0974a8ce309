"""Giving freed heap memory back to the kernel, every few seconds.

glibc's ``malloc`` returns memory to the kernel only from the top of its heap (and
whole ``mmap`` blocks).  What a burst frees in the middle (OpenSSL's buffers of
connections since closed, bodies and records over Python's small-object size,
the audit sink's encoded batches) stays resident behind whatever live block sits
above it, so a worker's RSS ratchets up with each burst and never comes down.
``malloc_trim(0)`` walks the heap and hands every whole free page back
(``madvise``), keeping the memory mapped for reuse.

Measured on the bench's pep-l1 after 5 s at saturation with 16 connections: RSS
2.3 MB lower after one trim, which took 0.3 ms of the event loop.  A trim every
``limits.heap_trim_interval_s`` (10 s by default; 0: never) costs about 0.03 ms a
second.  It runs on the loop's thread (the call releases the GIL): a thread of its
own would grow a malloc arena of its own, the kind of memory a trim gives back.

Only on glibc: musl's and the BSDs' allocators return freed memory themselves, and
there the trimmer does not start.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded: the process's own C library
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Trims the C heap every ``interval_s``; counts trims, their time and what they gave back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._trim = _malloc_trim() if interval_s > 0 else None
        self.trims = 0
        self.seconds = 0.0
        self.released_bytes = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def trim(self) -> int:
        """Trim now; the bytes of RSS it gave back (0 when it gave back none, or cannot tell)."""
        if self._trim is None:
            return 0
        before = _resident_bytes()
        started = time.perf_counter()
        self._trim(0)
        self.seconds += time.perf_counter() - started
        self.trims += 1
        after = _resident_bytes()
        released = before - after if before is not None and after is not None and before > after else 0
        self.released_bytes += released
        return released

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.trim()
