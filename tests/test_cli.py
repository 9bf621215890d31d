"""`python -m finetune` as a user runs it: bad input gets one line and exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import make_images, make_texts, run_main, run_module

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--weights", "random", "--image-size", "32", "--epochs", "1", "--batch-size", "8"]
TINY += ["--strategy", "feature-extraction"]


def run(*args: str) -> subprocess.CompletedProcess:
    return run_main("finetune", *args)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    make_images(root / "one_class", per_class=3)
    for name in ("green", "blue"):
        shutil.rmtree(root / "one_class" / name)
    pd.DataFrame(make_texts(5), columns=["text", "label"]).to_csv(root / "t.csv", index=False)
    return root


@pytest.mark.parametrize(
    "case,args,needles",
    [
        ("missing path", ["{root}/nope"], ["does not exist", "nope"]),
        ("empty folder", ["{root}/empty"], ["is empty"]),
        ("one class", ["{root}/one_class", "--backbone", "resnet18"], ["only one class", "red"]),
        (
            "unknown backbone",
            ["{root}/t.csv", "--backbone", "resnet19"],
            ["unknown backbone 'resnet19'", "resnet18", "efficientnet_lite0", "minilm"],
        ),
        (
            "unknown column",
            ["{root}/t.csv", "--backbone", "minilm", "--text-column", "msg"],
            ["text column 'msg' not found", "t.csv", "columns: text, label"],
        ),
        (
            "bad strategy",
            ["{root}/t.csv", "--strategy", "lora"],
            ["strategy 'lora' is unknown", "gradual"],
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(bad_inputs, tmp_path, case, args, needles):
    args = [a.format(root=bad_inputs) for a in args]
    proc = run(*TINY, *args, "--out", str(tmp_path / "out"))  # the case's flags win
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()  # nothing is created for a run that cannot start


def test_python_m_finetune_exits_2_with_one_line(tmp_path):
    """The entry point itself, in its own process: exit code and stderr as a shell sees them
    (the cases above call the same main() in this process)."""
    proc = run_module("finetune", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "does not exist", "nope")


def test_corrupt_image_is_skipped_and_existing_out_refused(tmp_path):
    data = make_images(tmp_path / "imgs", per_class=6)
    (data / "red" / "corrupt.jpg").write_bytes(b"GIF89a broken")
    out = tmp_path / "run"
    proc = run(str(data), "--backbone", "resnet18", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "undecodable 1" in proc.stdout and "corrupt.jpg" in proc.stdout
    assert "val_accuracy" in proc.stdout and (out / "model.safetensors").is_file()
    before = (out / "model.safetensors").read_bytes()
    again = run(str(data), "--backbone", "resnet18", "--out", str(out), *TINY)
    assert_one_line_error(again, "already exists", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before  # nothing overwritten


def test_error_and_config_modules_import_without_torch():
    """Later stages (the service) may import these without pulling in torch."""
    code = (
        "import sys, finetune.errors, finetune.config, finetune.checkpoint; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_training_setting_has_its_help_text():
    """`--help` reads each field's trailing comment (TrainConfig.field_help): a field whose
    comment a formatter moved off its line lost its help silently once (--holdout-size)."""
    import dataclasses

    from finetune.config import TrainConfig

    helps = TrainConfig.field_help()
    assert [f.name for f in dataclasses.fields(TrainConfig) if f.name not in helps] == []
