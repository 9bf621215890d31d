"""tuneserve against the serving systems users would pick instead: `make bench-peers`, or
`python bench/peers.py [--text-artifact DIR] [--image-artifact DIR] [--image-format png|jpeg]
[--seconds 10] [--task-artifact DIR ...]`.

Every peer runs in its own virtual environment (bench/.venv-peers/<peer>, created here from
PyPI: the newest plain BentoML, LitServe, MLServer, Ray Serve, Triton through PyTriton,
TorchServe with the machine's Java) and serves the same artifact file with the same
pre-processing: bench/peer_servers/common.py runs the ONNX file in ONNX Runtime (the same
release as tuneserve's, one thread per process) around tuneserve's own task contract. Each
peer has its documented dynamic batching on (max batch 32, 10 ms wait where it has one)
and two worker processes (or replicas, or model instances), as tuneserve has.

Text peers run two ways: `users` pads every batch to its longest text (as users write
them), `bucketed` uses tuneserve's length buckets, which separates the serving path from
the batching policy. Before any timing, each peer's labels on a sample of inputs must
equal tuneserve's. Load: wrk (closed loop, one input per request) at 1, 32 and 64 clients.
Prints one table per artifact: req/s, p50, p99, errors, server CPU (cores) and RSS at 64
clients, time to ready, and tuneserve ÷ peer at 32 and 64 clients.

Artifacts of the other tasks (`--task-artifact`: entities, answers, detection, segmentation,
tables, audio) run against `--task-peers` (Triton by default, the fastest peer on text and
images) through the task contract's own batch path; their answers are checked on labels,
offsets and texts (`peer_servers/common.py: answer_key`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from load import load  # noqa: E402
from peer_servers.common import answer_key  # noqa: E402
from serve import free_port, rss_mb, start, stop  # noqa: E402

SERVERS = ROOT / "bench" / "peer_servers"
VENVS = ROOT / "bench" / ".venv-peers"
WORKERS, MAX_BATCH, WAIT_S = 2, 32, 0.01
COMMON = ("tokenizers", "numpy", "pillow", "soundfile", "scipy")  # what tasks/ imports
PACKAGES = {
    "bentoml": ["bentoml==1.4.40"],
    "litserve": ["litserve==0.2.19"],
    "mlserver": ["mlserver==1.7.1", "uvloop<0.22"],  # 0.22's get_event_loop breaks its workers
    "rayserve": ["ray[serve]==2.60.0"],
    "pytriton": ["nvidia-pytriton==0.7.0"],
    # the worker imports torch (the handler does not use it); the CPU build is enough
    "torchserve": ["torchserve==0.12.0", "torch-model-archiver==0.12.0", "torch"],
}


def onnxruntime_pin() -> str:
    """The CPU onnxruntime of tuneserve's own release: same kernels for everyone."""
    import onnxruntime

    return f"onnxruntime=={onnxruntime.__version__}"


# PyTriton 0.7's Triton Python-backend stub fails on CPython 3.11.7's multiprocessing
# ('_thread.RLock' object has no attribute '_recursion_count'): it runs under 3.12.
PYTHON_VERSION = {"pytriton": "3.12"}


def interpreter(version: str | None) -> str:
    """This Python, or another installed version (on PATH or under pyenv)."""
    if version is None:
        return sys.executable
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-V"], capture_output=True).returncode == 0:
        return found
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}")):
        return str(candidate)
    raise RuntimeError(f"needs Python {version}, which is not installed here")


