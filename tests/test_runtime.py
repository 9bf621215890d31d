"""The serving runtime, called directly: pre-processing matches training, results match the
export, and every bad input is an InputError with a bounded reason."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.errors import ArtifactError, InputError
from service.runtime import Prepared, Runtime, softmax
from tests.conftest import WORDS, bomb_png

ROOT = Path(__file__).resolve().parents[1]


def _png(size=(40, 48), color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_image_preprocessing_matches_training(image_artifact_dir, tmp_path):
    from finetune.data import ImagePrep, load_image

    rt = Runtime(image_artifact_dir, precision="fp32")
    rng = np.random.default_rng(0)
    px = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)  # odd sizes exercise the rounding
    Image.fromarray(px).save(tmp_path / "x.png")
    pre = rt.card["preprocessing"]
    expected = load_image(
        tmp_path / "x.png", ImagePrep(pre["resize"], pre["crop_size"], pre["interpolation"])
    )
    got = rt.prepare(base64.b64encode((tmp_path / "x.png").read_bytes()).decode()).value
    np.testing.assert_array_equal(got, expected)


def test_runtime_reproduces_export_predictions(image_artifact_dir, image_run):
    from finetune import checkpoint

    ckpt = checkpoint.load_checkpoint(image_run[0])
    rt = Runtime(image_artifact_dir, precision="fp32")
    items = [Prepared(x) for x in ckpt.holdout_inputs]
    logits, emb = rt.run(items)
    assert emb.shape[0] == len(items)
    sess = ort.InferenceSession(
        str(image_artifact_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    from export.preprocess import Feeder

    ref = sess.run(None, Feeder(ckpt).feeds(np.arange(len(items))))[0]
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    # Alone or inside a batch: the same answer.
    alone = [rt.predict([it], top_k=2)[0] for it in items[:5]]
    batched = rt.predict(items[:5], top_k=2)
    for a, b in zip(alone, batched, strict=True):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-6)


def test_text_tokenization_matches_the_training_tokenizer(text_artifact_dir, text_run):
    from export.preprocess import Feeder
    from finetune import checkpoint

    ckpt = checkpoint.load_checkpoint(text_run[0])
    rt = Runtime(text_artifact_dir, precision="fp32")
    feeder = Feeder(ckpt, checkpoint.load_tokenizer(ckpt))
    idx = np.arange(min(20, len(feeder)))
    expected = feeder.feeds(idx)
    got = rt.feeds([rt.prepare(str(t)) for t in ckpt.holdout_inputs[idx]])
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_precision_choice(image_artifact_dir, text_artifact_dir):
    assert Runtime(image_artifact_dir).precision == "int8"  # auto on CPU: the int8 variant
    assert Runtime(text_artifact_dir).precision == "fp32"  # no variant exported
    with pytest.raises(ArtifactError, match="lists only fp32"):
        Runtime(text_artifact_dir, precision="int8")
    assert Runtime(image_artifact_dir).provider == "CPUExecutionProvider"


def _garbled(png: bytes) -> bytes:
    """A PNG whose header is fine and whose pixel data is not zlib."""
    i = png.index(b"IDAT") + 4
    return png[:i] + b"\x00garbage" + png[i + 8 :]


@pytest.mark.parametrize(
    "value,reason,status",
    [
        ("not base64!", "invalid_base64", 400),
        (base64.b64encode(b"GIF89a junk").decode(), "undecodable_image", 400),
        (base64.b64encode(_png(size=(3000, 3000))).decode(), "image_too_large", 413),
        # PIL raised DecompressionBombError (a 500) before the pixel limit was checked
        (base64.b64encode(bomb_png()).decode(), "image_too_large", 413),
        (_garbled(bomb_png(300, 200, rows=3)), "undecodable_image", 400),
        (bomb_png(0, 10), "undecodable_image", 400),
        (42, "wrong_type", 400),
    ],
)
def test_bad_image_inputs(image_artifact_dir, value, reason, status):
    rt = Runtime(image_artifact_dir, max_image_pixels=1_000_000, load_model=False)
    with pytest.raises(InputError) as e:
        rt.prepare(value)
    assert (e.value.reason, e.value.status) == (reason, status)
    assert set(e.value.body()) == {"error", "detail"}


@pytest.mark.parametrize(
    "value,reason,status",
    [
        ("   ", "empty_text", 400),
        ("x" * 101, "text_too_long", 413),
        (["a"], "wrong_type", 400),
    ],
)
def test_bad_text_inputs(text_artifact_dir, value, reason, status):
    rt = Runtime(text_artifact_dir, max_text_chars=100, load_model=False)
    with pytest.raises(InputError) as e:
        rt.prepare(value)
    assert (e.value.reason, e.value.status) == (reason, status)


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p[0, 0] == pytest.approx(1.0) and p[1, 0] == pytest.approx(0.5)


def test_service_modules_never_import_torch(image_artifact_dir):
    code = (
        "import sys, service.runtime, service.oip, service.service; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    env = {**os.environ, "TUNESERVE_MODEL": str(image_artifact_dir)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_length_buckets_cover_every_item_once_with_bounded_padding():
    from service.runtime import length_buckets

    lengths = np.array([5, 100, 7, 6, 90, 30, 31, 5, 64, 12])
    buckets = length_buckets(lengths, waste=0.25)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(lengths)))
    for b in buckets:
        padded, real = len(b) * lengths[b].max(), lengths[b].sum()
        assert padded <= 1.25 * real or len(b) == 1


def test_mixed_length_texts_give_the_same_answer_in_a_batch(text_artifact_dir):
    rt = Runtime(text_artifact_dir)
    texts = [
        "win",
        "see you at home later tonight love dinner thanks ok ok ok",
        "free prize cash",
        "ok",
        "claim now urgent offer call txt win free prize cash",
    ]
    items = [rt.prepare(t) for t in texts]
    together, _ = rt.run(items)
    alone = np.concatenate([rt.run([i])[0] for i in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_gpu_padding_keeps_results_and_limits_shapes(image_artifact_dir, image_run):
    """On GPUs image batches run padded to a power of two (few cuDNN shapes); the padding rows
    must not change the answers, and no padded size may exceed the batch bound."""
    from finetune import checkpoint

    rt = Runtime(image_artifact_dir, precision="fp32", max_batch_size=20)
    items = [Prepared(x) for x in checkpoint.load_checkpoint(image_run[0]).holdout_inputs[:3]]
    plain, plain_emb = rt.run(items)
    rt.pad_to_pow2 = True
    stats: dict = {}
    padded, padded_emb = rt.run(items, stats)
    assert len(stats["brightness"]) == len(stats["pixels"]) == 3  # no padding rows
    np.testing.assert_array_equal(padded, plain)
    np.testing.assert_array_equal(padded_emb, plain_emb)
    assert [rt.padded(n) for n in (1, 3, 5, 9, 17, 20, 40)] == [1, 4, 8, 16, 20, 20, 40]


def test_a_batch_in_measured_calls_gives_the_same_answers(image_artifact_dir, image_run):
    """Image models on CPUs run a batch in calls of the size measured fastest at warm-up (a
    power of two up to the batch bound); joined, the calls equal one call of the batch."""
    from finetune import checkpoint

    rt = Runtime(image_artifact_dir, precision="fp32", max_batch_size=8)
    assert rt.chunk in (1, 2, 4, 8)
    items = [Prepared(x) for x in checkpoint.load_checkpoint(image_run[0]).holdout_inputs[:3]] * 2
    rt.chunk = 8
    whole, whole_emb = rt.run(items)
    rt.chunk = 4  # calls of 4 and 2
    parts, parts_emb = rt.run(items)
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    np.testing.assert_allclose(parts_emb, whole_emb, atol=1e-5)


def test_input_statistics_of_a_batch(image_artifact_dir, text_artifact_dir):
    """Brightness (every 4th pixel) and size for images; token count, truncation and the
    unknown-token share for texts: the numbers the service exports per batch."""
    rt = Runtime(image_artifact_dir, precision="fp32")
    white = io.BytesIO()
    Image.new("RGB", (64, 50), (255, 255, 255)).save(white, "PNG")
    dark = io.BytesIO()
    Image.new("RGB", (30, 40), (51, 51, 51)).save(dark, "PNG")
    items = [rt.prepare(white.getvalue()), rt.prepare(dark.getvalue())]
    stats: dict = {}
    rt.run(items, stats)
    assert stats["brightness"] == pytest.approx([1.0, 0.2])
    assert stats["pixels"] == [64 * 50, 30 * 40]

    rt = Runtime(text_artifact_dir, precision="fp32")
    max_len = int(rt.pre["max_length"])
    known = next(iter(WORDS.values()))[0]  # in the tiny vocabulary
    windows = int(rt.pre["windows"])  # long texts are read in windows of max_len tokens
    texts = [known, "zzqqxx " * 3 + known, " ".join([known] * (max_len * windows * 2))]
    stats = {}
    rt.run([rt.prepare(t) for t in texts], stats)
    expected = [len(rt.tokenizer.encode(t).ids) for t in texts[:2]]
    assert stats["tokens"][:2] == expected  # short texts: one window
    assert stats["tokens"][2] == windows * max_len  # every token read, overlaps included
    assert stats["truncated"] == 1  # more than `windows` windows: the rest is not read
    assert stats["unknown_ratio"][0] == 0.0 and stats["unknown_ratio"][1] > 0


def test_worker_and_thread_defaults(monkeypatch):
    """One worker per core with one ONNX Runtime thread each on CPUs; four workers with one
    thread each sharing a GPU; explicit settings win."""
    from service import settings as st

    monkeypatch.setattr(st, "cpu_cores", lambda: 8)
    auto = st.Settings()
    assert (auto.worker_count(False), auto.thread_count(False)) == (8, 1)
    assert (auto.worker_count(True), auto.thread_count(True)) == (4, 1)
    assert st.Settings(workers=2).thread_count(False) == 4
    assert st.Settings(workers=2, threads=3).thread_count(True) == 3
    assert (auto.decode_thread_count(False), auto.decode_thread_count(True)) == (1, 2)
    assert st.Settings(decode_threads=3).decode_thread_count(False) == 3
    monkeypatch.undo()
    assert 1 <= st.cpu_cores() <= (os.cpu_count() or 1)


def test_switch_settings_parse_or_refuse(monkeypatch):
    """Access log and tracing are off unless asked for; anything but a yes/no word stops
    start-up with one line naming the variable."""
    from service import settings as st

    monkeypatch.delenv("TUNESERVE_ACCESS_LOG", raising=False)
    monkeypatch.delenv("TUNESERVE_TRACING", raising=False)
    assert (st.Settings.from_env().access_log, st.Settings.from_env().tracing) == (False, False)
    monkeypatch.setenv("TUNESERVE_ACCESS_LOG", "True")
    monkeypatch.setenv("TUNESERVE_TRACING", "0")
    assert (st.Settings.from_env().access_log, st.Settings.from_env().tracing) == (True, False)
    monkeypatch.setenv("TUNESERVE_TRACING", "sometimes")
    with pytest.raises(SystemExit, match="TUNESERVE_TRACING='sometimes' must be 1/true or 0/false"):
        st.Settings.from_env()


@pytest.mark.parametrize(
    "env, needle",
    [
        (
            {"TUNESERVE_MAX_BATCH_SIZE": "0"},
            "TUNESERVE_MAX_BATCH_SIZE='0' must be an integer from 1",
        ),
        ({"TUNESERVE_WORKERS": "-1"}, "TUNESERVE_WORKERS='-1' must be an integer from 0 to 256"),
        ({"TUNESERVE_REQUEST_TIMEOUT_S": "-5"}, "TUNESERVE_REQUEST_TIMEOUT_S='-5'"),
        ({"TUNESERVE_MAX_QUEUE_ITEMS": "lots"}, "TUNESERVE_MAX_QUEUE_ITEMS='lots'"),
        ({"TUNESERVE_PRECISION": "fp8"}, "TUNESERVE_PRECISION='fp8' must be one of auto"),
    ],
)
def test_out_of_range_settings_stop_start_up_naming_the_variable(monkeypatch, env, needle):
    from service import settings as st

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        st.Settings.from_env()
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer/tokenizer.json", "reference.json"])
def test_every_file_that_changes_a_prediction_is_hashed(text_artifact_dir, tmp_path, name):
    """A changed tokenizer or reference passed the start-up check when only the ONNX files
    were hashed; now the card lists every file and the runtime refuses, naming it."""
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(text_artifact_dir, folder)
    listed = {f["file"] for f in json.loads((folder / "card.json").read_text())["files"]["support"]}
    assert {"reference.json", "tokenizer/tokenizer.json"} <= listed
    with open(folder / name, "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match=re.escape(name) + ".*does not match the sha256"):
        Runtime(folder, load_model=False)
