"""Training quality: `--strategy auto` decides by measurement, the schedule is what the
config says, the holdout is a split selection never saw, and a 2-process gloo run writes the
same files as a single process."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from finetune import checkpoint
from finetune.config import TrainConfig
from finetune.data import load_dataset
from finetune.train import Hooks, fine_tune, optim
from tests.conftest import WORDS, make_texts, quiet, run_main, run_module, save_tiny_encoder


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("quality") / "msgs.csv"
    pd.DataFrame(make_texts(40, seed=5), columns=["text", "label"]).to_csv(path, index=False)
    return path


def _words() -> list[str]:
    return sorted({w for ws in WORDS.values() for w in ws} | {"the"})


@pytest.fixture(scope="module")
def blind_bert(tmp_path_factory):
    """A tiny BERT whose frozen features carry nothing: its last LayerNorm has weight and
    bias 0, so every text pools to the zero vector. Fine-tuning that LayerNorm recovers the
    signal the layers below still compute."""
    from transformers import BertModel

    folder = save_tiny_encoder(tmp_path_factory.mktemp("blind"), _words(), max_positions=64)
    model = BertModel.from_pretrained(folder)
    norm = model.encoder.layer[-1].output.LayerNorm
    torch.nn.init.zeros_(norm.weight)
    torch.nn.init.zeros_(norm.bias)
    model.save_pretrained(folder)
    return folder


def _cfg(backbone, **kw) -> TrainConfig:
    base = {
        "backbone": str(backbone),
        "max_length": 16,
        "epochs": 4,
        "batch_size": 8,
        "lr": 1e-2,
        "backbone_lr": 1e-2,
        "holdout_size": 1000,
    }
    return TrainConfig(**{**base, **kw})


def _auto(out) -> dict:
    return checkpoint.read_json(out / "metrics.json")["auto"]


def test_auto_fine_tunes_when_frozen_features_are_useless(texts, blind_bert, tmp_path):
    lines = []
    result = fine_tune(texts, tmp_path / "blind", _cfg(blind_bert), log=lines.append)
    auto = _auto(tmp_path / "blind")
    assert auto["probe"]["val_macro_f1"] < 0.5  # a constant prediction: one class's F1 only
    assert auto["chosen"] == "full" and auto["gain"] > auto["margin"]
    assert auto["margin_kind"] == "paired"
    assert result["strategy"] == "full" and result["test_accuracy"] > 0.8
    assert any(line.startswith("auto: probe val_macro_f1") for line in lines)
    saved = checkpoint.read_json(tmp_path / "blind" / "config.json")
    assert saved["result"]["strategy"] == "full"
    summary = (tmp_path / "blind" / "report" / "summary.md").read_text()
    assert "`auto` chose **full**" in summary and "| test |" in summary


def test_auto_keeps_the_probe_where_it_suffices(image_dir, image_cfg, tmp_path):
    cfg = dataclasses.replace(image_cfg, strategy="auto", epochs=3)
    result = fine_tune(image_dir, tmp_path / "easy", cfg, log=quiet)
    auto = _auto(tmp_path / "easy")
    assert auto["probe"]["val_macro_f1"] == 1.0  # solid colours: even random features do
    assert auto["chosen"] == "feature-extraction" and auto["gain"] <= auto["margin"]
    assert auto["trial"]["epochs"] == 3  # within the noise for the longest trial
    assert result["strategy"] == "feature-extraction"
    epochs = checkpoint.read_json(tmp_path / "easy" / "metrics.json")["epochs"]
    assert [e["phase"] for e in epochs][-1] == "fine-tune"  # the trial ran, then stopped
    assert result["epoch"] <= auto["probe"]["epochs"]  # the kept weights are the probe's
    assert all(e["strategy"] == "feature-extraction" for e in epochs[: result["epoch"]])


def test_noise_margin_needs_a_larger_gain_on_a_small_validation_set():
    from finetune.train.auto import choose

    assert choose(0.90, 0.93, 50, "val_accuracy")[0] == "undecided"  # se 0.042
    assert choose(0.90, 0.93, 5000, "val_accuracy")[0] == "full"  # se 0.004
    assert choose(0.90, 0.80, 50, "val_accuracy")[0] == "feature-extraction"
    assert choose(0.50, 0.40, 5000, "val_loss")[0] == "full"  # a loss: lower is better
    # Paired: 2 of 100 items fixed and none broken is a clear gain (se sqrt(2)/100 = 0.014),
    # where the unpaired error of a proportion near 0.95 (0.022) calls it noise.
    assert choose(0.95, 0.97, 100, "val_accuracy")[0] == "undecided"
    assert choose(0.95, 0.97, 100, "val_accuracy", disagree=2)[0] == "full"


def test_schedule_is_what_the_config_says(text_csv, tiny_bert, tmp_path):
    """Warm-up then cosine decay, per optimizer step, read back from the optimizer; layer-wise
    rates below the head; two batches per step with gradient accumulation."""
    cfg = _cfg(
        tiny_bert,
        strategy="full",
        epochs=3,
        patience=10,
        schedule="cosine",
        warmup=0.25,
        grad_accum=2,
        lr=1e-3,
        backbone_lr=1e-4,
        layer_decay=0.5,
    )
    steps: list[dict] = []
    hooks = Hooks(on_step=lambda s, r: steps.append(r))
    fine_tune(text_csv, tmp_path / "s", cfg, log=quiet, hooks=hooks)
    n_train = checkpoint.read_json(tmp_path / "s" / "config.json")["data"]["train_size"]
    per_epoch = math.ceil(math.ceil(n_train / 8) / 2)
    total = per_epoch * 3
    assert len(steps) == total
    warm = round(0.25 * total)
    for k, rates in enumerate(steps):
        factor = (
            k / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))
        )
        assert rates["head/decay"] == pytest.approx(1e-3 * factor, abs=1e-12), k
        top = max(int(n.split(".")[1].split("/")[0]) for n in rates if n.startswith("backbone"))
        for i in range(top + 1):
            expected = 1e-4 * 0.5 ** (top - i) * factor
            assert rates[f"backbone.{i}/decay"] == pytest.approx(expected, abs=1e-12)


def test_weight_decay_skips_biases_and_norms():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    head = torch.nn.Linear(4, 2)
    groups = optim.param_groups(
        list(head.parameters()), [list(block.parameters())], 1, 0.1, 1, 0.05
    )
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(head.weight), id(block[0].weight)}


def test_holdout_is_the_test_split_and_never_seen(text_csv, text_cfg, tmp_path):
    out = tmp_path / "h"
    cfg = dataclasses.replace(text_cfg, epochs=1)
    fine_tune(text_csv, out, cfg, log=quiet)
    ckpt = checkpoint.load_checkpoint(out)
    ds = load_dataset(text_csv, TrainConfig.from_dict(ckpt.config["training"]))
    held = set(ckpt.holdout_inputs.tolist())
    assert held and held <= set(ds.test.inputs)
    assert not held & (set(ds.train.inputs) | set(ds.val.inputs))
    assert {"test_accuracy", "val_accuracy"} <= set(ckpt.metrics["best"])


def _shape(metrics: dict) -> tuple:
    return (
        sorted(metrics),
        sorted(metrics["best"]),
        [sorted(e) for e in metrics["epochs"]],
        [e["phase"] for e in metrics["epochs"]],
    )


@pytest.mark.slow  # three processes importing torch: 22 s of the default suite's 5 minutes
def test_two_process_gloo_run_writes_the_same_files(text_csv, tiny_bert, tmp_path):
    """`torchrun --nproc-per-node 2 -m finetune` on the CPU (DistributedDataParallel, gloo)."""
    args = [
        str(text_csv),
        "--backbone",
        str(tiny_bert),
        "--strategy",
        "full",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "16",
    ]
    single = run_main("finetune", *args, "--out", str(tmp_path / "one"))  # in this process
    assert single.returncode == 0, single.stderr[-2000:]
    double = run_module(
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "finetune",
        *args,
        "--out",
        str(tmp_path / "two"),
        timeout=300,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (checkpoint.load_checkpoint(tmp_path / n) for n in ("one", "two"))
    assert _shape(one.metrics) == _shape(two.metrics)
    assert two.config["processes"] == 2 and one.config["processes"] == 1
    assert np.array_equal(one.holdout_inputs, two.holdout_inputs)  # the same splits


def test_long_texts_are_read_in_windows_in_training_export_and_serving(tiny_bert, tmp_path):
    """The label words sit after 24 filler words, beyond max_length=16: cut at max_length
    a model sees only filler; reading 4 windows it learns, and the exported artifact (ONNX,
    the task contract's windows) scores the holdout as training scored the test split."""
    from export.pipeline import export_checkpoint
    from service.runtime import Runtime

    rows = [("the hello world " * 8 + text, label) for text, label in make_texts(30, seed=2)]
    data = tmp_path / "long.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(data, index=False)
    base = _cfg(tiny_bert, strategy="full", epochs=6, patience=10)
    cut = fine_tune(data, tmp_path / "cut", dataclasses.replace(base, max_windows=1), log=quiet)
    read = fine_tune(data, tmp_path / "read", dataclasses.replace(base, max_windows=4), log=quiet)
    assert cut["test_accuracy"] <= 0.7 < 0.9 <= read["test_accuracy"]
    art = export_checkpoint(
        tmp_path / "read", tmp_path / "art", name="long", register=False, log=quiet
    )
    card = checkpoint.read_json(art / "card.json")
    assert card["preprocessing"]["windows"] == 4 and card["preprocessing"]["combine"] == "mean"
    assert card["holdout"]["fp32_accuracy"] == pytest.approx(read["test_accuracy"])
    rt = Runtime(art, precision="fp32")
    stats: dict = {}
    rt.run([rt.prepare(rows[0][0])], stats)
    assert stats["tokens"][0] > 16  # every window's tokens, not the first window's


def test_auto_and_resume_on_a_span_task(span_bert, tmp_path):
    """Entities: auto's probe runs uncached (token features), the margin is unpaired, and a
    run interrupted in the fine-tune phase resumes there and completes."""
    from tests.conftest import make_conll

    data = make_conll(tmp_path / "conll", n=80)
    cfg = _cfg(span_bert, max_length=16, stride=4, epochs=3, lr=5e-3, backbone_lr=5e-3)

    def interrupt(epoch, record):
        if record["phase"] == "fine-tune":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(data, tmp_path / "ner", cfg, log=quiet, hooks=Hooks(on_epoch_end=interrupt))
    state = torch.load(tmp_path / "ner" / "resume" / "state.pt", weights_only=True)
    assert state["phase"] == "fine-tune"
    result = fine_tune(data, tmp_path / "ner", cfg, log=quiet, resume=True)
    metrics = checkpoint.read_json(tmp_path / "ner" / "metrics.json")
    assert metrics["auto"]["probe"]["epochs"] == 2  # uncached: PROBE_EPOCHS_UNCACHED
    assert metrics["auto"]["margin_kind"] == "unpaired"
    assert {"val_entity_f1", "test_entity_f1"} <= set(result)
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, len(metrics["epochs"]) + 1))


def _decide_on_rank(rank: int, store: str, answers) -> None:
    """One rank of a 2-process gloo group: auto's budget decision, rank 1's clock an hour on."""
    import time
    from types import SimpleNamespace

    import torch.distributed as td

    from finetune.config import TrainConfig
    from finetune.train.auto import _Decision
    from finetune.train.dist import Dist

    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    trainer = SimpleNamespace(history=[{"seconds": 5.0}], log=lambda _m: None, dist=Dist(rank, 2))
    decide = _Decision(trainer, TrainConfig(budget_minutes=10), 100, None, {"chosen": "full"})
    decide.t_start = time.perf_counter() - (3600 if rank == 1 else 0)
    answers[rank] = decide(0, None)
    td.destroy_process_group()


def test_auto_decisions_under_torchrun_are_rank_0s(tmp_path):
    """Each rank timed auto's budget on its own clock: rank 1, an hour behind, stopped while
    rank 0 went on, and rank 0 then waited for ever in the next all-reduce."""
    import torch.multiprocessing as mp

    answers = mp.Manager().dict()
    mp.spawn(_decide_on_rank, args=(str(tmp_path / "store"), answers), nprocs=2)
    assert dict(answers) == {0: True, 1: True}
