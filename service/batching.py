"""The one adaptive-batching path under every prediction route, and its admission control.

BentoML's `CorkDispatcher` (the dispatcher behind `@bentoml.api(batchable=True)`) runs inside
the service process: a request's prepared inputs join the queue and the model runs once per
batch. The earlier design sent every request on to a second, batchable BentoML service; that
second HTTP hop with its JSON cost more CPU than the model on this 2-core machine
(bench/RESULTS.md), so the batch now forms where the request arrives.

Admission: BentoML's own rule sheds a request when the queue's estimated latency passes a
fixed bound (2 s here before), which shed closed-loop bursts that the server would have
answered in 3 s (65 of 109 requests of 64 clients x 8 texts). A closed loop of bounded
concurrency cannot grow the queue without bound, so a request is refused only when (a) the
queue has no room for its items or (b) the time to answer it, estimated from the measured
batch times, exceeds the client-facing timeout. Requests already queued are cancelled only
past that timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from service import metrics
from service.errors import InputError
from service.runtime import Prepared, Runtime
from service.threads import name_os_thread


def shed(reason: str, detail: str, retry_after_s: float) -> InputError:
    """A 503 that tells the client when to come back."""
    e = InputError("overloaded", detail, status=503)
    e.retry_after = max(1, math.ceil(retry_after_s))
    e.shed_reason = reason
    return e


class BatchTimes:
    """Batch time = fixed + per_item x items, fitted on the latest batches (least squares)."""

    def __init__(self, keep: int = 64) -> None:
        self.points: deque[tuple[int, float]] = deque(maxlen=keep)
        self.fixed_s, self.per_item_s = 0.0, 0.0

    def add(self, items: int, seconds: float) -> None:
        self.points.append((items, seconds))
        n = np.asarray([p[0] for p in self.points], dtype=np.float64)
        t = np.asarray([p[1] for p in self.points], dtype=np.float64)
        if np.ptp(n) > 0:
            slope, intercept = np.polyfit(n, t, 1)
            self.per_item_s, self.fixed_s = max(slope, 0.0), max(intercept, 0.0)
        else:  # one batch size seen so far: all of it counts as per-item time (pessimistic)
            self.per_item_s, self.fixed_s = float(t.mean() / n[0]), 0.0

    def drain_s(self, items: int, max_batch_size: int) -> float:
        """Seconds to run `items` queued items in batches of at most `max_batch_size`."""
        return math.ceil(items / max_batch_size) * self.fixed_s + items * self.per_item_s


class Batcher:
    """`await batcher(items)` -> logits for those items, computed inside a shared batch."""

    def __init__(
        self,
        rt: Runtime,
        max_batch_size: int,
        timeout_s: float = 30.0,
        monitor=None,
        max_queue_items: int = 4096,
    ) -> None:
        self.rt, self.monitor = rt, monitor  # monitor: service.drift.Monitor or None
        self.max_batch_size, self.timeout_s = max_batch_size, timeout_s
        self.max_queue_items = max_queue_items
        self.queued = 0  # items admitted and not yet answered
        self.times = BatchTimes()
        # One ONNX Runtime call at a time, always from the same thread: the CUDA provider keeps
        # cuDNN/cuBLAS handles per calling thread, so a thread pool would create them anew.
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="onnxruntime", initializer=name_os_thread
        )
        # On this thread: CUDA handles, caches. Its timings seed the batch-time estimate.
        for n, seconds in self._thread.submit(rt.warm_up).result():
            self.times.add(n, seconds)
        dispatcher = CorkDispatcher(
            # BentoML cancels a queued request whose estimated latency passes this bound: the
            # timeout, so that only requests the client would have given up on are dropped.
            max_latency_in_ms=int(timeout_s * 1000),
            max_batch_size=max_batch_size,
            fallback=self._timed_out,
            get_batch_size=len,
            batch_dim=(0, 0),
        )
        self._dispatcher, self._call = dispatcher, dispatcher(self._run_batch)

    def close(self) -> None:
        """Stop the dispatcher's controller task and the inference thread."""
        self._dispatcher.shutdown()
        self._thread.shutdown(wait=False)

    def _timed_out(self):
        raise shed(
            "timeout",
            f"the request could not be answered within {self.timeout_s:g} s "
            "(TUNESERVE_REQUEST_TIMEOUT_S); retry later",
            self.times.drain_s(self.queued, self.max_batch_size),
        )

    def admit(self, n: int) -> None:
        """Raise a 503 InputError when `n` more items cannot be answered in time."""
        waiting = self.queued + n
        if waiting > self.max_queue_items:
            raise shed(
                "queue_full",
                f"the model queue holds {self.queued} items; {n} more would pass its "
                f"capacity of {self.max_queue_items} (TUNESERVE_MAX_QUEUE_ITEMS)",
                self.times.drain_s(self.queued, self.max_batch_size),
            )
        eta = self.times.drain_s(waiting, self.max_batch_size)
        if eta > self.timeout_s:
            raise shed(
                "deadline",
                f"the model queue holds {self.queued} items, about {eta:.1f} s of work with "
                f"these {n}; the timeout is {self.timeout_s:g} s (TUNESERVE_REQUEST_TIMEOUT_S)",
                eta - self.timeout_s,
            )

    async def __call__(self, items: list[Prepared]):
        """The task's outputs for `items` (classification: their logits rows)."""
        try:
            self.admit(len(items))
        except InputError as e:
            metrics.shed(self.rt, e.shed_reason)
            raise
        self.queued += len(items)
        metrics.queue(self.rt, self.queued)
        try:
            return await self._call(items)
        except InputError as e:
            if e.shed_reason:
                metrics.shed(self.rt, e.shed_reason)
            raise
        finally:
            self.queued -= len(items)
            metrics.queue(self.rt, self.queued)

    async def _run_batch(self, jobs: Sequence[list[Prepared]]) -> list:
        flat = [item for job in jobs for item in job]
        stats: dict = {}
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        outputs, embedding = await loop.run_in_executor(self._thread, self.rt.run, flat, stats)
        seconds = time.perf_counter() - t0
        self.times.add(len(flat), seconds)
        metrics.batch(self.rt, len(flat), seconds)
        metrics.inputs(self.rt, stats)
        if self.monitor is not None:  # a few numpy operations per batch
            self.monitor.observe_samples(self.rt.contract.drift_samples(outputs, embedding, stats))
        ends = np.cumsum([len(job) for job in jobs])
        return [outputs[end - len(job) : end] for job, end in zip(jobs, ends, strict=True)]
