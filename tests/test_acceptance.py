"""Acceptance runs on the real data in ../shared/data (slow; `make test-slow`). They skip where
that folder is absent; the figures they check are recorded in bench/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.config import TrainConfig
from finetune.train import fine_tune
from tests.conftest import quiet

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.slow


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return path


def test_flowers12_auto(tmp_path):
    """Issue 16's bar, with `--strategy auto` and nothing else set (bench/RESULTS.md)."""
    from export.pipeline import export_checkpoint

    data = _need(DATA / "flowers12")
    result = fine_tune(data, tmp_path / "run", TrainConfig(), log=quiet)
    assert result["test_accuracy"] >= 0.975
    folder = export_checkpoint(
        tmp_path / "run", tmp_path / "art", int8=True, register=False, log=quiet
    )
    from export.card import load_card

    card = load_card(folder)
    assert card["parity"]["max_abs_diff"] <= 1e-4
    for v in card["variants"]:
        assert v["accuracy_drop"] <= 0.01


def test_sms_spam_auto_macro_f1(tmp_path):
    data = _need(DATA / "sms_spam" / "SMSSpamCollection")
    result = fine_tune(data, tmp_path / "run", TrainConfig(), log=quiet)
    assert result["test_macro_f1"] >= 0.97


def test_raccoon_detector_offline_map50(tmp_path):
    """Issue 13's bar: mAP@.5 >= 0.50 on the author's 40 validation images with the offline
    MobileNetV2 FCOS (bench/RESULTS.md: the settings and the figures)."""
    data = _need(DATA / "raccoon")
    cfg = TrainConfig(
        backbone="fcos_mobilenet_v2",
        image_size=320,
        epochs=24,
        patience=10,
        batch_size=8,
        lr=1e-3,
        warmup=0.05,
    )
    result = fine_tune(data, tmp_path / "run", cfg, log=quiet)
    assert result["val_map50"] >= 0.50


def test_camvid_segmenter_offline_miou(tmp_path):
    """Issue 13's bar: mean IoU >= 0.40 on the 30 validation images, 11 classes, void (11)
    ignored, with the offline MobileNetV2 LR-ASPP."""
    data = _need(DATA / "camvid_small")
    cfg = TrainConfig(
        backbone="lraspp_mobilenet_v2",
        image_size=384,
        epochs=40,
        patience=10,
        batch_size=8,
        lr=3e-3,
        warmup=0.05,
        ignore_index=11,
    )
    result = fine_tune(data, tmp_path / "run", cfg, log=quiet)
    assert result["val_miou"] >= 0.40


def test_fsdd_frozen_whisper_tiny(tmp_path):
    """Issue 14: the frozen Whisper tiny.en encoder (offline) reaches 0.95 on FSDD's official
    test recordings, and the converted encoder equals ctranslate2's on a real clip."""
    import ctranslate2
    import numpy as np
    import torch

    from finetune.models import resolve
    from finetune.models.whisper import build_encoder, offline_folder
    from tasks.audio import log_mel, read_audio

    data = _need(DATA / "fsdd")
    cfg = TrainConfig(strategy="feature-extraction", lr=3e-3, epochs=40, patience=6)
    result = fine_tune(data, tmp_path / "run", cfg, log=quiet)
    assert result["test_accuracy"] >= 0.95
    clip = next((data / "test" / "7").glob("*.wav")).read_bytes()
    x = log_mel(read_audio(clip, 60), 32_000)[None]
    encoder, _ = build_encoder(resolve("whisper_tiny_en", "audio-classification"), "pretrained")
    with torch.no_grad():
        got = encoder.eval().hidden(torch.from_numpy(x)).numpy()
    ref = ctranslate2.models.Whisper(str(offline_folder()), compute_type="float32")
    want = np.array(ref.encode(ctranslate2.StorageView.from_array(x), to_cpu=True))
    assert np.abs(got - want).max() < 1e-3


def test_german_credit_trees_and_mlp(tmp_path):
    """Issue 14: trees and the MLP on a stratified 20% validation split (three split seeds:
    one split of 200 rows moves ROC-AUC by +-0.02; bench/RESULTS.md), and `--init-from` on
    the second half of the rows against training on that half alone."""
    import numpy as np

    data = _need(DATA / "german_credit" / "german.data")
    for backbone in ("gradient-boosting", "mlp"):
        aucs = [
            fine_tune(
                data,
                tmp_path / f"{backbone}{seed}",
                TrainConfig(backbone=backbone, label_column="-1", val_fraction=0.2, seed=seed),
                log=quiet,
            )["val_roc_auc"]
            for seed in (0, 1, 2)
        ]
        assert np.mean(aucs) >= 0.78, (backbone, aucs)
    lines = data.read_text().splitlines()
    first, second = tmp_path / "first.data", tmp_path / "second.data"
    first.write_text("\n".join(lines[:500]) + "\n")
    second.write_text("\n".join(lines[500:]) + "\n")
    for backbone in ("gradient-boosting", "mlp"):
        cfg = TrainConfig(backbone=backbone, label_column="-1", val_fraction=0.2)
        fine_tune(first, tmp_path / f"{backbone}-first", cfg, log=quiet)
        alone = fine_tune(second, tmp_path / f"{backbone}-alone", cfg, log=quiet)
        more = TrainConfig(
            label_column="-1", val_fraction=0.2, init_from=str(tmp_path / f"{backbone}-first")
        )
        refreshed = fine_tune(second, tmp_path / f"{backbone}-more", more, log=quiet)
        assert refreshed["val_roc_auc"] >= alone["val_roc_auc"], backbone
