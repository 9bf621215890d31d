"""Export: ONNX conversion and parity for every backbone, variants, reference statistics, the
card contract, the BentoML store, and every failure path."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import card as card_mod
from export.errors import CardError, CheckpointInvalid, ParityError, VariantError, VersionExists
from export.pipeline import export_checkpoint
from tests.conftest import quiet, run_main, run_module

ROOT = Path(__file__).resolve().parents[1]


def run_export(*args: str) -> subprocess.CompletedProcess:
    return run_main("export", *args)


@pytest.fixture(scope="module")
def image_artifact(image_run, tmp_path_factory):
    run, _ = image_run
    out = tmp_path_factory.mktemp("artifacts")
    # max_accuracy_drop=1: a holdout of a few items cannot bound a drop (tests/test_gate.py)
    return export_checkpoint(run, out, name="colors", int8=True, max_accuracy_drop=1.0, log=quiet)


@pytest.fixture(scope="module")
def text_artifact(text_run, tmp_path_factory):
    run, _ = text_run
    out = tmp_path_factory.mktemp("artifacts")
    # max_accuracy_drop=1: a holdout of a few items cannot bound a drop (tests/test_gate.py)
    return export_checkpoint(run, out, name="msgs", int8=True, max_accuracy_drop=1.0, log=quiet)


# --------------------------------------------------------------------------- registry


# One backbone per builder family runs in the default suite: EfficientNet-Lite0 (the offline
# default), ResNet-18 (torchvision) and a tiny BERT. The others export the same way at 8-13 s each
# (ViT-B/16 17 s) and run with -m slow; every one of them is still built and its groups split
# in the default suite (tests/test_backbones.py).
DEFAULT_SUITE_BACKBONES = ("efficientnet_lite0", "resnet18")


def _registry_cases():
    from finetune.models import for_task

    return [
        n if n in DEFAULT_SUITE_BACKBONES else pytest.param(n, marks=pytest.mark.slow)
        for n in for_task("image-classification")
    ] + ["tiny-bert"]


@pytest.mark.parametrize("backbone", _registry_cases())
def test_every_backbone_exports_and_passes_parity(
    backbone, image_dir, image_cfg, text_csv, text_cfg, tmp_path
):
    from finetune.train import fine_tune

    if backbone == "tiny-bert":
        data, cfg = text_csv, dataclasses.replace(text_cfg, epochs=1)
    else:
        data, cfg = image_dir, dataclasses.replace(image_cfg, backbone=backbone, epochs=1)
    fine_tune(data, tmp_path / "run", cfg, log=quiet)
    folder = export_checkpoint(tmp_path / "run", tmp_path / "art", register=False, log=quiet)
    card = card_mod.load_card(folder)
    assert card["parity"]["passed"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert card["parity"]["batch_sizes"] == [1, 7, 32]
    assert card["export"]["exporter"].startswith("torch.onnx.export")
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model)
    assert not list(folder.glob("*.data"))  # one self-contained file
    assert [o.name for o in model.graph.output] == ["logits", "pooled_embedding"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


# --------------------------------------------------------------------------- artifact


def test_artifact_layout_card_and_metadata(image_artifact, image_run):
    run, result = image_run
    card = card_mod.load_card(image_artifact)
    card_mod.verify_files(image_artifact, card)
    assert image_artifact.name == "v1" and image_artifact.parent.name == "colors"
    assert (card["name"], card["version"], card["task"]) == ("colors", "v1", "image-classification")
    assert card["labels"] == ["blue", "green", "red"]
    assert card["inputs"][0]["name"] == "pixel_values"
    assert card["inputs"][0]["shape"][1:] == [3, 32, 32]
    assert card["preprocessing"]["crop_size"] == 32
    assert card["training"]["val_accuracy"] == result["val_accuracy"]
    meta = {p.key: p.value for p in onnx.load(str(image_artifact / "model.onnx")).metadata_props}
    assert meta["tuneserve.name"] == "colors" and meta["tuneserve.version"] == "v1"
    assert meta["tuneserve.weights_sha256"] == card["files"]["model"]["weights_sha256"]
    assert card["files"]["model"]["sha256"] == card_mod.sha256_file(image_artifact / "model.onnx")
    assert not [p for p in image_artifact.parent.iterdir() if p.name.startswith(".")]


def test_int8_variants_are_scored(image_artifact, text_artifact):
    for folder, method in ((image_artifact, "static QDQ"), (text_artifact, "dynamic")):
        card = card_mod.load_card(folder)
        (variant,) = card["variants"]
        assert variant["precision"] == "int8" and variant["method"].startswith(method)
        assert (folder / "model.int8.onnx").is_file()
        assert 0.0 <= variant["holdout_accuracy"] <= 1.0
        assert variant["agreement_with_fp32"] >= 0.5
        sess = ort.InferenceSession(
            str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"]
        )
        quantized_ops = {n.op_type for n in onnx.load(str(folder / "model.int8.onnx")).graph.node}
        assert quantized_ops & {
            "QuantizeLinear",
            "DynamicQuantizeLinear",
            "MatMulInteger",
            "DynamicQuantizeMatMul",
        }, quantized_ops
        assert sess.get_outputs()[0].name == "logits"
        # what each precision costs per request, timed at export on this machine
        price = card["cost"]
        assert price["provider"] == "CPUExecutionProvider" and price["threads"] == 1
        assert price["device"]
        assert set(price) - {"device", "provider", "threads"} == {"fp32", "int8"}
        for p in ("fp32", "int8"):
            assert price[p]["batch_1_ms"] > 0 and price[p]["batch_32_ms_per_item"] > 0


def test_variant_losing_accuracy_is_not_written(image_run, tmp_path):
    run, _ = image_run
    folder = export_checkpoint(
        run, tmp_path, name="strict", int8=True, register=False, max_accuracy_drop=-1.0, log=quiet
    )  # any int8 result is too low
    card = card_mod.load_card(folder)
    assert card["variants"] == [] and not (folder / "model.int8.onnx").exists()
    (rejected,) = card["rejected_variants"]
    assert rejected["precision"] == "int8" and "95% upper bound" in rejected["reason"]
    assert rejected["gate"]["passed"] is False and rejected["gate"]["max_drop"] == -1.0


@pytest.mark.skipif(
    bool(__import__("export.quantize").quantize.cuda_providers()),
    reason="a CUDA GPU is present: fp16 is built there, not refused",
)
def test_fp16_is_refused_without_cuda(image_run, tmp_path):
    with pytest.raises(VariantError, match="CUDA"):
        export_checkpoint(image_run[0], tmp_path, fp16=True, register=False, log=quiet)
    assert not any(tmp_path.rglob("*.onnx"))


def test_text_artifact_has_tokenizer_and_sequence_axis(text_artifact):
    card = card_mod.load_card(text_artifact)
    assert [i["name"] for i in card["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i["shape"] == ["batch", "sequence"] for i in card["inputs"])
    assert card["parity"]["sequence_lengths"] == ["longest", 8, 16]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_artifact / "tokenizer")
    feeds = {
        k: v.astype(np.int64)
        for k, v in tok(
            ["win free prize now", "see you"], padding=True, return_tensors="np"
        ).items()
    }
    sess = ort.InferenceSession(
        str(text_artifact / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    logits, emb = sess.run(None, feeds)
    assert logits.shape == (2, 2) and emb.shape == (2, 32)


def test_reference_statistics(image_artifact, text_artifact):
    from export.reference import project

    for folder in (image_artifact, text_artifact):
        ref = json.loads((folder / "reference.json").read_text())
        assert sum(ref["class_prior"].values()) == pytest.approx(1.0)
        assert sum(ref["confidence"]["probs"]) == pytest.approx(1.0)
        comps = np.asarray(ref["embedding"]["pca"]["components"])
        np.testing.assert_allclose(comps @ comps.T, np.eye(len(comps)), atol=1e-6)
        for hist in ref["embedding"]["components"] + [ref["embedding"]["reconstruction_error"]]:
            assert sum(hist["probs"]) == pytest.approx(1.0)
            assert hist["edges"] == sorted(hist["edges"])
        # An embedding that is a mix of PCA directions reconstructs with ~zero error.
        basis = ref["embedding"]["pca"]
        x = np.asarray(basis["mean"]) + 2.0 * comps[0] - comps[-1]
        _, err = project(x[None, :], basis)
        assert err[0] < 1e-6
    img = json.loads((image_artifact / "reference.json").read_text())["inputs"]
    assert 0.0 < img["brightness"]["mean"] < 1.0
    txt = json.loads((text_artifact / "reference.json").read_text())["inputs"]
    assert txt["length_tokens"]["mean"] > 2 and txt["unknown_token_ratio"]["mean"] == 0.0


# --------------------------------------------------------------------------- failures


def test_perturbed_onnx_weight_fails_parity(image_artifact, image_run, tmp_path):
    from onnx import numpy_helper

    from export.convert import graph_for
    from export.parity import check_parity
    from export.preprocess import Feeder
    from finetune import checkpoint

    model = onnx.load(str(image_artifact / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight
    w = numpy_helper.to_array(init).copy()
    w.flat[: max(1, w.size // 10)] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    ckpt = checkpoint.load_checkpoint(image_run[0])
    graph = graph_for(checkpoint.build_model(ckpt), ckpt.task)
    sess = ort.InferenceSession(str(tmp_path / "bad.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(ParityError) as e:
        check_parity(graph, sess, Feeder(ckpt))
    assert e.value.max_abs_diff > 1e-4
    assert any("batch 1" in f for f in e.value.failures)
    assert any("batch 32" in f for f in e.value.failures)  # all failures, not just the first


def test_parity_failure_exits_2_and_leaves_nothing(table_checkpoint, tmp_path):
    """`python -m export` in its own process (exit code and stderr as a shell sees them), on
    the table model (5 s where an image model's export takes 10)."""
    run = table_checkpoint[0] / "run"
    args = (str(run), "--out", str(tmp_path), "--tolerance", "-1", "--no-register")
    proc = run_module("export", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parity check failed" in proc.stderr and "probabilities differ by" in proc.stderr
    assert not any((tmp_path / "run").iterdir())  # no version, no partial folder
    # stderr is a pipe here: one plain line per step, no bar redraws
    assert "export: parity (4/" in proc.stderr and "\r" not in proc.stderr


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("rm:model.safetensors", "model.safetensors"),
        ("rm:holdout.npz", "holdout.npz"),
        ("corrupt:config.json", "config.json"),
        ("corrupt:model.safetensors", "model.safetensors"),
    ],
)
def test_bad_checkpoint_is_one_line_naming_the_file(image_run, tmp_path, damage, needle):
    run = tmp_path / "run"
    shutil.copytree(image_run[0], run)
    action, name = damage.split(":")
    if action == "rm":
        (run / name).unlink()
    else:
        (run / name).write_bytes(b"\x00garbage{")
    proc = run_export(str(run), "--out", str(tmp_path / "art"), "--no-register")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert needle in line


