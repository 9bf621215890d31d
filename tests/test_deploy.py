"""Deployment files: the bento, the Dockerfile (hadolint, its COPY sources, its Python
requirements against what the service imports) and the Kubernetes overlays (rendered by
kubectl kustomize, validated against the Kubernetes schemas)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVING_SOURCES = [*sorted((ROOT / "service").glob("*.py")), ROOT / "export/card.py"]
# tasks/metrics.py is evaluation only (fine-tuning and export): scikit-learn and seqeval.
SERVING_SOURCES += [ROOT / "export/errors.py"]
SERVING_SOURCES += [p for p in sorted((ROOT / "tasks").glob("*.py")) if p.name != "metrics.py"]


def _tool(name: str) -> str:
    """A tool from the virtual environment (dev extras) or the PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' provides it")
    return found


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_passes_hadolint():
    r = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY":
            args = [p for p in parts[1:] if not p.startswith("--")]
            out.append((args[:-1], args[-1]))
    return out


def _lay_out_workdir(app: Path) -> None:
    """What the Dockerfile's COPY lines put in its WORKDIR (the staged store aside), so that
    a module the image lacks fails here as it would in the image."""
    for sources, dest in _copies():
        if dest.startswith("/"):  # build/models/ → the store, staged by the test itself
            continue
        target = app / dest
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(path, target, ignore=ignore, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)


def test_dockerfile_copies_files_that_exist_and_are_not_dockerignored():
    ignore = (ROOT / ".dockerignore").read_text().split()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    copies = _copies()
    assert copies, "no COPY found"
    for sources, _dest in copies:
        for src in sources:
            if src.startswith("build/"):  # staged by `make image` (service.stage), tested below
                assert "service.stage" in (ROOT / "Makefile").read_text()
            else:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
            assert any(src.rstrip("/").startswith(a) for a in allowed), f"{src} is dockerignored"


def test_dockerfile_runs_as_non_root_with_a_readiness_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.M)
    assert re.search(r"^FROM nvidia/cuda:\S+-cudnn-runtime-", text, re.M)


def _requirement_closure(files: list[Path]) -> set[str]:
    """Distribution names the requirement files install on the image's platform, with their
    dependencies (as the metadata installed here states them)."""
    from packaging.requirements import Requirement

    image = {"sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}

    def wanted(line: str) -> list[str]:
        r = Requirement(line)
        return [r.name] if r.marker is None or r.marker.evaluate(image) else []

    todo = []
    for f in files:
        for line in f.read_text().splitlines():
            if line := line.split("#")[0].strip():
                todo += wanted(line)
    seen: set[str] = set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            todo += wanted(line)
    return seen


def _imported_top_modules(paths: list[Path]) -> set[str]:
    mods = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"service", "export", "tasks", "__future__"}


def test_image_requirements_install_every_module_the_service_imports():
    installed = _requirement_closure([ROOT / "requirements/serve.txt"])
    dists = md.packages_distributions()
    missing = []
    for mod in sorted(_imported_top_modules(SERVING_SOURCES)):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(mod, [])}
        if not names & installed:
            missing.append(f"{mod} (from {sorted(names) or 'nothing installed here'})")
    assert not missing, f"the image's requirements do not install: {missing}"
    assert "torch" not in installed and "transformers" not in installed


def test_stage_lays_out_one_store_version(image_artifact_dir, tmp_path):
    from export.card import load_card
    from export.store import register
    from service.stage import stage

    card = load_card(image_artifact_dir)
    register(image_artifact_dir, "stagetest", "v3", card)
    tag = stage("stagetest:latest", tmp_path / "models")
    assert tag == "stagetest:v3"
    assert (tmp_path / "models/stagetest/latest").read_text() == "v3"
    assert (tmp_path / "models/stagetest/v3/card.json").is_file()
    with pytest.raises(SystemExit, match="not in the BentoML model store"):
        stage("nosuchmodel:v1", tmp_path / "other")
    assert stage("stagetest:v3", tmp_path / "models") == "stagetest:v3"  # its own: replaced
    mine = tmp_path / "mine"  # a folder of the user's, given by mistake: it was deleted
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match="refusing to empty it"):
        stage("stagetest:v3", mine)
    assert (mine / "notes.txt").read_text() == "precious"


# ------------------------------------------------------------------ bento


