"""Fine-tuning: data, model and checkpoint around the shared loop (train/loop.py).

    fine_tune("data/flowers", "runs/flowers", TrainConfig(backbone="efficientnet_lite0"))

The task is detected from the data and its recipe (recipes/) sets the run up. Strategies:
`auto` (train/auto.py: a linear probe against a short full fine-tune, measured on
validation), `feature-extraction` (frozen backbone; features computed once and cached when
there is no augmentation), `full` (everything trains, the backbone at lower, layer-wise
decaying rates), `gradual` (epoch 0 trains the head, epoch k also the top k backbone groups,
ULMFiT style). The best epoch on validation is scored once on the test split, which nothing
above saw; the holdout for export is drawn from it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import tasks
from finetune import checkpoint, models, recipes
from finetune.config import TrainConfig
from finetune.data import detect_task
from finetune.errors import CheckpointError, FinetuneError
from finetune.recipes import Setup
from finetune.report import write_report
from finetune.train import auto
from finetune.train.dist import Dist
from finetune.train.loop import Outcome, Phase, Trainer
from finetune.train.output import check_out, claim_out, holds_run, replace_out, staging


@dataclass
class Hooks:
    """Callbacks of a run (tests and notebooks watch training through them)."""

    on_epoch_end: Callable[[int, dict], None] | None = None  # (epoch index, its record)
    on_step: Callable[[int, dict], None] | None = None  # (step, {param group: learning rate})


@dataclass
class _Run:
    """Where a run writes and how: the folder, the processes, the device."""

    out: Path
    dist: Dist
    device: torch.device
    resume: bool
    log: Callable[[str], None] = print
    t_start: float = field(default_factory=time.perf_counter)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device 'cuda' asked for, but no usable CUDA GPU; use --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _silent(*_args) -> None:
    """The log of processes other than the first under torchrun."""


def _task_defaults(cfg: TrainConfig, task: str, kind) -> TrainConfig:
    """`auto` backbone and monitor resolved for the task, and its family's defaults (text
    tasks choose their encoder once the data is read: recipes/base.py)."""
    if cfg.backbone == "auto" and not tasks.uses_tokenizer(task):
        cfg = dataclasses.replace(cfg, backbone=models.default_for(task).name)
    if cfg.monitor == "auto":  # the task's own metric (tasks registry)
        metric = tasks.get(task).metric
        cfg = dataclasses.replace(
            cfg, monitor="val_macro_f1" if metric == "accuracy" else f"val_{metric}"
        )
    return cfg.for_family(images=kind.images, dense=getattr(kind, "dense", False))


def _start(out: Path, cfg: TrainConfig, overwrite: bool, resume: bool, log):
    """(the run, its configuration): checks, the saved configuration on resume, seeds."""
    dist = Dist.start("cuda" if _device(cfg.device).type == "cuda" else "cpu")
    if not dist.main:
        log = _silent
    if dist.main:
        check_out(out, overwrite, resume)
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
    return _Run(out, dist, device, resume, log), cfg


def fine_tune(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
    hooks: Hooks | None = None,
) -> dict:
    """Fine-tune `cfg.backbone` on `data` and write the checkpoint to `out`; returns the best
    epoch's validation and test metrics. On resume the configuration saved in `out` is used,
    not `cfg`. With `overwrite`, a run already in `out` is replaced once the new one has
    finished, and kept when it fails."""
    run, cfg = _start(Path(out), cfg, overwrite, resume, log)
    target = run.out
    if overwrite and not resume and holds_run(target):
        run.out = staging(target)
    try:
        result = _train(data, run, cfg, resume, hooks)
    except BaseException:
        if run.out != target and run.dist.main:
            shutil.rmtree(run.out, ignore_errors=True)
            run.log(f"the run already in '{target}' is kept")
        raise
    if run.out != target and run.dist.main:
        replace_out(run.out, target)
        run.log(f"replaced the earlier run in '{target}'")
    return result


def _train(data, run: _Run, cfg: TrainConfig, resume: bool, hooks: Hooks | None) -> dict:
    """fine_tune's work, written to `run.out`."""
    task = detect_task(data)
    kind = recipes.get(task)
    if resume and not kind.resumable:
        raise FinetuneError(f"--resume does not apply to {task} runs (they take seconds)")
    if kind.flow == "tables":
        from finetune.train.tables import fine_tune_table

        return fine_tune_table(Path(data), cfg, run)
    cfg = _task_defaults(cfg, task, kind)
    setup = kind.setup(task, cfg, data, run.log)
    if resume and setup.ds.labels != checkpoint.read_json(run.out / checkpoint.CONFIG)["labels"]:
        raise CheckpointError(
            f"labels of '{data}' differ from those saved in '{run.out}'; "
            f"the data changed since the run started"
        )
    _write_start(run, kind, setup)
    recipe = kind(setup, run.device, run.log)
    trainer = Trainer(recipe, setup.cfg, run.out, run.dist, run.log, vars(hooks or Hooks()))
    state = trainer.load_resume() if resume else None
    if state is not None:
        run.log(f"resumed after {state['phase']} epoch {state['epoch'] + 1}")
    if setup.cfg.epochs == 0:
        return _finish(run, setup, trainer, _untrained(run, task, setup), "none")
    if state is None and (zero := recipe.zero_shot()):
        trainer.extra["zero_shot"] = zero
        trainer.set_baseline({k: v for k, v in zero.items() if k.startswith("val_")})
    if setup.cfg.strategy == "auto":
        outcome, used = auto.run(trainer, setup.cfg, len(setup.ds.val), state)
    else:
        phase = Phase("train", setup.cfg.strategy, setup.cfg.epochs, setup.cfg.patience)
        outcome, used = trainer.run(phase, state=state), setup.cfg.strategy
    return _finish(run, setup, trainer, outcome, used)