def test_versions_are_never_overwritten(table_checkpoint, tmp_path):
    """Versions, the store and the next free version (a table model: its export takes 0.5 s
    where an image model's takes 5; the version logic is the same for every task)."""
    run = table_checkpoint[0] / "run"
    first = export_checkpoint(run, tmp_path, name="roll", version="v1", log=quiet)
    before = card_mod.sha256_file(first / "card.json")
    with pytest.raises(VersionExists, match="never overwritten"):
        export_checkpoint(run, tmp_path, name="roll", version="v1", log=quiet)
    assert card_mod.sha256_file(first / "card.json") == before
    second = export_checkpoint(run, tmp_path, name="roll", log=quiet)
    assert second.name == "v2"
    import bentoml

    for version in ("v1", "v2"):
        stored = bentoml.models.get(f"roll:{version}")
        stored_card = card_mod.load_card(stored.path)
        assert stored_card["version"] == version
        card_mod.verify_files(stored.path, stored_card)
    assert bentoml.models.get("roll:latest").tag.version == "v2"
    # A fresh artifacts folder (a new clone) still gets a version the store does not hold.
    elsewhere = export_checkpoint(run, tmp_path / "clone", name="roll", log=quiet)
    assert elsewhere.name == "v3" and bentoml.models.get("roll:latest").tag.version == "v3"


