"""The batching path alone: `python bench/dispatcher.py --clients 64 --batch-ms 3 --item-ms 0.1`.

The service's `Batcher` (BentoML's CorkDispatcher) in one event loop, fed by closed-loop
clients that spend `--decode-ms` of CPU in the loop per request (as image decoding does),
around a stand-in model that sleeps `batch-ms + item-ms x n` per batch with the GIL released
(as ONNX Runtime does). Tells the dispatcher's behaviour from the model's: GPU-like batch
times (3 + 0.1 n ms) against CPU-like ones (20 + 5 n ms), with no HTTP and no GPU, and what
an occasional slow batch (`--spike-every`) does to the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.batching import Batcher  # noqa: E402
from service.errors import InputError  # noqa: E402


class StandInModel:
    """What `Batcher` needs of a `service.runtime.Runtime`, with a chosen batch time."""

    name, version, task = "standin", "v1", "image-classification"

    def __init__(self, batch_s: float, item_s: float, spike_every: int, spike_s: float) -> None:
        self.batch_s, self.item_s, self.sizes = batch_s, item_s, []
        self.spike_every, self.spike_s = spike_every, spike_s

    def warm_up(self) -> list:
        return []

    def run(self, items: list, stats: dict) -> tuple[np.ndarray, np.ndarray]:
        self.sizes.append(len(items))
        spike = self.spike_every and len(self.sizes) % self.spike_every == 0
        time.sleep(self.batch_s + self.item_s * len(items) + (self.spike_s if spike else 0))
        stats["brightness"], stats["pixels"] = [0.5] * len(items), [1] * len(items)
        return np.zeros((len(items), 2), np.float32), np.zeros((len(items), 4), np.float32)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def closed_loop(args: argparse.Namespace) -> dict:
    model = StandInModel(
        args.batch_ms / 1000, args.item_ms / 1000, args.spike_every, args.spike_ms / 1000
    )
    batch = Batcher(model, args.max_batch_size, args.timeout_s, None, args.max_queue_items)
    latencies, shed = [], 0
    stop = time.perf_counter() + args.seconds

    async def client() -> None:
        nonlocal shed
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            spin(args.decode_ms / 1000)  # pre-processing blocks the event loop
            try:
                await batch([object()] * args.items)
                latencies.append(time.perf_counter() - t0)
            except InputError:  # 503 overloaded
                shed += 1
            await asyncio.sleep(0)  # the response goes out, the next request comes in

    await asyncio.gather(*(client() for _ in range(args.clients)))
    latencies.sort()
    return {
        "rps": len(latencies) / args.seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "shed": shed,
        "mean_batch": statistics.mean(model.sizes),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients")
    p.add_argument("--batch-ms", type=float, default=3.0, help="fixed time per batch, ms")
    p.add_argument("--item-ms", type=float, default=0.1, help="added time per item, ms")
    p.add_argument("--decode-ms", type=float, default=4.0, help="event-loop CPU per request")
    p.add_argument("--max-batch-size", type=int, default=32, help="as TUNESERVE_MAX_BATCH_SIZE")
    p.add_argument("--timeout-s", type=float, default=30.0, help="as TUNESERVE_REQUEST_TIMEOUT_S")
    p.add_argument("--max-queue-items", type=int, default=4096, help="as TUNESERVE_MAX_QUEUE_ITEMS")
    p.add_argument("--items", type=int, default=1, help="items per request")
    p.add_argument("--spike-every", type=int, default=0, help="every Nth batch is slow; 0: none")
    p.add_argument("--spike-ms", type=float, default=3000.0, help="extra time of a slow batch")
    p.add_argument("--seconds", type=float, default=8.0, help="load duration")
    args = p.parse_args()
    r = asyncio.run(closed_loop(args))
    print(
        f"{args.clients} clients, batch {args.batch_ms:g} + {args.item_ms:g} n ms, decode "
        f"{args.decode_ms:g} ms: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.0f} ms, p99 "
        f"{r['p99_ms']:.0f} ms, shed (503) {r['shed']}, mean batch {r['mean_batch']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