def _untrained(run: _Run, task: str, setup: Setup) -> Outcome:
    """--epochs 0: the pretrained model as it is, scored like a trained one (a generative
    model answers without training; a new head would answer at random)."""
    if not tasks.generates(task):
        raise FinetuneError(
            f"--epochs 0 (no training) applies to generative tasks; a {task} model's new "
            "head must be trained"
        )
    run.log("epochs 0: the pretrained model, not trained (scored on validation and test)")
    if run.dist.main:
        checkpoint.save_weights(run.out, setup.model)
    return Outcome()


def _write_start(run: _Run, kind, setup: Setup) -> None:
    """config.json, the tokenizer and the holdout, before the first epoch."""
    setup.model.to(run.device)
    config = setup.config
    config["backbone"]["num_groups"] = len(setup.groups)
    config["device"] = str(run.device)
    config["processes"] = run.dist.world
    if run.dist.main:
        if not run.resume:
            claim_out(run.out)
        checkpoint.write_json(run.out / checkpoint.CONFIG, config)
        if setup.tokenizer is not None:
            setup.tokenizer.save_pretrained(run.out / checkpoint.TOKENIZER)
        if not run.resume:
            kind.save_holdout(run.out, setup.ds, setup.cfg, config)
    run.dist.barrier()


def _finish(run: _Run, setup: Setup, trainer: Trainer, outcome, used: str) -> dict:
    """The best epoch, from its saved weights, on validation and, once, on test; the
    report and the completed config.json."""
    from safetensors.torch import load_model

    recipe, out = trainer.recipe, run.out
    run.dist.barrier()
    load_model(setup.model, str(out / checkpoint.WEIGHTS))
    val, test = recipe.evaluate("val", used), recipe.evaluate("test", used)
    val.pop("correct", None)
    test.pop("correct", None)
    final = {
        "epoch": outcome.best_epoch,
        "strategy": used,
        **{f"val_{k}": v for k, v in val.items()},
        **{f"test_{k}": v for k, v in test.items()},
    }
    if run.dist.main:
        trainer.extra["wall_seconds"] = round(time.perf_counter() - run.t_start, 1)
        trainer.write_metrics(outcome, final)
        write_report(out, trainer.history, final, setup.ds, recipe, trainer.extra)
        shown = ("epoch", "strategy")
        setup.config.update(
            status="complete",
            result={
                k: v
                for k, v in final.items()
                if k in shown or (k[:4] in ("val_", "test") and isinstance(v, float))
            },
        )
        checkpoint.write_json(out / checkpoint.CONFIG, setup.config)
        shutil.rmtree(out / checkpoint.RESUME, ignore_errors=True)
    run.dist.close()
    return final
