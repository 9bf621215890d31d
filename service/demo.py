"""The main job's last step: `python -m service.demo [--force] [--stop] [--port 3000]`.

Starts the service in the background on the exported demo model (`digits:latest`), waits until
it is ready, sends real prediction requests through the JSON route and the Open Inference
Protocol route, and prints the answers, the URLs and how to stop it. A server this command
started earlier and that still answers is reused unless --force is given.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
STATE = Path("runs/serve/server.json")  # pid and port of the background server
LOG = Path("runs/serve/server.log")
DIGITS = Path("data/digits")  # written by `python -m finetune.demo`


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def running() -> dict | None:
    """The server this command started, if it still answers."""
    if not STATE.is_file():
        return None
    state = json.loads(STATE.read_text())
    if _alive(state["pid"]) and _ready(state["url"]):
        return state
    return None


def stop() -> bool:
    if not STATE.is_file():
        return False
    state = json.loads(STATE.read_text())
    STATE.unlink()
    if not _alive(state["pid"]):
        return False
    os.killpg(state["pid"], signal.SIGTERM)  # bentoml serve and its workers
    for _ in range(100):
        if not _alive(state["pid"]):
            break
        time.sleep(0.1)
    return True


def start(model: str, port: int, timeout: float = 180) -> dict:
    if not _port_free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    LOG.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNESERVE_MODEL": model}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:Tuneserve"]
        + ["--working-dir", str(PROJECT), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(LOG, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # keeps serving after this command returns
    )
    state = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}", "model": model}
    t0 = time.monotonic()
    while not _ready(state["url"]):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            tail = LOG.read_text().strip().splitlines()[-5:]
            raise SystemExit("error: the service did not start; " + " | ".join(tail))
        time.sleep(0.2)
    STATE.write_text(json.dumps(state))
    print(f"service ready in {time.monotonic() - t0:.1f} s (log: {LOG})")
    return state


def samples(n: int = 3) -> list[tuple[str, Path]]:
    """One real image of each of the first `n` digit classes: (true label, file)."""
    if not DIGITS.is_dir():
        raise SystemExit(f"error: {DIGITS}/ is missing; run `python -m finetune.demo` first")
    folders = sorted(p for p in DIGITS.iterdir() if p.is_dir())[:n]
    return [(f.name, sorted(f.glob("*.png"))[-1]) for f in folders]


def predict(url: str, images: list[tuple[str, Path]]) -> None:
    import httpx

    encoded = [base64.b64encode(path.read_bytes()).decode("ascii") for _, path in images]
    r = httpx.post(f"{url}/predict", json={"inputs": encoded, "top_k": 3}, timeout=30)
    r.raise_for_status()
    body = r.json()
    print(f"\nPOST {url}/predict  ({body['model']}:{body['version']})")
    for (label, path), p in zip(images, body["predictions"], strict=True):
        top = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p["top_k"])
        print(f"  {path}  true {label}  predicted {p['label']}  top 3: {top}")

    name = body["model"]
    oip = {
        "inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [len(encoded)], "data": encoded}]
    }
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=oip, timeout=30)
    r.raise_for_status()
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    print(f"POST {url}/v2/models/{name}/infer  (Open Inference Protocol)")
    print(f"  label: {outputs['label']['data']}")
    probs, width = outputs["probabilities"]["data"], outputs["probabilities"]["shape"][1]
    top1 = [round(max(probs[i : i + width]), 3) for i in range(0, len(probs), width)]
    print(f"  top-1 probability: {top1}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__)
    parser.add_argument("--model", default="digits:latest", help="model-store tag or folder")
    parser.add_argument("--port", type=int, default=3000, help="preferred port (else a free one)")
    parser.add_argument("--force", action="store_true", help="restart a running demo server")
    parser.add_argument("--stop", action="store_true", help="stop the demo server and exit")
    args = parser.parse_args(argv)
    if args.stop:
        print("stopped" if stop() else "no demo server was running")
        return 0
    state = running()
    if state and (args.force or state["model"] != args.model):
        stop()
        state = None
    if state:
        print(f"service already running at {state['url']} (use --force to restart)")
    else:
        state = start(args.model, args.port)
    url = state["url"]
    predict(url, samples())
    print(
        f"\nAPI docs:  {url}/ (OpenAPI: {url}/docs.json)\n"
        f"metrics:   {url}/metrics\n"
        f"stop it:   .venv/bin/python -m service.demo --stop   (pid {state['pid']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
