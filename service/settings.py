"""Service settings, read once from environment variables (TUNESERVE_*)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"error: environment variable {name}={raw!r} must be an integer") from None


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
    # BentoML answers 503 to a request whose queueing + estimated batch time would exceed this
    # (load shedding); the batch window itself adapts to traffic. Milliseconds.
    max_latency_ms: int = 2000
    # Worker processes, each with its own model session and batch queue. 0 = auto: one per CPU
    # core on CPUs (one intra-op thread each keeps every core busy while others parse HTTP:
    # 2 x 1 gave 1.55x the req/s of 1 x 2 on 2 cores); 4 sharing a GPU (up to the cores), as
    # one process cannot parse requests fast enough for it (MiniLM on an H100: 2.9x of 1).
    workers: int = 0
    threads: int = 0  # ONNX Runtime intra-op threads per worker; 0 = cores / workers (GPU: 1)
    # Seconds between drift evaluations of the latest window (DESIGN §4); 0 turns drift off.
    drift_interval_s: int = 15
    api_keys: tuple[str, ...] = field(default_factory=tuple)  # empty: no authentication
    max_items: int = 64  # inputs per request
    max_body_bytes: int = 20 * 1024 * 1024  # request body, bytes (413 above)
    max_image_pixels: int = 40_000_000  # decoded width x height (decompression bombs, 413)
    max_text_chars: int = 20_000  # characters per text (413 above)
    # BentoML's per-request access log line and OpenTelemetry span cost about 30% of a worker's
    # request-handling CPU (bench/RESULTS.md); the Prometheus metrics count every request
    # anyway. On: one log line per request; spans for BentoML's `tracing` exporter.
    access_log: bool = False
    tracing: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        keys = tuple(
            k.strip() for k in os.environ.get("TUNESERVE_API_KEYS", "").split(",") if k.strip()
        )
        return cls(
            model=os.environ.get("TUNESERVE_MODEL", cls.model),
            precision=os.environ.get("TUNESERVE_PRECISION", cls.precision),
            providers=os.environ.get("TUNESERVE_PROVIDERS", cls.providers),
            max_batch_size=_int("TUNESERVE_MAX_BATCH_SIZE", cls.max_batch_size),
            max_latency_ms=_int("TUNESERVE_MAX_LATENCY_MS", cls.max_latency_ms),
            workers=_int("TUNESERVE_WORKERS", cls.workers),
            threads=_int("TUNESERVE_THREADS", cls.threads),
            drift_interval_s=_int("TUNESERVE_DRIFT_INTERVAL_S", cls.drift_interval_s),
            api_keys=keys,
            max_items=_int("TUNESERVE_MAX_ITEMS", cls.max_items),
            max_body_bytes=_int("TUNESERVE_MAX_BODY_BYTES", cls.max_body_bytes),
            max_image_pixels=_int("TUNESERVE_MAX_IMAGE_PIXELS", cls.max_image_pixels),
            max_text_chars=_int("TUNESERVE_MAX_TEXT_CHARS", cls.max_text_chars),
            access_log=_bool("TUNESERVE_ACCESS_LOG", cls.access_log),
            tracing=_bool("TUNESERVE_TRACING", cls.tracing),
        )

    def worker_count(self, on_gpu: bool) -> int:
        return self.workers or (min(4, cpu_cores()) if on_gpu else cpu_cores())

    def thread_count(self, on_gpu: bool) -> int:
        if self.threads:
            return self.threads
        # On a GPU the CPU provider runs only shape operations; more intra-op threads would
        # spin on cores that request parsing and image decoding need.
        return 1 if on_gpu else max(1, cpu_cores() // self.worker_count(on_gpu))
