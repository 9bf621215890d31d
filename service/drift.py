"""The service's drift window (DESIGN.md §4): per-batch summaries from the request path, kept
for the latest samples and scored by a background thread. The statistics and the calibrated
thresholds are the task contract's (`tasks/drift.py`), shared with export.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from tasks.drift import (  # noqa: F401  (re-exported: the names the service's tests use)
    CHECKS,
    WINDOW,
    Samples,
    Summary,
    calibrate,
    chi_square,
    ks_distance,
    pca_basis,
    project,
    statistics,
    summarize,
    summarize_samples,
)


class Monitor:
    """Keeps the latest `window` samples younger than `max_age_s`; `scores()` is statistic /
    threshold per check, computed only when samples arrived since the previous call."""

    def __init__(self, drift: dict, max_age_s: float = 900.0) -> None:
        self.ref, self.basis = drift, drift["basis"]
        self.window, self.max_age_s = int(drift["window"]), max_age_s
        self._parts: list[tuple[float, Summary]] = []  # (monotonic time observed, summary)
        self._n = 0
        self._fresh = False  # samples arrived since the latest scores()
        self._lock = threading.Lock()

    def observe(self, logits: np.ndarray, embedding: np.ndarray, inputs, now=None) -> None:
        """A batch of classification outputs."""
        self.observe_samples(Samples.from_logits(logits, embedding, inputs), now)

    def observe_samples(self, samples: Samples, now=None) -> None:
        """A batch as the task summarises it (`Task.drift_samples`)."""
        part = summarize_samples(samples, self.basis)
        with self._lock:
            self._parts.append((time.monotonic() if now is None else now, part))
            self._n += len(part)
            self._fresh = True
            while self._n - len(self._parts[0][1]) >= self.window:
                self._n -= len(self._parts.pop(0)[1])

    def _expire(self, now: float | None) -> None:
        cutoff = (time.monotonic() if now is None else now) - self.max_age_s
        while self._parts and self._parts[0][0] < cutoff:
            self._n -= len(self._parts.pop(0)[1])

    def samples(self, now: float | None = None) -> int:
        """Samples in the window, after dropping those older than `max_age_s`."""
        with self._lock:
            self._expire(now)
            return min(self._n, self.window)

    def scores(self, now: float | None = None) -> dict[str, float] | None:
        """None while the window is not full or nothing new arrived since the last call."""
        with self._lock:
            self._expire(now)
            if self._n < self.window or not self._fresh:
                return None
            self._fresh = False
            s = Summary.concat([p for _, p in self._parts])
        s = s.take(np.arange(len(s) - self.window, len(s)))
        stats = statistics(s, self.ref)
        return {c: v / self.ref["thresholds"][c] for c, v in stats.items()}
