"""Fine-tuning: data, model and checkpoint around the shared loop (finetune/loop.py).

    fine_tune("data/flowers", "runs/flowers", TrainConfig(backbone="efficientnet_lite0"))

Strategies: `auto` (finetune/auto.py: a linear probe against a short full fine-tune,
measured on validation), `feature-extraction` (frozen backbone; features computed once and
cached when there is no augmentation), `full` (everything trains, the backbone at lower,
layer-wise decaying rates), `gradual` (epoch 0 trains the head, epoch k also the top k
backbone groups, ULMFiT style). The best epoch on validation is scored once on the test
split, which nothing above saw; the holdout for export is drawn from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import tasks
from finetune import auto, backbones, checkpoint
from finetune.config import AUTO_BACKBONES, TrainConfig
from finetune.data import (
    IMAGE_TASK,
    Dataset,
    describe,
    detect_task,
    load_dataset,
    median_image_side,
)
from finetune.errors import CheckpointError, DataError, FinetuneError, OutputExists
from finetune.heads import HEADS
from finetune.inputs import Inputs
from finetune.loop import STATE, Dist, Phase, Trainer
from finetune.recipes import ClassifierRecipe, SpanRecipe
from finetune.report import plot_confusion, plot_curves
from tasks.common import text_tokenizer

# --------------------------------------------------------------------------- helpers


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device 'cuda' asked for, but no usable CUDA GPU; use --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse early, before any work, when `out` cannot be used as asked."""
    if resume:
        if (out / checkpoint.RESUME / STATE).is_file():
            return
        if (out / checkpoint.CONFIG).is_file() and (out / checkpoint.WEIGHTS).is_file():
            raise OutputExists(f"'{out}' holds a completed run; nothing to resume")
        raise CheckpointError(f"cannot resume: '{out / checkpoint.RESUME / STATE}' not found")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputExists(
                f"output folder '{out}' already exists; pass --overwrite to replace it "
                f"or --resume to continue it"
            )
        if not (out / checkpoint.CONFIG).is_file():
            raise OutputExists(
                f"'{out}' is not a tuneserve run (no config.json); refusing to delete it even "
                f"with --overwrite: choose another --out"
            )


def _claim_out(out: Path) -> None:
    """Replace an old run (already allowed by _check_out) once the new one is ready to train."""
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _versions() -> dict:
    import torchvision
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def window_preprocessing(cfg: TrainConfig, tokenizer, task: str) -> dict:
    """Windows of long texts: the overlap, how many a classified text may use, and the
    padding token (decoders have none: their end-of-text token pads)."""
    out = {}
    if tokenizer.pad_token_id is not None:
        out["pad_id"] = int(tokenizer.pad_token_id)
        out["pad_token"] = str(tokenizer.pad_token)
    classify = task not in HEADS and cfg.max_windows > 1
    if task in HEADS or classify:
        out["stride"] = cfg.stride if cfg.stride else cfg.max_length // 4
    if classify:
        out["windows"] = cfg.max_windows
        out["combine"] = "mean"  # of the windows' logits and embeddings
    return out


def postprocessing(cfg: TrainConfig, ds: Dataset) -> dict:
    """The answer's parameters, stored with the weights (question answering)."""
    if ds.task != "question-answering":
        return {}
    unanswerable = ds.summary["train_per_class"].get("unanswerable", 0)
    return {"max_answer_length": cfg.max_answer_length, "allow_no_answer": unanswerable > 0}


# --------------------------------------------------------------------------- main entry