def test_exports_started_together_claim_different_versions(table_checkpoint, tmp_path):
    """Three `python -m export` at once: each picks the next free version when it starts and
    writes for a while; they all chose v1 before, and two failed with a bare OSError."""
    import subprocess
    import sys

    run = table_checkpoint[0] / "run"
    cmd = [sys.executable, "-m", "export", str(run), "--out", str(tmp_path), "--name", "race"]
    procs = [
        subprocess.Popen([*cmd, "--no-register"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    codes = [(p.wait(timeout=300), p.stderr.read().decode()[-500:]) for p in procs]
    assert [c for c, _ in codes] == [0, 0, 0], codes
    written = sorted(p.name for p in (tmp_path / "race").iterdir())
    assert written == ["v1", "v2", "v3"]  # and no claim or partial folder left
    (tmp_path / "race" / ".v4.claim").touch()  # an export at work on v4
    assert export_checkpoint(run, tmp_path, name="race", register=False, log=quiet).name == "v5"


def test_card_round_trip_and_refusals(image_artifact, tmp_path):
    card = card_mod.load_card(image_artifact)
    card_mod.write_card(tmp_path, card)
    assert card_mod.load_card(tmp_path) == card
    card_mod.write_card(tmp_path, {**card, "schema_version": 99})
    with pytest.raises(CardError, match="schema_version 99"):
        card_mod.load_card(tmp_path)
    card_mod.write_card(tmp_path, {k: v for k, v in card.items() if k != "labels"})
    with pytest.raises(CardError, match="labels"):
        card_mod.load_card(tmp_path)
    tampered = tmp_path / "tampered"
    shutil.copytree(image_artifact, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(CardError, match="sha256"):
        card_mod.verify_files(tampered, card)


def test_contract_modules_use_only_the_standard_library():
    code = (
        "import sys, export.card, export.errors; "
        "bad = sorted(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'bentoml') "
        "if m in sys.modules); assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unfinished_checkpoint_is_refused(image_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(image_run[0], run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "status": "training"}))
    with pytest.raises(CheckpointInvalid, match="not finished training"):
        export_checkpoint(run, tmp_path / "art", register=False, log=quiet)


def test_skip_existing_reuses_an_export_of_the_same_checkpoint(table_checkpoint, tmp_path):
    """A table model (its export takes 0.5 s); the weights' hash decides for every task."""
    import skops.io as sio

    from finetune import checkpoint

    run = table_checkpoint[0] / "run"
    first = export_checkpoint(run, tmp_path, name="same", register=False, log=quiet)
    again = export_checkpoint(
        run, tmp_path, name="same", register=False, skip_existing=True, log=quiet
    )
    assert again == first and not (tmp_path / "same" / "v2").exists()
    changed = tmp_path / "changed"
    shutil.copytree(run, changed)
    trees = checkpoint.load_trees(changed)
    trees.set_params(learning_rate=trees.learning_rate * 2)  # other weights, same schema
    sio.dump(trees, changed / checkpoint.TREES)
    newer = export_checkpoint(
        changed, tmp_path, name="same", register=False, skip_existing=True, log=quiet
    )
    assert newer.name == "v2"


def test_torchscript_fallback_is_used_and_recorded_when_dynamo_fails(
    image_run, tmp_path, monkeypatch
):
    import torch

    real_export = torch.onnx.export

    def dynamo_broken(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    folder = export_checkpoint(image_run[0], tmp_path, register=False, log=quiet)
    card = card_mod.load_card(folder)
    assert card["export"]["exporter"] == "torch.onnx.export (torchscript)"
    assert "simulated dynamo failure" in card["export"]["fallback_reason"]
    assert card["parity"]["passed"]
