"""Continuous batching for the generative tasks: the sequences of every request in flight
decode in one batch, one decoder call per step for all of them (tasks/decoding.py's
DecodeBatch). A request joins at the next step (its windows encoded together with the other
requests that arrived, then prefilled) and leaves as soon as its own last sequence ends, not
when the longest in the batch does.

    gen = Generator(rt, max_batch=16, timeout_s=30)
    outputs = await gen(items, params)      # the task's outputs (transcripts), in order

One thread runs the loop, so every ONNX Runtime call comes from the same thread (the CUDA
provider keeps its handles per thread, as service/batching.py says). Admission: a request
waits while the running batch has no room for its sequences; it is refused with a 503 when
the queue is full or its memory would pass the cap, and answered with a 503 once past the
timeout (its sequences then leave the batch at their next step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.batching import FATAL, MemoryAdmission, bytes_of, shed, unprocessable
from service.errors import InputError
from service.threads import name_os_thread
from tasks.decoding import DecodeBatch

log = logging.getLogger("tuneserve")


@dataclass(eq=False)
class _Job:
    """One request: its inputs, their decoding parameters and where its answer goes."""

    items: list
    params: dict
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)
    outputs: list = field(default_factory=list)  # the task's per-input outputs
    left: int = 0  # sequences still decoding
    cancelled: bool = False  # timed out: its sequences stop at the next step

    def settle(self, result=None, error: BaseException | None = None) -> None:
        """Hand the answer (or the error) to the request's event loop."""

        def done() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(done)