def peer_python(name: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not (VENVS / name / ".installed").is_file():
        print(f"  creating {VENVS / name} ({' '.join(PACKAGES[name])}) ...", flush=True)
        shutil.rmtree(VENVS / name, ignore_errors=True)
        base = interpreter(PYTHON_VERSION.get(name))
        subprocess.run([base, "-m", "venv", str(VENVS / name)], check=True)
        pkgs = [*PACKAGES[name], onnxruntime_pin(), *COMMON]
        subprocess.run([python, "-m", "pip", "install", "-q", *pkgs], check=True)
        (VENVS / name / ".installed").touch()
    return python


def libdir(python: Path) -> str:
    """Where the interpreter's libpython lives (Triton's Python stub loads it)."""
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- the peers


@dataclass
class Peer:
    name: str
    path: str  # the predict route
    body: object  # value → JSON body of one request
    label: object  # JSON answer → label
    modes: tuple[str, ...] = ("users", "bucketed")
    extra: dict = field(default_factory=dict)


def _oip(name: str):
    return lambda v: {"inputs": [{"name": name, "shape": [1, 1], "datatype": "BYTES", "data": [v]}]}


PEERS = {
    "tuneserve": Peer(
        "tuneserve",
        "/predict",
        lambda v: {"inputs": [v]},
        lambda r: answer_key(r["predictions"][0]),
        ("bucketed",),
    ),
    "bentoml": Peer("bentoml", "/predict", lambda v: {"inputs": [v]}, lambda r: r[0]),
    "litserve": Peer("litserve", "/predict", lambda v: {"input": v}, lambda r: r["label"]),
    "mlserver": Peer(
        "mlserver",
        "/v2/models/peer/infer",
        lambda v: {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [v]}]},
        lambda r: r["outputs"][0]["data"][0],
    ),
    "rayserve": Peer("rayserve", "/predict", lambda v: {"input": v}, lambda r: r["label"]),
    "pytriton": Peer(
        "pytriton", "/v2/models/peer/infer", _oip("input"), lambda r: r["outputs"][0]["data"][0]
    ),
    "torchserve": Peer(
        "torchserve", "/predictions/peer", lambda v: {"input": v}, lambda r: r["label"]
    ),
}


def launch(peer: Peer, artifact: Path, mode: str, port: int, work: Path):
    """Start one server; returns its process."""
    env = {
        "PEER_ARTIFACT": str(artifact),
        "PEER_MODE": mode,
        "PEER_PORT": str(port),
        "PEER_WORKERS": str(WORKERS),
        "PEER_MAX_BATCH": str(MAX_BATCH),
        "PEER_BATCH_WAIT_S": str(WAIT_S),
        "PYTHONPATH": os.pathsep.join([str(SERVERS), str(ROOT)]),
        "BENTOML_DO_NOT_TRACK": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    log = work / f"{peer.name}-{mode}.log"
    if peer.name == "tuneserve":
        env |= {
            "TUNESERVE_MODEL": str(artifact),
            "TUNESERVE_WORKERS": str(WORKERS),
            "TUNESERVE_THREADS": "1",
            "TUNESERVE_MAX_BATCH_SIZE": str(MAX_BATCH),
            "PYTHONPATH": str(ROOT),
        }
        cmd = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
        return start(cmd, env, log)
    python = peer_python(peer.name)
    bindir = python.parent
    if peer.name == "bentoml":
        cmd = [python, "-m", "bentoml", "serve", "bentoml_peer:Peer", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--working-dir", str(SERVERS)]
    elif peer.name == "mlserver":
        folder = work / f"mlserver-{mode}"
        folder.mkdir(exist_ok=True)
        settings = {"http_port": port, "grpc_port": port + 1, "metrics_port": port + 2}
        settings |= {"parallel_workers": WORKERS, "host": "127.0.0.1"}
        (folder / "settings.json").write_text(json.dumps(settings))
        model = {
            "name": "peer",
            "implementation": "mlserver_peer.PeerRuntime",
            "max_batch_size": MAX_BATCH,
            "max_batch_time": WAIT_S,
        }
        (folder / "model-settings.json").write_text(json.dumps(model))
        cmd = [bindir / "mlserver", "start", str(folder)]
    elif peer.name == "torchserve":
        folder = work / f"torchserve-{mode}"
        store = folder / "store"
        store.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                bindir / "torch-model-archiver",
                "--model-name",
                "peer",
                "--version",
                "1",
                "--handler",
                str(SERVERS / "torchserve_peer.py"),  # its module-level handle()
                "--extra-files",
                str(SERVERS / "common.py"),
                "--export-path",
                str(store),
                "--force",
            ],
            check=True,
        )
        (folder / "config.properties").write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{port}",
                    f"management_address=http://127.0.0.1:{port + 1}",
                    f"metrics_address=http://127.0.0.1:{port + 2}",
                    "disable_token_authorization=true",
                    "enable_envvars_config=true",
                    "install_py_dep_per_model=false",
                    f"default_workers_per_model={WORKERS}",
                    'models={"peer": {"1": {"marName": "peer.mar", "minWorkers": '
                    f'{WORKERS}, "maxWorkers": {WORKERS}, "batchSize": {MAX_BATCH}, '
                    f'"maxBatchDelay": {int(WAIT_S * 1000)}, "responseTimeout": 120}}}}}}',
                    f"model_store={store}",
                    "load_models=peer.mar",
                ]
            )
            + "\n"
        )
        env["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
        env["TMPDIR"] = str(folder)  # its pid file: one per run, not /tmp/.model_server.pid
        # its logs (./logs by default, i.e. the repository) go with the run's files
        env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(folder / "logs")
        cmd = [bindir / "torchserve", "--start", "--foreground", "--ncs"]
        cmd += ["--ts-config", str(folder / "config.properties")]
    else:
        cmd = [python, str(SERVERS / f"{peer.name}_peer.py")]
        if peer.name == "pytriton":
            env["LD_LIBRARY_PATH"] = libdir(python)
    return start([str(c) for c in cmd], env, log)


def wait_answer(url: str, body: dict, proc, timeout: float = 300) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.post(url, json=body, timeout=30).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} gave no answer in {timeout} s")


