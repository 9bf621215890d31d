"""What a request costs the model, measured at export: ONNX Runtime's time for the first
holdout input alone and per input in a batch of 32 copies of it, for the fp32 graph and each
CPU variant written, on the exporting machine with the service's default thread setting (one
intra-op thread per worker). The card keeps it as `cost`, so whoever picks a backbone or a
variant sees its price next to its accuracy; `bench/serve.py` measures what the whole service
then answers.

    card["cost"] = measure({"fp32": path, "int8": path8}, feeder)
    # {"device": "AMD EPYC 7B13", "provider": "CPUExecutionProvider", "threads": 1,
    #  "fp32": {"batch_1_ms": 4.1, "batch_32_ms_per_item": 1.2}, "int8": {...}}
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import numpy as np

BATCH = 32
SECONDS = 0.5  # timing budget per variant and batch size, after one warm-up run
RUNS = (3, 50)  # fewest and most timed runs (a tiny model stops at the most)
PROVIDER = "CPUExecutionProvider"


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_seconds(session, feeds: dict) -> float:
    session.run(None, feeds)  # warm-up: allocations and the first kernel choices
    times: list[float] = []
    spent = 0.0
    while (spent < SECONDS or len(times) < RUNS[0]) and len(times) < RUNS[1]:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return statistics.median(times)


def measure(files: dict[str, Path], feeder, threads: int = 1) -> dict:
    """{precision: {batch_1_ms, batch_32_ms_per_item}} with the device they were timed on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    one = feeder.feeds(feeder.take(1))
    # the same input 32 times: the batch's gain at equal length (distinct texts would pad to
    # the longest, which prices the padding, not the batching)
    many = feeder.feeds(np.zeros(BATCH, dtype=np.int64))
    cost: dict = {"device": cpu_name(), "provider": PROVIDER, "threads": threads}
    for precision, path in files.items():
        session = ort.InferenceSession(str(path), so, providers=[PROVIDER])
        cost[precision] = {
            "batch_1_ms": round(_median_seconds(session, one) * 1e3, 3),
            f"batch_{BATCH}_ms_per_item": round(_median_seconds(session, many) * 1e3 / BATCH, 3),
        }
    return cost


def describe(cost: dict) -> str:
    """One log line: each precision's price alone and in a batch."""
    parts = [
        f"{p} {v['batch_1_ms']:.2f} ms alone, {v[f'batch_{BATCH}_ms_per_item']:.2f} ms per "
        f"input in {BATCH}"
        for p, v in cost.items()
        if isinstance(v, dict)
    ]
    return f"cost on {cost['device']} ({cost['threads']} thread): " + "; ".join(parts)