def fine_tune(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune `cfg.backbone` on `data` and write the checkpoint to `out`; returns the best
    epoch's validation and test metrics. On resume the configuration saved in `out` is used,
    not `cfg`. `on_step(step, {param group: learning rate})` follows the schedule."""
    out, t_start = Path(out), time.perf_counter()
    dist = Dist.start("cuda" if _device(cfg.device).type == "cuda" else "cpu")
    if not dist.main:
        log = _silent
    if dist.main:
        _check_out(out, overwrite, resume)
    if resume:
        saved = checkpoint.read_json(out / checkpoint.CONFIG)
        cfg = TrainConfig.from_dict(saved["training"])
        log(f"resuming '{out}' with its saved configuration")
    problems = cfg.problems()
    if problems:
        raise FinetuneError("invalid configuration: " + "; ".join(problems))
    device = _device(cfg.device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    task = detect_task(data)
    if tasks.uses_tables(task):
        if resume:
            raise FinetuneError("--resume does not apply to tabular runs (they take seconds)")
        from finetune.tabular import fine_tune_table

        return fine_tune_table(Path(data), out, cfg, log)
    if cfg.backbone == "auto":
        cfg = dataclasses.replace(cfg, backbone=AUTO_BACKBONES.get(task, "minilm"))
    if cfg.monitor == "auto":  # the task's own metric (tasks registry)
        metric = tasks.get(task).metric
        cfg = dataclasses.replace(
            cfg, monitor="val_macro_f1" if metric == "accuracy" else f"val_{metric}"
        )
    dense = task in tasks.DENSE_VISION_TASKS
    cfg = cfg.for_family(images=task == IMAGE_TASK or dense)
    tokenizer = None
    if dense:
        from finetune import recipes_vision

        cfg, ds, model, groups, config = recipes_vision.setup(task, cfg, data, log)
        config["versions"] = _versions()
    else:
        spec = backbones.resolve(cfg.backbone, task)
        if _modality(task) != _modality(spec.task):
            raise DataError(
                f"'{data}' holds {task} data but backbone '{spec.name}' is for {spec.task}"
            )
        head_cls = HEADS.get(task, backbones.Classifier)
        prep = mean = std = None
        if task == IMAGE_TASK:
            if cfg.image_size is None:
                size = _image_size(data, spec, log)
                cfg = dataclasses.replace(cfg, image_size=size)
                if size is not None and cfg.augment is None:
                    # Small images are scans, glyphs and icons, where a flip or a crop changes
                    # the class (a mirrored 3 is no 3): digits' fine-tune reached 0.952 with
                    # augmentation after 3 epochs, 0.989 without. Photographs keep it.
                    cfg = dataclasses.replace(cfg, augment=False)
                    log("small images: no augmentation (a flip or a crop may change their class)")
            prep, mean, std = backbones.image_prep(spec, cfg.image_size)
        ds = load_dataset(data, cfg, prep)
        log(describe(ds.summary))
        if tasks.uses_audio(task):
            cfg = dataclasses.replace(cfg, clip_seconds=_clip_seconds(cfg, ds, log))
        encoder, dim = backbones.build_encoder(spec, cfg.weights, prep)
        model = head_cls(encoder, dim, len(ds.labels), cfg.dropout)
        groups = backbones.parameter_groups(spec, encoder)
        if tasks.uses_tokenizer(task):
            pretrained = cfg.weights in ("pretrained", "random")
            location = backbones.hf_location(spec) if pretrained else cfg.weights
            tokenizer = backbones.load_tokenizer(location)
    if resume and ds.labels != saved["labels"]:
        raise CheckpointError(
            f"labels of '{data}' differ from those saved in '{out}'; "
            f"the data changed since the run started"
        )
    model.to(device)

    if not dense:
        config = _config(task, spec, cfg, encoder, dim, head_cls, ds, prep, mean, std, tokenizer)
    config["backbone"]["num_groups"] = len(groups)
    config["device"] = str(device)
    config["processes"] = dist.world
    if dist.main:
        if not resume:
            _claim_out(out)
        checkpoint.write_json(out / checkpoint.CONFIG, config)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / checkpoint.TOKENIZER)
        if not resume and dense:
            recipes_vision.save_holdout(out, ds, cfg, config)
        elif not resume:
            _save_holdout(out, ds, cfg)
    dist.barrier()

    if dense:
        recipe = recipes_vision.DenseRecipe(model, groups, ds, cfg, device, config)
    elif head_cls is backbones.Classifier:
        # Texts are tokenized as export and the service will: from the stored preprocessing.
        inputs = Inputs(task, device, mean, std, tokenizer, cfg.max_length, config["preprocessing"])
        if tasks.uses_audio(task):  # clips become log-mel features through the task contract
            inputs.contract = tasks.create(config)
        recipe = ClassifierRecipe(model, groups, ds, cfg, device, inputs)
    else:
        windows = text_tokenizer(tokenizer.backend_tokenizer.to_str(), config["preprocessing"])
        recipe = SpanRecipe(model, groups, ds, cfg, device, tasks.create(config, windows), log)
    hooks = {"on_epoch_end": on_epoch_end, "on_step": on_step}
    trainer = Trainer(recipe, cfg, out, dist, log, hooks)
    state = trainer.load_resume() if resume else None
    if state is not None:
        log(f"resumed after {state['phase']} epoch {state['epoch'] + 1}")
    if cfg.strategy == "auto":
        outcome, used = auto.run(trainer, cfg, len(ds.val), state)
    else:
        outcome = trainer.run(Phase("train", cfg.strategy, cfg.epochs, cfg.patience), state=state)
        used = cfg.strategy

    # The best epoch, from its saved weights, on validation and, once, on test.
    from safetensors.torch import load_model

    dist.barrier()
    load_model(model, str(out / checkpoint.WEIGHTS))
    val, test = recipe.evaluate("val", used), recipe.evaluate("test", used)
    val.pop("correct", None)
    test.pop("correct", None)
    final = {
        "epoch": outcome.best_epoch,
        "strategy": used,
        **{f"val_{k}": v for k, v in val.items()},
        **{f"test_{k}": v for k, v in test.items()},
    }
    if dist.main:
        trainer.extra["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        trainer.write_metrics(outcome, final)
        _report(out, trainer.history, final, ds, recipe, trainer.extra.get("auto", {}))
        config.update(
            status="complete",
            result={
                k: v
                for k, v in final.items()
                if k in ("epoch", "strategy")
                or (k[:4] in ("val_", "test") and isinstance(v, float))
            },
        )
        checkpoint.write_json(out / checkpoint.CONFIG, config)
        shutil.rmtree(out / checkpoint.RESUME, ignore_errors=True)
    dist.close()
    return final


SMALLEST_INPUT = 96  # pixels: 3x3 cells after the 32x downsampling of the CNN backbones


def _image_size(data, spec, log) -> int | None:
    """The backbone's own input size, or a smaller one when the images are much smaller
    (8x8 digits gain nothing from 224 pixels but cost 5x the compute): the median shorter
    side rounded up to a multiple of 32, at least SMALLEST_INPUT."""
    own = backbones.image_prep(spec, None)[0].crop
    side = median_image_side(data)
    if side is None or side >= own:
        return None
    size = max(SMALLEST_INPUT, -(-side // 32) * 32)
    if size >= own:
        return None
    log(f"images are small (median side {side} px): input size {size} instead of {own}")
    return size


def _modality(task: str) -> str:
    if tasks.uses_tokenizer(task):
        return "text"
    return "audio" if tasks.uses_audio(task) else "images"


def _clip_seconds(cfg: TrainConfig, ds: Dataset, log) -> float:
    """The audio window: as asked, or the longest clip rounded up to 0.1 s (Whisper's
    encoder then reads that many frames instead of 30 s of mostly padding)."""
    if cfg.clip_seconds is not None:
        return float(cfg.clip_seconds)
    longest = ds.summary["clip_seconds"]["max"]
    window = min(30.0, max(0.1, math.ceil(longest * 10 - 1e-6) / 10))
    log(f"audio window {window:.1f} s (the longest clip is {longest:.2f} s)")
    return window


def _silent(*_args) -> None:
    """The log of processes other than the first under torchrun."""


def _save_holdout(out: Path, ds: Dataset, cfg: TrainConfig) -> None:
    """Up to `holdout_size` test examples: what export gates, checks and calibrates on."""
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.holdout_for(tasks.get(ds.task).heavy_inputs), len(ds.test))
    idx = np.sort(rng.choice(len(ds.test), size=n, replace=False))
    held = ds.test.inputs[idx] if ds.task == IMAGE_TASK else [ds.test.inputs[i] for i in idx]
    targets = None if ds.test.targets is None else [json.dumps(ds.test.targets[i]) for i in idx]
    checkpoint.save_holdout(out, held, ds.test.labels[idx], targets)


def _report(out: Path, history: list[dict], final: dict, ds: Dataset, recipe, auto: dict) -> None:
    """curves.png (the validation split, per epoch), for classification the test split's
    confusion matrix (a split no selection saw), and summary.md: the splits, what `auto`
    tried and chose, and the figures, each named by its split."""
    report = out / "report"
    report.mkdir(exist_ok=True)
    scores = () if isinstance(recipe, ClassifierRecipe) else (f"val_{recipe.contract.metric}",)
    plot_curves(
        history,
        report / "curves.png",
        final["epoch"],
        *scores,
        loss=getattr(recipe, "loss_name", "cross-entropy"),
    )
    if hasattr(recipe, "draw_grid"):
        recipe.draw_grid(report / "predictions.png")
    if "test_confusion_matrix" in final:
        plot_confusion(
            final["test_confusion_matrix"],
            ds.labels,
            report / "confusion.png",
            f"test split, best epoch {final['epoch']} (acc {final['test_accuracy']:.3f})",
        )
    splits = ds.summary.get("splits", {})
    lines = [
        f"# {out.name}: {ds.task}",
        "",
        "| split | examples | source | used for |",
        "|---|---:|---|---|",
        f"| train | {len(ds.train)} | {splits.get('train', 'given')} | the weights |",
        f"| validation | {len(ds.val)} | {splits.get('val', '?')} "
        "| best epoch, early stopping, the `auto` decision |",
        f"| test | {len(ds.test)} | {splits.get('test', '?')} "
        "| scored once at the end; export's holdout (gates, parity, drift) |",
        "",
    ]
    if auto:
        probe, trial = auto.get("probe", {}), auto.get("trial", {})
        metric = next((k for k in probe if k.startswith("val_")), "")
        lines += [
            f"Strategy `auto` chose **{auto.get('chosen')}**: linear probe {metric} "
            f"{probe.get(metric, float('nan')):.4f} ({probe.get('epochs')} epochs, "
            f"{probe.get('seconds')} s); full fine-tune after {trial.get('epochs')} trial "
            f"epoch(s) {trial.get(metric, float('nan')):.4f} ({trial.get('seconds_per_epoch')} s "
            f"per epoch); gain {auto.get('gain', 0):+.4f} against a noise margin of "
            f"{auto.get('margin', 0):.4f} on {auto.get('validation_size')} validation examples.",
            "",
        ]
    lines += ["| figure | validation | test |", "|---|---:|---:|"]
    for key, value in final.items():
        if key.startswith("val_") and isinstance(value, float):
            name = key[4:]
            lines.append(
                f"| {name} | {value:.4f} | {final.get('test_' + name, float('nan')):.4f} |"
            )
    (report / "summary.md").write_text("\n".join(lines) + "\n")


def _config(task, spec, cfg, encoder, dim, head_cls, ds, prep, mean, std, tokenizer) -> dict:
    """config.json: everything export needs to rebuild the model and its inputs."""
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "task": task,
        "status": "training",
        "backbone": {
            "name": spec.name,
            "family": spec.family,
            "source": spec.source,
            "weights": cfg.weights,
            "feature_dim": dim,
            "groups": list(spec.groups),
            **backbones.saved_architecture(spec, encoder),
        },
        "head": {
            "type": head_cls.__name__,
            "in_features": dim,
            "out_features": len(ds.labels),
            "dropout": cfg.dropout,
        },
        "labels": ds.labels,
        "preprocessing": _preprocessing(task, cfg, prep, mean, std, encoder, tokenizer),
        "postprocessing": postprocessing(cfg, ds),
        "training": cfg.to_dict(),
        "seed": cfg.seed,
        "amp": torch.cuda.is_available() and cfg.device != "cpu",
        "versions": _versions(),
        "data": ds.summary,
    }


def _preprocessing(task, cfg, prep, mean, std, encoder, tokenizer) -> dict:
    """How an input becomes the model's feeds; the task contract reads it (tasks/)."""
    if tasks.uses_audio(task):
        from tasks.audio import HOP, N_FFT, SAMPLE_RATE

        return {
            "sample_rate": SAMPLE_RATE,
            "n_mels": int(encoder.encoder.config.num_mel_bins),
            "n_fft": N_FFT,
            "hop_length": HOP,
            "clip_seconds": cfg.clip_seconds,
            "features": "whisper log-mel (log10, floored 8 below the maximum, (x + 4) / 4)",
            "input_names": ["input_features", "attention_mask"],
        }
    return (
        {
            "resize": prep.resize,
            "crop_size": prep.crop,
            "interpolation": prep.interpolation,
            "mean": list(mean),
            "std": list(std),
            "scale": 1 / 255,
            "channels": "RGB",
            "layout": "NCHW",
            "resize_mode": "shorter-side, then centre crop",
        }
        if task == IMAGE_TASK
        else {
            "max_length": cfg.max_length,
            "truncation": True,
            "padding": "longest",
            "tokenizer": checkpoint.TOKENIZER,
            "pooling": encoder.pooling,
            "input_names": list(tokenizer.model_input_names),
            **window_preprocessing(cfg, tokenizer, task),
        }
    )