def cpu_seconds(pid: int) -> float:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(peer: Peer, mode: str, artifact: Path, values: list, truth: list | None, args, work):
    """Start, check the answers, load at each client count, stop: one result row."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}{peer.path}"
    row, proc = {"peer": peer.name, "mode": mode}, None
    if peer.name != "tuneserve":  # every peer's request carries strings: JSON inputs as text
        values = [v if isinstance(v, str) else json.dumps(v) for v in values]
    try:
        proc = launch(peer, artifact, mode, port, work)
        row["ready_s"] = wait_answer(url, peer.body(values[0]), proc)
        sample = values[: args.check]
        got = [peer.label(httpx.post(url, json=peer.body(v), timeout=60).json()) for v in sample]
        row["labels"] = got
        if truth is not None and got != truth[: len(got)]:
            wrong = sum(a != b for a, b in zip(got, truth, strict=False))
            row["error"] = f"{wrong} of {len(got)} answers differ from tuneserve's"
            return row
        bodies = [peer.body(v) for v in values]
        load(url, bodies, 8, 3)  # warm-up
        for clients in args.clients:
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            r = load(url, bodies, clients, args.seconds)
            cores = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
            row[clients] = {**r, "server_cores": cores}
        row["rss_mb"] = rss_mb(proc.pid)
    except Exception as e:  # a peer that fails is reported, not fatal to the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if proc is not None:
            stop(proc)
        if peer.name == "torchserve":
            subprocess.run(["pkill", "-f", "org.pytorch.serve"], check=False)
    return row


# --------------------------------------------------------------------------- artifacts


def build_artifact(kind: str, tmp: Path) -> Path:
    """A quick fp32 artifact on the shared data: the weights do not change serving speed."""
    from export.pipeline import export_checkpoint
    from finetune.config import TrainConfig
    from finetune.train import fine_tune

    shared = ROOT.parent / "shared" / "data"
    data = shared / ("sms_spam/SMSSpamCollection" if kind == "text" else "flowers12")
    cfg = TrainConfig(strategy="feature-extraction", epochs=1, holdout_size=256)
    print(f"building a {kind} artifact from {data} ...", flush=True)
    fine_tune(data, tmp / f"{kind}-run", cfg, log=lambda _s: None)
    return export_checkpoint(tmp / f"{kind}-run", tmp / "art", register=False, log=lambda _s: None)


def request_values(artifact: Path, image_format: str) -> list:
    """Request values from the artifact's checkpoint holdout (texts, base64 images)."""
    from serve import request_inputs

    from finetune import checkpoint

    run = Path(json.loads((artifact / "card.json").read_text())["training"]["checkpoint"])
    if not run.is_dir():
        raise SystemExit(
            f"the checkpoint of '{artifact}' ({run}) is not here: its holdout is the load"
        )
    return request_inputs(checkpoint.load_checkpoint(run), image_format)


