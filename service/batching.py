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
import logging
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

log = logging.getLogger("tuneserve")


def shed(reason: str, detail: str, retry_after_s: float) -> InputError:
    """A 503 that tells the client when to come back."""
    e = InputError("overloaded", detail, status=503)
    e.retry_after = max(1, math.ceil(retry_after_s))
    e.shed_reason = reason
    return e


class BatchTimes:
    """Batch time = fixed + per_cost x cost, fitted on the latest batches (least squares). The
    cost of an item is 1, or its tokens for windowed texts (`Prepared.cost`)."""

    def __init__(self, keep: int = 64) -> None:
        self.points: deque[tuple[int, float]] = deque(maxlen=keep)
        self.fixed_s, self.per_item_s = 0.0, 0.0  # per_item_s: per unit of cost

    def add(self, cost: int, seconds: float) -> None:
        self.points.append((cost, seconds))
        n = np.asarray([p[0] for p in self.points], dtype=np.float64)
        t = np.asarray([p[1] for p in self.points], dtype=np.float64)
        if np.ptp(n) > 0:
            slope, intercept = np.polyfit(n, t, 1)
            self.per_item_s, self.fixed_s = max(slope, 0.0), max(intercept, 0.0)
        else:  # one batch size seen so far: all of it counts as per-item time (pessimistic)
            self.per_item_s, self.fixed_s = float(t.mean() / n[0]), 0.0

    def drain_s(self, items: int, max_batch_size: int, cost: int | None = None) -> float:
        """Seconds to run `items` queued items (of `cost` in all; default 1 each) in batches
        of at most `max_batch_size`."""
        cost = items if cost is None else cost
        return math.ceil(items / max_batch_size) * self.fixed_s + cost * self.per_item_s


def cost_of(items) -> int:
    """The batcher's measure of work in `items`: `Prepared.cost` (1 for anything else)."""
    return sum(getattr(item, "cost", 1) for item in items)


def bytes_of(items) -> int:
    """The memory `items` hold while queued: `Prepared.nbytes` (0 for anything else)."""
    return sum(getattr(item, "nbytes", 0) for item in items)


class MemoryAdmission:
    """The queue's memory cap, shared by the Batcher and the Generator (generation.py):
    needs `max_queue_bytes`, `queued_bytes` and `drain_s()`."""

    def admit_bytes(self, nbytes: int) -> None:
        """Raise an InputError when inputs holding `nbytes` do not fit the queue's memory:
        the service asks before it decodes a request (from the task's size per input), the
        batcher again with what the inputs hold once decoded."""
        cap, mib = self.max_queue_bytes, 1 << 20
        if nbytes > cap:
            e = InputError(
                "request_too_large",
                f"these inputs hold about {nbytes / mib:.0f} MiB once decoded; the queue of a "
                f"worker holds {cap / mib:.0f} MiB (TUNESERVE_MAX_QUEUE_MB): send fewer inputs "
                "per request",
                status=413,
            )
            e.shed_reason = "queue_bytes"
            raise e
        if self.queued_bytes + nbytes > cap:
            raise shed(
                "queue_bytes",
                f"the model queue holds {self.queued_bytes / mib:.0f} MiB of decoded inputs; "
                f"these {nbytes / mib:.0f} MiB more would pass its {cap / mib:.0f} MiB "
                "(TUNESERVE_MAX_QUEUE_MB)",
                self.drain_s(),
            )


