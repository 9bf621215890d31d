"""Closed-loop load generators for the serving benchmarks (bench/serve.py, bench/reliability.py).

`load(url, bodies, clients, seconds)`: `clients` connections, each sending its next JSON body as
soon as the last one is answered. Two generators:
  - wrk (C, Debian package `wrk`), used when it is on PATH: about a tenth of the CPU per request
    of a Python client, which matters because the load generator shares the machine's cores
    with the server it measures;
  - aiohttp (Python asyncio), always available, and the only one that reports every status.
Both return requests per second, p50/p99 latency, non-200 answers and the CPU seconds the
generator itself spent per second of load (`client_cores`).
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

WRK_SCRIPT = """
local bodies, i = {}, 0
local headers = {["Content-Type"] = "application/json"}
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
end
function request()
  i = i + 1
  return wrk.format("POST", nil, headers, bodies[(i % #bodies) + 1])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'TUNESERVE {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"status": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"""


def generator(wanted: str = "auto") -> str:
    """'wrk' when asked for or when found on PATH under 'auto', else 'aiohttp'."""
    if wanted == "auto":
        return "wrk" if shutil.which("wrk") else "aiohttp"
    if wanted == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--load wrk: no wrk on PATH (Debian: apt-get install wrk)")
    return wanted


def load(url: str, bodies: list[dict], clients: int, seconds: float, tool: str = "auto") -> dict:
    if generator(tool) == "wrk":
        return wrk(url, bodies, clients, seconds)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = asyncio.run(closed_loop(url, bodies, clients, seconds))
    result["client_cores"] = (time.process_time() - cpu0) / (time.perf_counter() - t0)
    return result


def wrk(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """One wrk thread holding `clients` connections (one core at most, like the aiohttp loop)."""
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        script, lines = Path(tmp) / "bodies.lua", Path(tmp) / "bodies.jsonl"
        script.write_text(WRK_SCRIPT)
        lines.write_text("".join(json.dumps(b) + "\n" for b in bodies))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{clients}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "60s",
                "-s",
                str(script),
                url,
                "--",
                str(lines),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(x for x in out.stdout.splitlines() if x.startswith("TUNESERVE "))
    r = json.loads(line.removeprefix("TUNESERVE "))
    socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "rps": (r["requests"] - r["status"] - socket_errors) / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": r["status"] + socket_errors,
        "statuses": {"non-2xx": r["status"], "socket errors": socket_errors},
        "client_cores": cpu / wall,
    }


async def closed_loop(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """`clients` loops, each sending its next request as soon as the last one is answered."""
    import aiohttp

    latencies, errors, statuses = [], 0, {}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        stop_at = time.perf_counter() + seconds

        async def loop(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    async with client.post(url, json=bodies[i % len(bodies)]) as r:
                        await r.read()
                        code = r.status
                except (TimeoutError, aiohttp.ClientError) as e:  # counts against it
                    code = type(e).__name__
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
        "errors": errors,
        "statuses": statuses,
    }
