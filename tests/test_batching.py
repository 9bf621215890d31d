"""Admission control of the batching path (service/batching.py), with a stand-in model whose
batch time is chosen: a closed loop of bounded concurrency is never shed, overload is."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.batching import Batcher, BatchTimes
from service.errors import InputError
from service.settings import Settings


class StandIn:
    """What Batcher needs of a Runtime: `fixed_s + per_item_s x n` per batch, GIL released."""

    name, version, task = "standin", "v1", "text-classification"

    def __init__(self, fixed_s: float, per_item_s: float) -> None:
        self.fixed_s, self.per_item_s = fixed_s, per_item_s

    def warm_up(self) -> list:
        return []

    def run(self, items: list, stats: dict):
        time.sleep(self.fixed_s + self.per_item_s * len(items))
        stats["tokens"] = [1] * len(items)
        x = np.asarray(items, dtype=np.float32)[:, None]
        return np.hstack([x, -x]), np.zeros((len(items), 4), np.float32)


def _run(batch: Batcher, scenario):
    """One event loop for the batcher's whole life (its dispatcher binds to the first)."""

    async def main():
        try:
            return await scenario
        finally:
            batch.close()

    return asyncio.run(main())


async def _closed_loop(batch: Batcher, clients: int, items: int, rounds: int):
    answers, refused = [], []

    async def client(c: int) -> None:
        for r in range(rounds):
            values = [float(c * 1000 + r * 100 + i) for i in range(items)]
            try:
                logits = await batch(values)
                answers.append(np.array_equal(logits[:, 0], values))
            except InputError as e:
                refused.append(e)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return answers, refused


def test_batch_times_fit_fixed_and_per_item_cost():
    times = BatchTimes()
    for n in (1, 8, 32, 8, 1):
        times.add(n, 0.005 + 0.001 * n)
    assert times.fixed_s == pytest.approx(0.005, abs=1e-6)
    assert times.per_item_s == pytest.approx(0.001, abs=1e-7)
    assert times.drain_s(64, 32) == pytest.approx(2 * 0.005 + 64 * 0.001)


def test_default_admission_never_sheds_a_closed_loop_of_64_clients_x_32_items():
    """2048 items in flight are 64 batches of 37 ms, 2.4 s: BentoML's fixed 2-s bound (the
    previous default) shed most of these requests; a closed loop cannot grow the queue further,
    so none may be refused and every answer must be each client's own."""
    s = Settings()
    batch = Batcher(
        StandIn(0.005, 0.001), s.max_batch_size, s.request_timeout_s, None, s.max_queue_items
    )
    answers, refused = _run(batch, _closed_loop(batch, clients=64, items=32, rounds=2))
    assert not refused, f"{len(refused)} shed: {refused[0].detail}"
    assert len(answers) == 128 and all(answers)


def test_a_full_queue_sheds_with_retry_after():
    batch = Batcher(StandIn(0.005, 0.002), 32, timeout_s=30, max_queue_items=64)
    answers, refused = _run(batch, _closed_loop(batch, clients=10, items=32, rounds=1))
    assert len(answers) >= 2 and all(answers)
    assert refused and all(e.status == 503 and e.shed_reason == "queue_full" for e in refused)
    assert all(int(e.headers()["Retry-After"]) >= 1 for e in refused)
    assert "TUNESERVE_MAX_QUEUE_ITEMS" in refused[0].detail


def test_work_past_the_timeout_is_shed_before_it_queues():
    """10 ms per item and a 1-s timeout: once the batch times are measured, 200 queued items
    (2 s of work) cannot be answered in time, and the request says so instead of waiting."""
    batch = Batcher(StandIn(0.0, 0.01), 32, timeout_s=1, max_queue_items=10_000)

    async def scenario():
        await batch([1.0] * 4)
        await batch([1.0] * 16)  # two batch sizes measured: the fit is known
        return await _closed_loop(batch, clients=8, items=25, rounds=1)

    answers, refused = _run(batch, scenario())
    assert answers and all(answers)
    assert any(e.shed_reason == "deadline" for e in refused)
    assert all(e.status == 503 and e.retry_after >= 1 for e in refused)