# --------------------------------------------------------------------------- report


def table(rows: list[dict], clients: list[int]) -> str:
    ours = next((r for r in rows if r["peer"] == "tuneserve" and "error" not in r), None)
    head = ["peer", "mode"] + [f"req/s @{c}" for c in clients]
    head += [f"p50 ms @{clients[0]}", f"p50 ms @{clients[-1]}", f"p99 ms @{clients[-1]}"]
    head += ["errors", f"server cores @{clients[-1]}", "RSS MB", "ready s"]
    head += [f"tuneserve ÷ peer @{c}" for c in clients[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['peer']} | {r['mode']} | {r['error']} |")
            continue
        cells = [r["peer"], r["mode"]] + [f"{r[c]['rps']:.0f}" for c in clients]
        cells += [f"{r[clients[0]]['p50_ms']:.1f}", f"{r[clients[-1]]['p50_ms']:.1f}"]
        cells += [f"{r[clients[-1]]['p99_ms']:.0f}", str(sum(r[c]["errors"] for c in clients))]
        cells += [f"{r[clients[-1]]['server_cores']:.2f}", f"{r['rss_mb']:.0f}"]
        cells += [f"{r['ready_s']:.1f}"]
        cells += [f"{ours[c]['rps'] / r[c]['rps']:.2f}" if ours else "-" for c in clients[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text-artifact", default=None, help="a text artifact; None: build one")
    p.add_argument("--image-artifact", default=None, help="an image artifact; None: build one")
    p.add_argument("--only", default="text,image", help="which artifacts: text, image or both")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers")
    p.add_argument(
        "--task-artifact",
        action="append",
        default=[],
        help="an artifact of another task (entities, answers, detection, segmentation, "
        "tables, audio; its checkpoint's holdout is the load), run against --task-peers",
    )
    p.add_argument(
        "--task-peers", default="pytriton", help="peers for --task-artifact (default: the best)"
    )
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per level")
    p.add_argument("--clients", default="1,32,64", help="closed-loop client counts")
    p.add_argument("--check", type=int, default=32, help="inputs whose labels must agree")
    p.add_argument(
        "--image-format",
        choices=["png", "jpeg"],
        default="png",
        help="how image requests carry the holdout: lossless PNG or JPEG at quality 90",
    )
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if not shutil.which("wrk"):
        print("note: no wrk on PATH (make wrk); the Python load generator costs more CPU")
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    names = ["tuneserve"] + [n for n in args.peers.split(",") if n in PEERS and n != "tuneserve"]
    task_names = ["tuneserve"] + [
        n for n in args.task_peers.split(",") if n in PEERS and n != "tuneserve"
    ]
    given = {"text": args.text_artifact, "image": args.image_artifact}
    runs = [(kind, given.get(kind), names) for kind in args.only.split(",") if kind]
    runs += [
        (json.loads((Path(a) / "card.json").read_text())["task"], a, task_names)
        for a in args.task_artifact
    ]
    for kind, folder, peers in runs:
        artifact = Path(folder) if folder else build_artifact(kind, work)
        values = request_values(artifact, args.image_format)
        print(f"\n## {kind}: {artifact}\n", flush=True)
        rows, truth = [], None
        for name in peers:
            peer = PEERS[name]
            # text: both modes; images: one size, one mode; other tasks: the contract's own
            # batch path, as tuneserve runs it
            modes = {"text": peer.modes, "image": peer.modes[:1]}.get(kind, peer.modes[-1:])
            for mode in modes:
                print(f"  {name} ({mode}) ...", flush=True)
                row = measure(peer, mode, artifact, values, truth, args, work)
                if name == "tuneserve":
                    truth = row.get("labels")
                rows.append(row)
        print(table(rows, args.clients), flush=True)
        (work / f"{kind}.json").write_text(json.dumps(rows, default=str, indent=1))
    print(f"\nraw results and server logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