def _build_bento(artifact: Path, name: str) -> tuple[str, dict]:
    """`bentoml build` with `artifact` registered as `name:v1`: (the bento tag, the env)."""
    from export.card import load_card
    from export.store import register

    register(artifact, name, "v1", load_card(artifact))
    env = {**os.environ, "TUNESERVE_MODEL": f"{name}:v1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1].removeprefix("__tag__:"), env


def test_bentoml_build_packs_the_service_and_the_chosen_model(text_artifact_dir, tmp_path):
    # The tiny BERT (under 1 MB): `bentoml export` gzips the bento, 27 s for the ResNet-18
    # image artifact's 56 MB of random weights.
    tag, env = _build_bento(text_artifact_dir, "buildtest")
    archive = tmp_path / "tuneserve.bento"
    r = subprocess.run(
        [sys.executable, "-m", "bentoml", "export", tag, str(archive)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with tarfile.open(archive) as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
        reqs = tar.extractfile("./env/python/requirements.txt").read().decode()
    assert {"models/buildtest/v1/card.json", "models/buildtest/v1/model.onnx"} <= names
    assert "src/service/service.py" in names and "src/export/card.py" in names
    assert not any(n.startswith("src/finetune") for n in names)  # no training code
    assert "onnxruntime-gpu" in reqs and "bentoml==1.4.30" in reqs
    assert not re.search(r"^(torch|transformers)\b", reqs, re.M)


# ------------------------------------------------------------------ Kubernetes


def _render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (it renders the Kustomize overlays)")
    r = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_and_validate_against_kubernetes_schemas(overlay, tmp_path):
    docs = _render(overlay)
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    r = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", str(rendered)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(docs)

    kinds = {d["kind"]: d for d in docs}
    pod = kinds["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert re.fullmatch(r"[a-z0-9_.-]+:[a-z0-9_.-]+", env["TUNESERVE_MODEL"])
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "Service" in kinds
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "tuneserve"
        assert "nvidia.com/gpu" not in container["resources"]["limits"]


# ------------------------------------------------------------------ the shipped environment


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with requirements/serve.txt only, as the Dockerfile makes
    it: no editable install, no tuneserve distribution, no dev packages."""
    venv = tmp_path_factory.mktemp("serve-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "-r", "requirements/serve.txt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def _check_every_route(url: str, artifact: Path) -> None:
    """JSON, multipart and OIP (tritonclient, JSON and binary tensors) answers equal the
    runtime's, and the metadata routes answer."""
    import base64

    import httpx
    import numpy as np
    import tritonclient.http as triton

    from tests.conftest import COLORS
    from tests.test_service import _expected, _png

    images = [_png(c, seed=5) for c in COLORS.values()]
    want = [p["label"] for p in _expected(artifact, images)]
    r = httpx.post(
        url + "/predict", json={"inputs": [base64.b64encode(i).decode() for i in images]}
    )
    assert r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == want, r.text
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = httpx.post(url + "/predict_file", files=files)
    assert r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == want, r.text
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.get_server_metadata()["name"] == "tuneserve"
    for binary in (True, False):
        tensor = triton.InferInput("INPUT", [len(images)], "BYTES")
        data = images if binary else [base64.b64encode(i) for i in images]
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
        labels = client.infer(r.json()["model"], [tensor]).as_numpy("label")
        assert [x.decode() for x in labels] == want
    for path in ("/v2", "/livez", "/readyz", "/metrics", "/docs.json", "/"):
        assert httpx.get(url + path).status_code == 200, path


@pytest.mark.slow
def test_the_image_layout_serves_every_route(serve_venv, image_artifact_dir, tmp_path):
    """The Dockerfile's copies only (its WORKDIR as `_lay_out_workdir` makes it, the staged
    store), started as its CMD: GET /v2 read an installed distribution that is not there."""
    from export.card import load_card
    from export.store import register
    from service.stage import stage
    from tests.test_service import _serve, _stop

    register(image_artifact_dir, "imagetest", "v1", load_card(image_artifact_dir))
    app = tmp_path / "app"
    _lay_out_workdir(app)
    stage("imagetest:v1", tmp_path / "models")
    proc, url = _serve(
        "imagetest:v1",
        tmp_path / "image.log",
        python=str(serve_venv / "bin/python"),
        cwd=app,
        store=tmp_path / "models",
        PYTHONPATH="",
    )
    try:
        _check_every_route(url, image_artifact_dir)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_the_built_bento_serves_every_route_from_its_folder(
    serve_venv, image_artifact_dir, tmp_path
):
    import bentoml

    from tests.test_service import _serve, _stop

    tag, _ = _build_bento(image_artifact_dir, "bentotest")
    # What is shipped: the exported bento (models packed inside), unpacked on another host.
    archive, folder = tmp_path / "tuneserve.bento", tmp_path / "bento"
    bentoml.export_bento(tag, str(archive))
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    proc, url = _serve(
        "bentotest:v1",
        tmp_path / "bento.log",
        python=str(serve_venv / "bin/python"),
        cwd=tmp_path,
        target=(str(folder),),
        store=tmp_path / "empty-store",
        PYTHONPATH="",
    )
    try:
        _check_every_route(url, image_artifact_dir)
    finally:
        _stop(proc)
