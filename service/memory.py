"""Giving a worker's freed memory back to the kernel after heavy requests.

glibc keeps what a request freed in its arenas: a worker that tokenized 64 texts of 20,000
characters, or decoded 8 clips of 60 s, stayed 100-200 MB larger after them
(bench/hostile.py) although nothing held that memory any more. `malloc_trim(0)` returns the
free pages of every arena; it walks them (a few ms), so it runs on a decode thread, when the
worker has no request in flight, at most once a second, and only after a request that
sent at least `min_bytes` of text or files (a tokenized text holds ~40x its characters).

    trim = Trimmer(executor)
    with trim.request(nbytes): ...   # around a request's work
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import time
from concurrent.futures import Executor


def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Trimmer:
    def __init__(self, executor: Executor, min_bytes: int = 1 << 20, interval_s: float = 1.0):
        self.executor, self.min_bytes, self.interval_s = executor, min_bytes, interval_s
        self.trim = _malloc_trim()
        self.in_flight, self.heavy, self.pending, self.last = 0, False, False, 0.0
        self.count = 0  # trims run (tests)

    @contextlib.contextmanager
    def request(self, nbytes: int):
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.heavy |= nbytes >= self.min_bytes
            if self.heavy and not self.in_flight and not self.pending and self.trim is not None:
                self.pending = True
                self.executor.submit(self._trim, self.last + self.interval_s - time.monotonic())

    def _trim(self, wait_s: float) -> None:
        if wait_s > 0:  # trimmed less than a second ago: once more when that second is up
            time.sleep(wait_s)
        self.pending = False
        if self.in_flight:  # the next request's end trims
            return
        self.heavy, self.last = False, time.monotonic()
        self.trim(0)
        self.count += 1
