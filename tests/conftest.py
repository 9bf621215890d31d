"""Tiny data and tiny random models made here; nothing is downloaded."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes on two cores: one torch (OpenMP) thread each, or their thread pools
    # spin against each other (the tiny models here gain nothing from a second thread).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# A private BentoML model store for the whole test session, set before bentoml is imported,
# and removed at exit (the registry exports put a few hundred MB in it).
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="tuneserve-bentoml-")
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from finetune.config import TrainConfig  # noqa: E402

COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
WORDS = {
    "spam": "win free prize cash claim now urgent offer call txt".split(),
    "ham": "see you at home later tonight love dinner thanks ok".split(),
}


def make_images(root: Path, per_class: int, seed: int = 0, size=(40, 48)) -> Path:
    """Solid class colours with noise: learnable, and every file different."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, size=(size[0], size[1], 3))
            px = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{seed}_{i}.png")
    return root


def make_texts(n_per_class: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n_per_class):
            rows.append((" ".join(rng.choice(words, size=int(rng.integers(3, 9)))), label))
    return rows


def bomb_png(width: int = 20_000, height: int = 20_000, rows: int = 16) -> bytes:
    """A valid PNG header claiming width x height grey pixels, followed by `rows` rows of zero
    pixel data: decoders that trust the header allocate width x height bytes (400 MB here)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * rows, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images") / "colors", per_class=10)


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory) -> Path:
    import pandas as pd

    path = tmp_path_factory.mktemp("text") / "msgs.csv"
    pd.DataFrame(make_texts(20), columns=["message", "category"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with hidden size 32 and a word-level vocabulary, saved like a hub model."""
    words = sorted({w for ws in WORDS.values() for w in ws} | {"hello", "world", "the"})
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), words, max_positions=64)