class Batcher(MemoryAdmission):
    """`await batcher(items)` -> logits for those items, computed inside a shared batch."""

    def __init__(
        self,
        rt: Runtime,
        max_batch_size: int,
        timeout_s: float = 30.0,
        monitor=None,
        max_queue_items: int = 4096,
        max_queue_bytes: int = 1 << 30,
    ) -> None:
        self.rt, self.monitor = rt, monitor  # monitor: service.drift.Monitor or None
        self.max_batch_size, self.timeout_s = max_batch_size, timeout_s
        self.max_queue_items, self.max_queue_bytes = max_queue_items, max_queue_bytes
        self.queued = 0  # items admitted and not yet answered
        self.queued_cost = 0  # their cost (`cost_of`)
        self.queued_bytes = 0  # their memory (`bytes_of`)
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
            self.drain_s(),
        )

    def admit(self, n: int, cost: int | None = None, nbytes: int = 0) -> None:
        """Raise an InputError when `n` more items (of `cost` in all, holding `nbytes`) cannot
        be queued or answered in time: a 413 when they could not be even in an empty queue,
        else a 503."""
        cost = n if cost is None else cost
        waiting = self.queued + n
        if waiting > self.max_queue_items:
            raise shed(
                "queue_full",
                f"the model queue holds {self.queued} items; {n} more would pass its "
                f"capacity of {self.max_queue_items} (TUNESERVE_MAX_QUEUE_ITEMS)",
                self.drain_s(),
            )
        if nbytes:
            self.admit_bytes(nbytes)
        self.admit_alone(n, cost)

    def admit_alone(self, n: int, cost: int) -> None:
        """413 `too_much_work` when `n` items of `cost` in all would pass the timeout even in an
        empty queue, 503 `deadline` when only behind the queue (also asked before decoding,
        with a floor of the cost)."""
        alone = self.times.drain_s(n, self.max_batch_size, cost)
        if alone > self.timeout_s:
            e = InputError(
                "too_much_work",
                f"these {n} inputs are about {alone:.1f} s of model work; the timeout is "
                f"{self.timeout_s:g} s (TUNESERVE_REQUEST_TIMEOUT_S): send fewer or shorter "
                "inputs per request",
                status=413,
            )
            e.shed_reason = "too_much_work"
            raise e
        eta = self.drain_s() + alone
        if eta > self.timeout_s:
            raise shed(
                "deadline",
                f"the model queue holds {self.queued} items, about {eta:.1f} s of work with "
                f"these {n}; the timeout is {self.timeout_s:g} s (TUNESERVE_REQUEST_TIMEOUT_S)",
                eta - self.timeout_s,
            )

    def drain_s(self) -> float:
        """Seconds of work queued now."""
        return self.times.drain_s(self.queued, self.max_batch_size, self.queued_cost)

    async def __call__(self, items: list[Prepared]):
        """The task's outputs for `items` (classification: their logits rows)."""
        cost, nbytes = cost_of(items), bytes_of(items)
        try:
            self.admit(len(items), cost, nbytes)
        except InputError as e:
            metrics.shed(self.rt, e.shed_reason)
            raise
        self.queued += len(items)
        self.queued_cost += cost
        self.queued_bytes += nbytes
        metrics.queue(self.rt, self.queued)
        try:
            return await self._call(items)
        except InputError as e:
            if e.shed_reason:
                metrics.shed(self.rt, e.shed_reason)
            raise
        finally:
            self.queued -= len(items)
            self.queued_cost -= cost
            self.queued_bytes -= nbytes
            metrics.queue(self.rt, self.queued)

    async def _run_batch(self, jobs: Sequence[list[Prepared]]) -> list:
        flat = [item for job in jobs for item in job]
        stats: dict = {}
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            outputs, embedding = await loop.run_in_executor(self._thread, self.rt.run, flat, stats)
        except FATAL:
            raise
        except BaseException as e:  # the tokenizers' PanicException is a BaseException
            if len(jobs) == 1:
                return [unprocessable(self.rt, e)]
            # One request's input broke the batch: each request again on its own, so that
            # only that one fails (validation at decode should have caught it; the log says).
            return [(await self._run_batch([job]))[0] for job in jobs]
        seconds = time.perf_counter() - t0
        self.times.add(cost_of(flat), seconds)
        metrics.batch(self.rt, len(flat), seconds)
        metrics.inputs(self.rt, stats)
        if self.monitor is not None:  # a few numpy operations per batch
            self.monitor.observe_samples(self.rt.contract.drift_samples(outputs, embedding, stats))
        ends = np.cumsum([len(job) for job in jobs])
        return [outputs[end - len(job) : end] for job, end in zip(jobs, ends, strict=True)]


FATAL = (KeyboardInterrupt, SystemExit, asyncio.CancelledError)


def unprocessable(rt: Runtime, e: BaseException) -> InputError:
    """The answer of a request whose inputs the model failed on (alone): a 422 with the
    error's first line, and its traceback in the log, as a bug to fix."""
    log.error("the model failed on one request's inputs", exc_info=e)
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return InputError(
        "unprocessable_input", f"the model could not run these inputs: {first}", status=422
    )