class Generator(MemoryAdmission):
    """`await generator(items, params)` -> the task's outputs for those items."""

    def __init__(
        self,
        rt,
        max_batch: int,
        timeout_s: float = 30.0,
        monitor=None,
        max_queue_items: int = 4096,
        max_queue_bytes: int = 1 << 30,
    ) -> None:
        self.rt, self.contract, self.monitor = rt, rt.contract, monitor
        self.max_batch, self.timeout_s = max_batch, timeout_s
        self.max_queue_items, self.max_queue_bytes = max_queue_items, max_queue_bytes
        self.queued = self.queued_bytes = 0
        self.inbox: deque[_Job] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = False
        self.batch = DecodeBatch(self.contract.layout, self._step)
        self.owner: dict[int, _Job] = {}  # id(sequence) -> its request
        self.step_s = 0.05  # the latest decoder step's seconds (the queue's time estimate)
        ready = threading.Event()
        self.thread = threading.Thread(
            target=self._main, args=(ready,), name="onnxruntime", daemon=True
        )
        self.thread.start()
        ready.wait()

    def close(self) -> None:
        self.stopped = True
        self.wake.set()

    def drain_s(self) -> float:
        """Seconds until the queue is through, roughly: tokens per window per batch of steps."""
        per_window = self.contract.gen["max_new_tokens"] / 4  # a typical transcript's share
        return self.queued * per_window * self.step_s / max(1, self.max_batch) + self.step_s

    def admit_alone(self, n: int, cost: int) -> None:
        """Requests are bounded by the audio limit; the queue bound is in __call__."""

    # ------------------------------------------------------------------ the request side

    async def __call__(self, items: list, params: dict):
        n, nbytes = len(items), bytes_of(items)
        try:
            if self.queued + n > self.max_queue_items:
                raise shed(
                    "queue_full",
                    f"the model queue holds {self.queued} inputs; {n} more would pass its "
                    f"capacity of {self.max_queue_items} (TUNESERVE_MAX_QUEUE_ITEMS)",
                    self.drain_s(),
                )
            self.admit_bytes(nbytes)
        except InputError as e:
            metrics.shed(self.rt, e.shed_reason)
            raise
        loop = asyncio.get_running_loop()
        job = _Job(items, params, loop, loop.create_future())
        self.queued += n
        self.queued_bytes += nbytes
        metrics.queue(self.rt, self.queued)
        with self.lock:
            self.inbox.append(job)
        self.wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except TimeoutError:
            job.cancelled = True
            metrics.shed(self.rt, "timeout")
            raise shed(
                "timeout",
                f"the request could not be answered within {self.timeout_s:g} s "
                "(TUNESERVE_REQUEST_TIMEOUT_S); retry later",
                self.drain_s(),
            ) from None
        finally:
            self.queued -= n
            self.queued_bytes -= nbytes
            metrics.queue(self.rt, self.queued)

    # ------------------------------------------------------------------ the decoding thread

    def _main(self, ready: threading.Event) -> None:
        name_os_thread()
        try:
            self.rt.warm_up()
        finally:
            ready.set()
        while not self.stopped:
            if not self.batch.pending and not self.inbox:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                self._admit()
                if self.batch.pending:
                    self._decode()
            except FATAL:
                raise
            except BaseException as e:  # noqa: BLE001 (a model failure fails its requests)
                self._fail_all(e)

    def _take(self) -> list[_Job]:
        """Requests that fit the running batch (windows count), oldest first; one at least
        when the batch is empty, however many windows it has."""
        room = self.max_batch - len(self.batch.active) - len(self.batch.waiting)
        jobs: list[_Job] = []
        with self.lock:
            while self.inbox:
                job = self.inbox[0]
                need = sum(item.cost for item in job.items)
                if need > room and (jobs or self.batch.pending):
                    break
                self.inbox.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    room -= need
        return jobs

    def _admit(self) -> None:
        """Encode the windows of the requests that fit and add their sequences."""
        jobs = self._take()
        if not jobs:
            return
        items = [item for job in jobs for item in job.items]
        params = [job.params for job in jobs for _ in job.items]
        try:
            outputs = self.contract.begin(self.rt.graphs, items, params, self.max_batch)
        except FATAL:
            raise
        except BaseException as e:  # noqa: BLE001
            for job in jobs:
                job.settle(error=unprocessable(self.rt, e))
            return
        k = 0
        for job in jobs:
            job.outputs, k = outputs[k : k + len(job.items)], k + len(job.items)
            seqs = [s for out in job.outputs for s in out.seqs]
            job.left = len(seqs)
            for seq in seqs:
                self.owner[id(seq)] = job
                self.batch.add(seq)

    def _step(self, feeds: dict) -> dict:
        return self.rt.graphs.step(feeds)

    def _decode(self) -> None:
        """One decoder call for every sequence; the requests whose last one ended answer."""
        for seq in self.batch.active:  # a timed-out request's sequences stop here
            if self.owner.get(id(seq)) and self.owner[id(seq)].cancelled:
                seq.max_new_tokens = len(seq.tokens) + 1
        n = len(self.batch.active) + len(self.batch.waiting)
        t0 = time.perf_counter()
        finished = self.batch.step()
        self.step_s = time.perf_counter() - t0
        metrics.decode_step(self.rt, n, self.step_s)
        for seq in finished:
            job = self.owner.pop(id(seq))
            job.left -= 1
            if job.left == 0 and not job.cancelled:
                self._answer(job)

    def _answer(self, job: _Job) -> None:
        outputs = job.outputs
        audio = float(sum(item.value.seconds for item in job.items))
        tokens = sum(len(s.tokens) for out in outputs for s in out.seqs)
        metrics.generated(self.rt, audio, time.perf_counter() - job.t0, tokens)
        stats = {"duration": [item.value.seconds for item in job.items]}
        stats["loudness"] = [item.value.loudness_db for item in job.items]
        metrics.inputs(self.rt, stats)
        job.settle(outputs)
        if self.monitor is not None:
            embedding = np.stack([out.embedding for out in outputs])
            self.monitor.observe_samples(self.contract.drift_samples(outputs, embedding, stats))

    def _fail_all(self, e: BaseException) -> None:
        """A decoder failure: every request in the batch gets a 422; the batch starts anew."""
        error = unprocessable(self.rt, e)
        for job in {id(j): j for j in self.owner.values()}.values():
            job.settle(error=error)
        self.owner.clear()
        self.batch = DecodeBatch(self.contract.layout, self._step)