# Special tokens first, as each family's tokenizer numbers them.
_TINY_ENCODERS = {
    "bert": ("Bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
    "mpnet": ("MPNet", ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"]),
}


def save_tiny_encoder(
    folder: Path, words: list[str], max_positions: int, family: str = "bert"
) -> Path:
    """A 2-layer encoder (hidden 32) of `family` with a word-level vocabulary, saved like a hub
    model: its config, weights, tokenizer files and vocab.txt."""
    import torch
    import transformers

    prefix, specials = _TINY_ENCODERS[family]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*specials, *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = getattr(transformers, f"{prefix}TokenizerFast")
    tokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    cfg = getattr(transformers, f"{prefix}Config")(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    getattr(transformers, f"{prefix}Model")(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def image_cfg() -> TrainConfig:
    return TrainConfig(
        backbone="resnet18",
        weights="random",
        strategy="feature-extraction",
        image_size=32,
        epochs=2,
        batch_size=8,
        patience=10,
        holdout_size=1000,
    )


@pytest.fixture
def text_cfg(tiny_bert) -> TrainConfig:
    return TrainConfig(
        backbone=str(tiny_bert),
        strategy="feature-extraction",
        max_length=16,
        epochs=2,
        batch_size=8,
        patience=10,
        lr=1e-2,
        holdout_size=1000,
    )


def quiet(*_args) -> None:
    """A `log` for fine_tune that keeps test output short."""


def run_main(module: str, *args: str):
    """`python -m <module> args...` in this process: the module's own `main()` on its parser,
    stdout and stderr captured (not terminals, as in a pipe), the environment restored. The
    subprocess costs 3-4 s of imports; tests of the entry point itself use `run_module`."""
    import contextlib
    import importlib
    import io
    import subprocess

    cli = importlib.import_module(f"{module}.__main__")
    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(cli.get_args_parser().parse_args(list(args)))
        except SystemExit as e:  # argparse refuses its arguments
            code = e.code if isinstance(e.code, int) else 2
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def run_module(module: str, *args: str, timeout: int = 600):
    """`python -m <module> args...` from the project root, as a user runs it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def image_run(image_dir, image_cfg, tmp_path_factory):
    """A finished tiny image checkpoint: (run folder, best metrics)."""
    import dataclasses

    from finetune.train import fine_tune

    out = tmp_path_factory.mktemp("runs") / "colors"
    return out, fine_tune(image_dir, out, dataclasses.replace(image_cfg, epochs=3), log=quiet)


@pytest.fixture(scope="session")
def text_run(text_csv, tiny_bert, tmp_path_factory):
    """A finished tiny text checkpoint (2-layer BERT): (run folder, best metrics)."""
    from finetune.train import fine_tune

    cfg = TrainConfig(
        backbone=str(tiny_bert),
        max_length=16,
        epochs=3,
        batch_size=8,
        patience=10,
        lr=1e-2,
        strategy="full",
        holdout_size=1000,
    )
    out = tmp_path_factory.mktemp("runs") / "msgs"
    return out, fine_tune(text_csv, out, cfg, log=quiet)


CITIES = ["paris", "rome", "oslo", "lima"]


def make_table(path, n: int = 400, seed: int = 0, shift: float = 0.0):
    """amount (numeric, some missing), city (categorical), age, and a rare positive class
    driven by amount and city."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    amount = rng.gamma(2.0, 100.0, n) + shift
    city = rng.choice(CITIES, n)
    age = rng.integers(18, 80, n)
    risk = (amount > 350).astype(float) + (city == "lima") * 0.8 + rng.normal(0, 0.3, n)
    label = np.where(risk > 1.0, "bad", "good")
    amount = amount.round(2).astype(object)
    amount[rng.random(n) < 0.05] = ""
    pd.DataFrame(
        {"amount": amount, "city": city, "age": age, "country": "x", "default": label}
    ).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def table_checkpoint(tmp_path_factory):
    """Gradient-boosted trees on a 400-row loan table: (its folder, the run's result); its
    export takes half a second, so tests of export's versions and the store use it."""
    from finetune.train import fine_tune

    tmp = tmp_path_factory.mktemp("tabular")
    data = make_table(tmp / "loans.csv")
    result = fine_tune(data, tmp / "run", TrainConfig(test_fraction=0.3), log=quiet)
    return tmp, result


@pytest.fixture(scope="session")
def image_artifact_dir(image_run, tmp_path_factory):
    """The tiny image checkpoint exported with an int8 variant (kept whatever its accuracy)."""
    from export.pipeline import export_checkpoint

    return export_checkpoint(
        image_run[0],
        tmp_path_factory.mktemp("art"),
        name="colors",
        int8=True,
        max_accuracy_drop=1.0,
        register=False,
        log=quiet,
    )


@pytest.fixture(scope="session")
def text_artifact_dir(text_run, tmp_path_factory):
    """The tiny text checkpoint exported (fp32 only)."""
    from export.pipeline import export_checkpoint

    return export_checkpoint(
        text_run[0], tmp_path_factory.mktemp("art"), name="msgs", register=False, log=quiet
    )


@pytest.fixture(scope="session")
def calibrated(image_cfg, tmp_path_factory):
    """The tiny image model trained on 100 images per class: a holdout of 60, enough for the
    export to calibrate drift (the shared tiny run's holdout of 6 is not)."""
    import dataclasses

    from export.pipeline import export_checkpoint
    from finetune.train import fine_tune

    tmp = tmp_path_factory.mktemp("drift")
    data = make_images(tmp / "colors", per_class=100, seed=3)
    run = tmp / "run"
    fine_tune(data, run, dataclasses.replace(image_cfg, epochs=2, test_fraction=0.2), log=quiet)
    return export_checkpoint(run, tmp / "art", name="colors", register=False, log=quiet)


# --------------------------------------------------------------------------- span tasks

PER = ["alice", "bob", "carol", "dave"]
LOC = ["paris", "london", "rome", "oslo"]
ORG = ["acme", "globex", "initech"]
FILLER = [
    "met",
    "in",
    "at",
    "visited",
    "works",
    "for",
    "today",
    "and",
    "lives",
    "where",
    "does",
    "who",
    "live",
    "work",
    "?",
    ".",
    "the",
]


@pytest.fixture(scope="session")
def span_bert(tmp_path_factory) -> Path:
    """A tiny BERT whose word-level vocabulary holds the tiny span data's words."""
    words = sorted(set(PER + LOC + ORG + FILLER))
    return save_tiny_encoder(tmp_path_factory.mktemp("span-bert"), words, max_positions=128)


def _sentence(rng) -> tuple[list[str], list[str]]:
    """'alice met bob in paris today .' with IOB2 tags; some sentences are long (windows)."""
    tokens, tags = [], []
    for _ in range(int(rng.integers(1, 4))):
        a, b = rng.choice(PER, 2, replace=False)
        where, org = rng.choice(LOC), rng.choice(ORG)
        part = [
            (a, "B-PER"),
            ("met", "O"),
            (b, "B-PER"),
            ("in", "O"),
            (where, "B-LOC"),
            ("at", "O"),
            (org, "B-ORG"),
            (".", "O"),
        ]
        tokens += [t for t, _ in part]
        tags += [g for _, g in part]
    return tokens, tags


def make_conll(folder: Path, n: int = 160, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.txt", n), ("valid.txt", n // 2)):
        lines = ["-DOCSTART- -X- O", ""]
        for _ in range(count):
            tokens, tags = _sentence(rng)
            lines += [f"{t} NN\t{g}" for t, g in zip(tokens, tags, strict=True)] + ["  "]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def make_squad(path: Path, articles: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = []
    for a in range(articles):
        paragraphs = []
        for _ in range(2):
            people = rng.choice(PER, 3, replace=False)
            places, orgs = rng.choice(LOC, 3), rng.choice(ORG, 3)
            parts = [
                f"{p} lives in {c} and works for {o} ."
                for p, c, o in zip(people, places, orgs, strict=True)
            ]
            context = " ".join(parts)
            qas = []
            for i, p in enumerate(people):
                ans = str(places[i])
                start = context.index(f"{p} lives in ") + len(f"{p} lives in ")
                qas.append(
                    {
                        "id": f"{a}-{len(paragraphs)}-{i}",
                        "question": f"where does {p} live ?",
                        "answers": [{"text": ans, "answer_start": start}],
                    }
                )
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"article {a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def _span_run(kind: str, data: Path, bert: Path, tmp: Path, max_length: int):
    from export.pipeline import export_checkpoint
    from finetune.train import fine_tune

    cfg = TrainConfig(
        backbone=str(bert),
        strategy="full",
        epochs=2,
        batch_size=16,
        lr=5e-3,
        backbone_lr=5e-3,
        max_length=max_length,
        stride=4,
        holdout_size=1000,
        val_fraction=0.15,
        test_fraction=0.4,  # the holdout calibrates drift: at least 50 examples
    )
    result = fine_tune(data, tmp / "run", cfg, log=quiet)
    art = export_checkpoint(
        tmp / "run",
        tmp / "art",
        name=f"tiny-{kind}",
        int8=True,
        max_accuracy_drop=1.0,
        register=False,
        log=quiet,
    )
    return tmp / "run", art, result


@pytest.fixture(scope="session")
def ner_artifact(span_bert, tmp_path_factory):
    """A tiny entity tagger (windows of 16 tokens): (run, artifact, best metrics)."""
    tmp = tmp_path_factory.mktemp("ner")
    return _span_run("ner", make_conll(tmp / "conll"), span_bert, tmp, 16)


@pytest.fixture(scope="session")
def qa_artifact(span_bert, tmp_path_factory):
    """A tiny extractive reader (windows of 24 tokens): (run, artifact, best metrics)."""
    tmp = tmp_path_factory.mktemp("qa")
    return _span_run("qa", make_squad(tmp / "squad.json"), span_bert, tmp, 24)


# --------------------------------------------------------------------------- dense vision

SHAPES = {"red": (220, 40, 40), "blue": (40, 60, 220)}


def make_voc(root: Path, n: int = 60, seed: int = 0, size=(80, 64)) -> Path:
    """Pascal VOC: images/ and annotations/ (one XML each), grey noise with one or two solid
    class-coloured rectangles; every few images none (a negative)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    w, h = size
    for i in range(n):
        px = rng.integers(90, 160, size=(h, w, 3)).astype(np.uint8)
        objects = []
        for _ in range(0 if i % 10 == 9 else int(rng.integers(1, 3))):
            name = str(rng.choice(list(SHAPES)))
            bw, bh = int(rng.integers(14, 30)), int(rng.integers(14, 30))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            px[y1 : y1 + bh, x1 : x1 + bw] = SHAPES[name]
            objects.append((name, x1, y1, x1 + bw, y1 + bh))
        Image.fromarray(px).save(root / "images" / f"img{i}.png")
        xml = "".join(
            f"<object><name>{o[0]}</name><bndbox><xmin>{o[1]}</xmin><ymin>{o[2]}</ymin>"
            f"<xmax>{o[3]}</xmax><ymax>{o[4]}</ymax></bndbox></object>"
            for o in objects
        )
        (root / "annotations" / f"img{i}.xml").write_text(
            f"<annotation><filename>img{i}.png</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{xml}</annotation>"
        )
    return root


def make_masks(root: Path, n: int = 60, seed: int = 0, size=(72, 56)) -> Path:
    """images/ + masks/ + classes.txt: a sky-blue top, a grey road bottom, a red car blob in
    between; class 3 (void) along a stripe."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    w, h = size
    colours = np.array([(120, 180, 240), (110, 110, 110), (220, 40, 40)], dtype=np.int64)
    for i in range(n):
        horizon = int(rng.integers(h // 3, 2 * h // 3))
        mask = np.ones((h, w), np.uint8)
        mask[:horizon] = 0
        cw, ch = int(rng.integers(10, 24)), int(rng.integers(8, 16))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(horizon - ch // 2, h - ch))
        mask[y : y + ch, x : x + cw] = 2
        noise = rng.integers(-25, 25, size=(h, w, 3))
        px = np.clip(colours[mask] + noise, 0, 255).astype(np.uint8)
        mask[:, :2] = 3  # void
        Image.fromarray(px).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root
