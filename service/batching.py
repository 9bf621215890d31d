"""The one adaptive-batching path under every prediction route.

BentoML's `CorkDispatcher` (the dispatcher behind `@bentoml.api(batchable=True)`) runs inside
the service process: a request's prepared inputs join the queue and the model runs once per
batch. The earlier design sent every request on to a second, batchable BentoML service; that
second HTTP hop with its JSON cost more CPU than the model on this 2-core machine
(bench/RESULTS.md), so the batch now forms where the request arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from service import metrics
from service.errors import InputError
from service.runtime import Prepared, Runtime


def _overloaded():
    raise InputError(
        "overloaded",
        "the model queue would exceed TUNESERVE_MAX_LATENCY_MS; retry shortly",
        status=503,
    )


class Batcher:
    """`await batcher(items)` -> logits for those items, computed inside a shared batch."""

    def __init__(self, rt: Runtime, max_batch_size: int, max_latency_ms: int, monitor=None) -> None:
        self.rt, self.monitor = rt, monitor  # monitor: service.drift.Monitor or None
        # One ONNX Runtime call at a time, always from the same thread: the CUDA provider keeps
        # cuDNN/cuBLAS handles per calling thread, so a thread pool would create them anew.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self._thread.submit(rt.warm_up).result()  # on this thread: CUDA handles, caches
        dispatcher = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=_overloaded,  # BentoML sheds a request that cannot meet the latency bound
            get_batch_size=len,
            batch_dim=(0, 0),
        )
        self._call = dispatcher(self._run_batch)

    async def __call__(self, items: list[Prepared]) -> np.ndarray:
        return await self._call(items)

    async def _run_batch(self, jobs: Sequence[list[Prepared]]) -> list[np.ndarray]:
        flat = [item for job in jobs for item in job]
        stats: dict = {}
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        logits, embedding = await loop.run_in_executor(self._thread, self.rt.run, flat, stats)
        metrics.batch(self.rt, len(flat), time.perf_counter() - t0)
        metrics.inputs(self.rt, stats)
        if self.monitor is not None:  # a few numpy operations per batch
            self.monitor.observe(logits, embedding, stats.get("brightness") or stats["tokens"])
        ends = np.cumsum([len(job) for job in jobs])
        return [logits[end - len(job) : end] for job, end in zip(jobs, ends, strict=True)]
