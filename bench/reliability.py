"""Reliability under load: `python bench/reliability.py --run runs/sms_spam [--seconds 60]`;
with `--hostile [--image-run runs/digits]`, hostile clients instead (bench/hostile.py).

Starts the service, then (1) 64 closed-loop clients for `--warmup` + `--seconds`: counts non-200
answers and the resident-memory growth of the server's process tree between the end of the
warm-up and the end of the run; (2) the same load while one worker process is killed once (SIGKILL)
half-way: the server must restart it and requests must resume.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from load import closed_loop  # noqa: E402
from serve import (  # noqa: E402
    artifact_for,
    free_port,
    python_path,
    request_inputs,
    rss_mb,
    start,
    stop,
    wait_ready,
)


def worker_pids(server_pid: int) -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.Process(server_pid).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    ]


def sample_rss(pid: int, args, curve: list) -> None:
    """RSS every 15 s of the measured run."""
    import time

    for k in range(1, int(args.seconds // 15)):
        time.sleep(15)
        curve.append((args.warmup + 15 * k, rss_mb(pid)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", default="runs/sms_spam")
    p.add_argument("--artifact", default=None)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=64)
    # RSS climbs for about a minute of load, then stays flat (bench/RESULTS.md): the growth is
    # measured after this warm-up, and the whole curve is printed.
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of load before measuring")
    p.add_argument("--hostile", action="store_true", help="hostile clients (bench/hostile.py)")
    p.add_argument("--image-run", default="runs/digits", help="--hostile: image checkpoint")
    args = p.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from finetune import checkpoint

    run = Path(args.run)
    if not run.is_dir():
        print(f"no checkpoint at {run}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    artifact = artifact_for(run, args.artifact, tmp)
    if args.hostile:
        import hostile

        texts = request_inputs(checkpoint.load_checkpoint(run))
        image_run = Path(args.image_run)
        image = artifact_for(image_run, None, tmp / "image") if image_run.is_dir() else None
        hostile.run(artifact, texts, image, tmp, min(args.seconds, 30))
        return 0
    bodies = [{"inputs": [t]} for t in request_inputs(checkpoint.load_checkpoint(run))]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    svc = start(
        [sys.executable, "-m", "bentoml", "serve", "--port", str(port)],
        {"TUNESERVE_MODEL": str(artifact), "PYTHONPATH": python_path()},
        tmp / "svc.log",
    )
    try:
        wait_ready(url + "/readyz", svc)
        curve = [(0, rss_mb(svc.pid))]
        asyncio.run(closed_loop(url + "/predict", bodies, args.clients, args.warmup))
        before = rss_mb(svc.pid)
        curve.append((args.warmup, before))
        sampler = threading.Thread(target=sample_rss, args=(svc.pid, args, curve), daemon=True)
        sampler.start()
        r = asyncio.run(closed_loop(url + "/predict", bodies, args.clients, args.seconds))
        after = rss_mb(svc.pid)
        curve.append((args.warmup + args.seconds, after))
        print(
            f"load: {args.clients} clients x {args.seconds:.0f} s: {r['rps']:.1f} req/s, "
            f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, answers {r['statuses']}"
        )
        print(
            f"memory: RSS {before:.0f} MiB after {args.warmup:.0f} s warm-up, {after:.0f} MiB "
            f"after the run ({100 * (after - before) / before:+.1f}%); curve (s, MiB): "
            + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in sorted(curve))
        )

        victim = worker_pids(svc.pid)[0]
        timer = threading.Timer(args.seconds / 4, lambda: os.kill(victim, signal.SIGKILL))
        timer.start()
        r = asyncio.run(closed_loop(url + "/predict", bodies, args.clients, args.seconds / 2))
        new = worker_pids(svc.pid)
        alive = asyncio.run(closed_loop(url + "/predict", bodies, 4, 5))
        print(
            f"kill: worker {victim} killed at {args.seconds / 4:.0f} s; during the run "
            f"answers {r['statuses']}; workers now {new}; afterwards {alive['statuses']} "
            f"at {alive['rps']:.1f} req/s"
        )
    finally:
        stop(svc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
