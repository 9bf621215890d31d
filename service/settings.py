"""Service settings, read once from environment variables (TUNESERVE_*)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tuneserve")
PRECISIONS = ("auto", "fp32", "int8", "fp16")


def _int(name: str, default: int, low: int, high: int) -> int:
    """An integer variable within [low, high]; anything else stops start-up with one line."""
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise SystemExit(
            f"error: environment variable {name}={raw!r} must be an integer from {low} to {high}"
        )
    return value


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw in ("1", "true", "yes", "on")
    raise SystemExit(f"error: environment variable {name}={raw!r} must be 1/true or 0/false")


def cpu_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's `resources.limits.cpu`), which os.cpu_count() does not see."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


@dataclass(frozen=True)
class Settings:
    model: str = "digits:latest"  # model-store tag (name:version) or artifact directory
    precision: str = "auto"  # auto (fp16 on GPU, int8 on CPU when validated), fp32, int8, fp16
    providers: str = "auto"  # auto (TensorRT, CUDA, CPU as usable) or a comma list of ORT EPs
    max_batch_size: int = 32  # items per model call; BentoML's default (100) is too coarse here
    # Admission (service/batching.py): a request joins the model queue only when the queue has
    # room for its items and the estimated time to answer it stays under the timeout; else it
    # is shed with 503 and Retry-After. A closed loop of clients can fill the queue only up to
    # their items in flight, so these bounds shed overload, never a burst: 64 clients x 32
    # items are 2048 items, about 10 s of MiniLM fp32 work per worker on a 2-core CPU.
    request_timeout_s: int = 30  # the client-facing deadline, seconds (BentoML's is 60)
    max_queue_items: int = 4096  # items admitted and not yet answered, per worker
    # Memory a worker's waiting requests hold, MiB, counted twice: their bodies (service/
    # guard.py) and their inputs once decoded (image crops, audio at 16 kHz, tokenized
    # windows; service/batching.py). Past it a request is a 503; one larger alone a 413.
    max_queue_mb: int = 1024
    # Worker processes, each with its own model session and batch queue. 0 = auto: one per CPU
    # core on CPUs (one intra-op thread each keeps every core busy while others parse HTTP:
    # 2 x 1 gave 1.55x the req/s of 1 x 2 on 2 cores); 4 sharing a GPU (up to the cores), as
    # one process cannot parse requests fast enough for it (MiniLM on an H100: 2.9x of 1).
    workers: int = 0
    threads: int = 0  # ONNX Runtime intra-op threads per worker; 0 = cores / workers (GPU: 1)
    # Threads per worker that decode and resize images off the event loop, so that probes and
    # /metrics answer while large images are decoded. 0 = cores / workers: more threads than
    # that add GIL contention for the event loop and no throughput (2 cores, 2 workers, 64
    # clients of 6-MP JPEGs: /livez p99 122 ms with 2 threads each, 40 ms with 1; 13.5 and
    # 13.2 req/s).
    decode_threads: int = 0
    # Seconds between drift evaluations of the latest window (DESIGN §4); 0 turns drift off.
    drift_interval_s: int = 15
    # Samples older than this leave the drift window, seconds: with no fresh traffic the
    # window empties and the scores stop being exported, instead of repeating stale ones.
    drift_max_age_s: int = 900
    api_keys: tuple[str, ...] = field(default_factory=tuple)  # empty: no authentication
    max_items: int = 64  # inputs per request
    max_body_bytes: int = 20 * 1024 * 1024  # request body, bytes, counted as it streams (413)
    max_image_pixels: int = 40_000_000  # width x height from the header (decompression bombs)
    # characters per text (413 above); 0 = the model's own (its card: the longest text it was
    # fine-tuned on, at least 20,000), a number caps it
    max_text_chars: int = 0
    max_audio_seconds: int = 60  # duration per audio clip, read from its header (413 above)
    # Pixels of a mask or a drawn image in an answer (segmentation, `render`): one at the
    # image's size up to this, scaled down to fit it beyond (a 40-MP mask and overlay were
    # built on the request path before: seconds of CPU and hundreds of MB per image).
    max_output_pixels: int = 4_194_304
    # BentoML's per-request access log line and OpenTelemetry span cost about 30% of a worker's
    # request-handling CPU (bench/RESULTS.md); the Prometheus metrics count every request
    # anyway. On: one log line per request; spans for BentoML's `tracing` exporter.
    access_log: bool = False
    tracing: bool = False
    # JSON POST /predict answered by service/fastpath.py, not BentoML's route handler (the same
    # answers and errors for about 10% less CPU per small request); off: BentoML's route only.
    fast_predict: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        keys = tuple(
            k.strip() for k in os.environ.get("TUNESERVE_API_KEYS", "").split(",") if k.strip()
        )
        if os.environ.get("TUNESERVE_MAX_LATENCY_MS"):
            log.warning(
                "TUNESERVE_MAX_LATENCY_MS is no longer read: requests are shed by "
                "TUNESERVE_REQUEST_TIMEOUT_S and TUNESERVE_MAX_QUEUE_ITEMS"
            )
        precision = os.environ.get("TUNESERVE_PRECISION", cls.precision).strip()
        if precision not in PRECISIONS:
            raise SystemExit(
                f"error: environment variable TUNESERVE_PRECISION={precision!r} must be one "
                f"of {', '.join(PRECISIONS)}"
            )
        big = 2**31 - 1
        return cls(
            model=os.environ.get("TUNESERVE_MODEL", cls.model),
            precision=precision,
            providers=os.environ.get("TUNESERVE_PROVIDERS", cls.providers),
            max_batch_size=_int("TUNESERVE_MAX_BATCH_SIZE", cls.max_batch_size, 1, 4096),
            request_timeout_s=_int("TUNESERVE_REQUEST_TIMEOUT_S", cls.request_timeout_s, 1, 3600),
            max_queue_items=_int("TUNESERVE_MAX_QUEUE_ITEMS", cls.max_queue_items, 1, 1_000_000),
            max_queue_mb=_int("TUNESERVE_MAX_QUEUE_MB", cls.max_queue_mb, 1, 1 << 20),
            workers=_int("TUNESERVE_WORKERS", cls.workers, 0, 256),
            threads=_int("TUNESERVE_THREADS", cls.threads, 0, 256),
            decode_threads=_int("TUNESERVE_DECODE_THREADS", cls.decode_threads, 0, 256),
            drift_interval_s=_int("TUNESERVE_DRIFT_INTERVAL_S", cls.drift_interval_s, 0, 86400),
            drift_max_age_s=_int("TUNESERVE_DRIFT_MAX_AGE_S", cls.drift_max_age_s, 1, 7 * 86400),
            api_keys=keys,
            max_items=_int("TUNESERVE_MAX_ITEMS", cls.max_items, 1, 100_000),
            max_body_bytes=_int("TUNESERVE_MAX_BODY_BYTES", cls.max_body_bytes, 1024, big),
            max_image_pixels=_int("TUNESERVE_MAX_IMAGE_PIXELS", cls.max_image_pixels, 1, big),
            max_text_chars=_int("TUNESERVE_MAX_TEXT_CHARS", cls.max_text_chars, 0, big),
            max_audio_seconds=_int(
                "TUNESERVE_MAX_AUDIO_SECONDS", cls.max_audio_seconds, 1, 24 * 3600
            ),
            max_output_pixels=_int(
                "TUNESERVE_MAX_OUTPUT_PIXELS", cls.max_output_pixels, 4096, 400_000_000
            ),
            access_log=_bool("TUNESERVE_ACCESS_LOG", cls.access_log),
            tracing=_bool("TUNESERVE_TRACING", cls.tracing),
            fast_predict=_bool("TUNESERVE_FAST_PREDICT", cls.fast_predict),
        )

    def worker_count(self, on_gpu: bool) -> int:
        return self.workers or (min(4, cpu_cores()) if on_gpu else cpu_cores())

    def thread_count(self, on_gpu: bool) -> int:
        if self.threads:
            return self.threads
        # On a GPU the CPU provider runs only shape operations; more intra-op threads would
        # spin on cores that request parsing and image decoding need.
        return 1 if on_gpu else max(1, cpu_cores() // self.worker_count(on_gpu))

    def decode_thread_count(self, on_gpu: bool) -> int:
        return self.decode_threads or max(1, cpu_cores() // self.worker_count(on_gpu))
