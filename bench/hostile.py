"""Hostile clients against live servers.

    python bench/hostile.py ARTIFACT...   # every task: its probe set (bench/probes.py)
    python bench/reliability.py --hostile --run runs/sms_spam --image-run runs/digits

Per task (`python bench/hostile.py`): every body of the task's probe set must get a 4xx with a
JSON error; then the heaviest legal request of the task, from 4 clients, while /livez is
probed; the workers' RSS before and after.

The `--hostile` mode of bench/reliability.py:

Text server (fp32, as users first serve it): closed-loop bursts of 64 clients x 8 and x 32
texts (every answer checked against the in-process runtime), malformed OIP and JSON on every
route, a 30 MiB chunked body (413 before it is read whole: the server's RSS must not grow by
the body's size), a worker SIGKILL under load. Image server: decompression bombs on every
route, and /livez latency while 64 clients send 6-megapixel JPEGs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from serve import free_port, python_path, rss_mb, start, stop, wait_ready


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real decompression bomb: width x height grey zeros, zlib-compressed (a few hundred KB
    that decode to width x height bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def photo_jpeg(megapixels: float = 6.0, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth gradients and noise) of about `megapixels`."""
    from PIL import Image

    h = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    w = int(h * 4 / 3)
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    px = np.clip(x * 0.6 + rng.normal(60, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=88)
    return buf.getvalue()


MALFORMED_OIP = [
    {"inputs": [{"name": "I", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": "x"},
    {"inputs": [{"name": "I", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": [1]},
    {"inputs": [{"name": "I", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": [{}]},
    {"inputs": [{"name": "I", "datatype": "BYTES", "shape": "x", "data": ["x"]}]},
    {"inputs": [{"name": "I", "datatype": "BYTES", "shape": [3], "data": ["x"]}]},
    {"inputs": [{"name": "I", "datatype": "BYTES", "shape": [1], "data": [None]}]},
    {"inputs": [{"name": "I", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
    {"inputs": [{"name": "I", "datatype": "BYTES", "parameters": {"binary_data_size": -4}}]},
    {"inputs": [{"name": "I", "datatype": "BYTES", "parameters": "big"}]},
    {"inputs": "x"},
    {"parameters": {"binary_data_output": "yes"}, "inputs": []},
    [],
    "inputs",
]


async def bursts(
    url: str, texts: list[str], expected: list[str], clients: int, items: int, seconds: float
) -> dict:
    """Closed loop: each client posts `items` texts, checks every label, and posts again."""
    import aiohttp

    statuses: dict = {}
    wrong = answered = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def client(k: int) -> None:
            nonlocal wrong, answered
            i = k * items
            while time.perf_counter() < stop_at:
                idx = [(i + j) % len(texts) for j in range(items)]
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json={"inputs": [texts[j] for j in idx]}) as r:
                        body = await r.json(content_type=None)
                        code = r.status
                except (TimeoutError, aiohttp.ClientError) as e:
                    code, body = type(e).__name__, None
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(time.perf_counter() - t0)
                    got = [p["label"] for p in body["predictions"]]
                    wrong += sum(g != expected[j] for g, j in zip(got, idx, strict=True))
                    answered += len(got)
                i += clients * items

        await asyncio.gather(*(client(k) for k in range(clients)))
    latencies.sort()
    return {
        "statuses": statuses,
        "items_answered": answered,
        "wrong": wrong,
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "max_s": latencies[-1] if latencies else None,
    }


def chunked_body(url: str, pid: int, mib: int = 30) -> dict:
    """`mib` MiB of JSON in 64 KiB chunks with no Content-Length; stops sending once the
    server answers. RSS of the server's process tree before and after."""
    host, port = url.removeprefix("http://").split(":")
    before = rss_mb(pid)
    piece = b"A" * 65536
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b'10\r\n{"inputs": ["AAA\r\n'
        )
        for _ in range(mib * 16):
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except OSError:
                break
            sent += len(piece)
        try:
            answer = s.recv(65536)
        except OSError:
            pass
    return {
        "status": answer[9:12].decode(errors="replace"),
        "sent_mib": sent / 2**20,
        "rss_growth_mib": rss_mb(pid) - before,
    }


def malformed(url: str, model: str) -> dict:
    """Every malformed body on every prediction route; the statuses seen."""
    import httpx

    statuses: dict = {}

    def count(r) -> None:
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    for body in MALFORMED_OIP:
        count(httpx.post(f"{url}/v2/models/{model}/infer", json=body))
        count(httpx.post(f"{url}/predict", json=body))
    for raw, ctype in [
        (b"{not json", "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"--x\r\nContent-Disposition: form-data\r\n\r\n", "multipart/form-data; boundary=x"),
        (b"junk", "multipart/form-data"),
    ]:
        for route in ("/predict", "/predict_file", f"/v2/models/{model}/infer"):
            count(httpx.post(url + route, content=raw, headers={"content-type": ctype}))
    count(
        httpx.post(
            f"{url}/v2/models/{model}/infer",
            content=b'{"inputs": []}',
            headers={"Inference-Header-Content-Length": "99999"},
        )
    )
    return statuses


def bombs(url: str, model: str) -> dict:
    import httpx

    bomb = bomb_png()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 4 + len(bomb)},
                }
            ]
        }
    ).encode()
    answers = {
        "/predict": httpx.post(
            url + "/predict", json={"inputs": [base64.b64encode(bomb).decode()]}, timeout=60
        ),
        "/predict_file": httpx.post(
            url + "/predict_file", files=[("files", ("b.png", bomb, "image/png"))], timeout=60
        ),
        "infer": httpx.post(
            f"{url}/v2/models/{model}/infer",
            content=head + struct.pack("<I", len(bomb)) + bomb,
            headers={"Inference-Header-Content-Length": str(len(head))},
            timeout=60,
        ),
    }
    return {"bomb_kib": len(bomb) // 1024, **{k: r.status_code for k, r in answers.items()}}


def probes_under_photos(url: str, clients: int, seconds: float) -> dict:
    """/livez every 50 ms while `clients` closed-loop clients send one 6-MP JPEG each."""
    import httpx

    photo = base64.b64encode(photo_jpeg()).decode()
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client() as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.get(url + "/livez", timeout=60)
                probes.append(time.perf_counter() - t0)
                time.sleep(0.05)

    from load import closed_loop

    watcher = threading.Thread(target=probe)
    watcher.start()
    load = asyncio.run(closed_loop(url + "/predict", [{"inputs": [photo]}], clients, seconds))
    done.set()
    watcher.join()
    probes.sort()
    return {
        "photo_kib": len(photo) * 3 // 4 // 1024,
        "load_rps": load["rps"],
        "load_statuses": load["statuses"],
        "livez_n": len(probes),
        "livez_p50_ms": 1000 * probes[len(probes) // 2],
        "livez_p99_ms": 1000 * probes[int(len(probes) * 0.99) - 1],
        "livez_max_ms": 1000 * probes[-1],
    }


def kill_under_load(url: str, pid: int, texts: list[str], expected: list[str]) -> dict:
    """SIGKILL one worker 5 s into 20 s of 64 clients x 8 texts."""
    import psutil

    workers = [
        p.pid
        for p in psutil.Process(pid).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    ]
    threading.Timer(5, lambda: os.kill(workers[0], signal.SIGKILL)).start()
    r = asyncio.run(bursts(url + "/predict", texts, expected, 64, 8, 20))
    return {"killed": workers[0], **r}


def serve(artifact: Path, tmp: Path, name: str, **env: str):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp / f"home-{name}"
    home.mkdir()
    proc = start(
        [sys.executable, "-m", "bentoml", "serve", "--port", str(port)],
        {
            "TUNESERVE_MODEL": str(artifact),
            "PYTHONPATH": python_path(),
            "BENTOML_HOME": str(home),
            **env,
        },
        tmp / f"{name}.log",
    )
    wait_ready(url + "/readyz", proc)
    return proc, url


def run(
    text_artifact: Path, texts: list[str], image_artifact: Path | None, tmp: Path, seconds: float
) -> None:
    from export.card import load_card
    from service.runtime import Runtime

    rt = Runtime(text_artifact, precision="fp32")
    expected = [p["label"] for p in rt.predict([rt.prepare(t) for t in texts])]
    del rt
    proc, url = serve(text_artifact, tmp, "text", TUNESERVE_PRECISION="fp32")
    try:
        for items in (8, 32):
            r = asyncio.run(bursts(url + "/predict", texts, expected, 64, items, seconds))
            print(f"burst 64 clients x {items} texts, {seconds:.0f} s: {r}", flush=True)
        name = load_card(text_artifact)["name"]
        print(f"malformed OIP / JSON / multipart, every route: {malformed(url, name)}")
        print(f"30 MiB chunked body: {chunked_body(url, proc.pid)}", flush=True)
        print(f"worker SIGKILL under load: {kill_under_load(url, proc.pid, texts, expected)}")
    finally:
        stop(proc)
    if image_artifact is None:
        print("no image checkpoint: bombs and probes under photos skipped")
        return
    name = load_card(image_artifact)["name"]
    proc, url = serve(image_artifact, tmp, "image")
    try:
        print(f"decompression bombs: {bombs(url, name)}", flush=True)
        print(f"/livez under 64 clients x one 6-MP JPEG: {probes_under_photos(url, 64, seconds)}")
    finally:
        stop(proc)


# --------------------------------------------------------------------------- every task

JSON = {"content-type": "application/json"}


SETTLE_S = 2.0  # idle seconds before the RSS after the load is read


def worker_rss_mb(pid: int) -> float:
    """Resident memory of the server's worker processes only, MiB."""
    import psutil

    workers = [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    ]
    return sum(p.memory_info().rss for p in workers) / 2**20


def probe_set(url: str, model: str, probes: list[tuple[str, bytes]]) -> dict:
    """Every probe on /predict (and the nested one on OIP too): statuses, and the probes that
    did not get a 4xx with a JSON error body."""
    import httpx

    statuses: dict[int, int] = {}
    wrong = []
    nested_oip = b'{"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1], "data": '
    nested_oip += b"[" * 50_000 + b"]" * 50_000 + b"}]}"
    routes = [("/predict", name, raw) for name, raw in probes]
    routes.append((f"/v2/models/{model}/infer", "OIP nested 50,000 deep", nested_oip))
    with httpx.Client(timeout=120) as c:
        for route, name, raw in routes:
            r = c.post(url + route, content=raw, headers=JSON)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            try:
                named = bool(r.json().get("error"))
            except ValueError:
                named = False
            if not (400 <= r.status_code < 500 and named):
                wrong.append(f"{name}: {r.status_code} {r.text[:120]}")
    return {"probes": len(routes), "statuses": statuses, "not_4xx": wrong}


def livez_under(url: str, raw: bytes, clients: int, seconds: float) -> dict:
    """/livez every 50 ms while `clients` closed-loop clients send the request `raw`."""
    import httpx

    probes: list[float] = []
    statuses: dict = {}
    done = threading.Event()

    def probe() -> None:
        with httpx.Client() as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.get(url + "/livez", timeout=60)
                probes.append(time.perf_counter() - t0)
                time.sleep(0.05)

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while not done.is_set():
                try:
                    code = c.post(url + "/predict", content=raw, headers=JSON).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                statuses[code] = statuses.get(code, 0) + 1

    threads = [threading.Thread(target=probe)] + [
        threading.Thread(target=client) for _ in range(clients)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    done.set()
    for t in threads:
        t.join()
    probes.sort()
    return {
        "load_statuses": statuses,
        "livez_n": len(probes),
        "livez_p50_ms": round(1000 * probes[len(probes) // 2], 1),
        "livez_p99_ms": round(1000 * probes[max(0, int(len(probes) * 0.99) - 1)], 1),
        "livez_max_ms": round(1000 * probes[-1], 1),
    }


def fuzz(url: str, model: str, tmp: Path, examples: int) -> dict:
    """schemathesis over the server's /docs.json (every route, the OIP ones with the model's
    name): the cases it ran and the server errors it found (`not_a_server_error`)."""
    import re
    import subprocess

    config = tmp / f"schemathesis-{model}.toml"
    config.write_text(f'[parameters]\n"path.name" = "{model}"\n')
    st = Path(sys.executable).with_name("schemathesis")
    proc = subprocess.run(
        [str(st), "--config-file", str(config), "run", url + "/docs.json",
         "--checks", "not_a_server_error", "--max-examples", str(examples),
         "--workers", "2", "--no-color"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout
    (tmp.parent / f"schemathesis-{model}.log").write_text(out)  # the whole report, kept
    cases = re.search(r"(\d[\d,]*) generated", out)
    errors = re.findall(r"^(?:[^\n]*Error[^\n]*)$", out, re.M)  # schemathesis' own, not 5xx
    return {
        "fuzz_errors": errors[:3],
        "fuzz_exit": proc.returncode,
        "fuzz_cases": int(cases.group(1).replace(",", "")) if cases else None,
        "fuzz_server_errors": len(re.findall(r"Server error", out)),
        "fuzz_tail": out.strip().splitlines()[-1][:200] if out.strip() else proc.stderr[-200:],
    }


def run_tasks(
    artifacts: list[Path], tmp: Path, seconds: float, clients: int = 4, examples: int = 0
) -> list[dict]:
    """Per artifact: a live server, its task's probe set, then the heaviest legal request
    from `clients` clients for `seconds` while /livez is probed; the workers' RSS before the
    probes (after one heaviest request) and after all of it."""
    import httpx
    import probes as task_probes

    from export.card import load_card

    rows = []
    for art in artifacts:
        card = load_card(art)
        name = card["task"]
        proc, url = serve(art, tmp, name)
        try:
            what, raw = task_probes.heaviest(card)
            first = httpx.post(url + "/predict", content=raw, headers=JSON, timeout=300)
            before = worker_rss_mb(proc.pid)
            found = probe_set(url, card["name"], task_probes.task_probes(card))
            load = livez_under(url, raw, clients, seconds)
            time.sleep(SETTLE_S)  # the worker's trim after its last heavy request (memory.py)
            after = worker_rss_mb(proc.pid)
            fuzzed = fuzz(url, card["name"], tmp, examples) if examples else {}
            row = {
                "task": name,
                "heaviest": what,
                "heaviest_mib": round(len(raw) / 2**20, 1),
                "first_heaviest_status": first.status_code,
                **found,
                **load,
                "worker_rss_before_mib": round(before),
                "worker_rss_growth_mib": round(after - before),
                **fuzzed,
            }
        finally:
            stop(proc)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description="every task's probe set against its live server")
    p.add_argument("artifacts", nargs="+", type=Path, help="artifact folders (one per task)")
    p.add_argument("--seconds", type=float, default=20, help="heaviest-request load, seconds")
    p.add_argument(
        "--fuzz", type=int, default=0, help="schemathesis examples per route (0: no fuzzing)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_tasks(args.artifacts, Path(tmp), args.seconds, examples=args.fuzz)
    fivexx = sum(n for r in results for s, n in r["statuses"].items() if s >= 500)
    print(f"5xx over every probe set: {fivexx}")
    for r in results:
        print(
            f"| {r['task']} | {r['probes']} | {r['statuses']} | {len(r['not_4xx'])} | "
            f"{r['heaviest']} ({r['heaviest_mib']} MiB): {r['load_statuses']} | "
            f"{r['livez_p99_ms']} | {r['worker_rss_growth_mib']} |"
        )
