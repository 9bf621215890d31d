"""The epoch loop every task trains with (recipes/ says what a task brings).

One `Phase` is a strategy trained for up to `epochs` epochs under one optimizer and one
schedule (train/optim.py): mixed precision on CUDA, gradient accumulation, gradient
clipping, validation each epoch on the task's metric, early stopping after `patience`
epochs without improvement, the best epoch's weights in `model.safetensors`, and the state
of the last epoch in `resume/` so that an interrupted phase continues exactly.

Distributed data parallel: under `torchrun --nproc-per-node N -m finetune ...` every process
trains on its shard of each epoch (DistributedDataParallel, NCCL on GPUs, gloo on CPUs),
validates on the whole validation split (the same figures everywhere, so every process takes
the same early-stopping decision), and only the first process writes files.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from finetune import checkpoint
from finetune.progress import progress
from finetune.train import optim
from finetune.train.dist import Dist

LOWER_IS_BETTER = ("val_loss", "val_wer", "val_cer")  # monitors that improve downwards
STATE = "state.pt"
LAST = "last.safetensors"
# Seconds of training between two resume snapshots (the last epoch's weights and state, and
# the best epoch's weights in model.safetensors); also taken after a phase's first and last
# epoch. An interrupted run repeats at most this much. Snapshots each epoch wrote the whole
# model twice per epoch: 9 GB over auto's 100 cached probe epochs of a ResNet-18.
SNAPSHOT_EVERY = 30.0


# --------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class Phase:
    name: str  # "train", or auto's "probe" and "fine-tune"
    strategy: str  # feature-extraction, full or gradual
    epochs: int  # planned epochs: the schedule decays to 0 over them
    patience: int  # epochs without improvement before the phase stops


@dataclass
class Outcome:
    """How a phase ended: its best epoch (1-based, counted over the whole run) and figures."""

    best: float | None = None
    best_epoch: int | None = None
    best_val: dict = field(default_factory=dict)
    best_correct: list[bool] | None = None  # per validation item (classification), in memory
    epochs_run: int = 0


@dataclass
class _Optimization:
    """A phase's optimizer, schedule and gradient scaler, and whether it runs in float16."""

    optimizer: object
    schedule: object
    scaler: object
    amp: bool


class Trainer:
    """Runs phases of one run: the shared history, step counter and files."""

    def __init__(self, recipe, cfg, out: Path, dist: Dist, log: Callable, hooks: dict):
        self.recipe, self.cfg, self.out, self.dist, self.log = recipe, cfg, out, dist, log
        self.on_epoch_end = hooks.get("on_epoch_end")
        self.on_step = hooks.get("on_step")
        self.history: list[dict] = []
        self.step = 0
        self._best: dict | None = None  # the best epoch's weights (CPU) not yet on disk
        self._snapshot_at = 0.0
        self.extra: dict = {}  # auto's record, kept in the resume state
        # Where a phase starts from: nothing, or the pretrained model's validation figures as
        # epoch 0 (generative tasks score it first: `set_baseline`).
        self.baseline = Outcome()

    def set_baseline(self, val: dict) -> None:
        """The pretrained model as epoch 0, its weights in model.safetensors: an epoch must
        beat it on the monitored metric to replace it."""
        self.baseline = Outcome(best=val[self.cfg.monitor], best_epoch=0, best_val=val)
        if self.dist.main:
            checkpoint.save_weights(self.out, self.recipe.model)

    def better(self, record: dict, outcome: Outcome) -> bool:
        """An improvement of the monitored metric; a tie on it (small validation sets
        saturate accuracy) is broken by a lower validation loss."""
        if outcome.best is None:
            return True
        value, best = record[self.cfg.monitor], outcome.best
        if value == best and outcome.best_epoch == 0:
            return False  # the pretrained model (epoch 0) gives way to a strictly better one
        if value == best and self.cfg.monitor != "val_loss":
            return record["val_loss"] < outcome.best_val.get("val_loss", float("inf"))
        if self.cfg.monitor in LOWER_IS_BETTER:
            return value < best - self.cfg.min_delta
        return value > best + self.cfg.min_delta

    def better_value(self, value: float | None, best: float | None) -> bool:
        """Strictly better on the monitored metric."""
        if value is None or best is None:
            return value is not None
        return value < best if self.cfg.monitor in LOWER_IS_BETTER else value > best

    def _optimizer(self, phase: Phase, steps: int):
        cfg, recipe = self.cfg, self.recipe
        backbone = [] if phase.strategy == "feature-extraction" else recipe.groups
        groups = optim.param_groups(
            list(recipe.model.head.parameters()),
            backbone,
            cfg.lr,
            cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10,
            cfg.layer_decay,
            cfg.weight_decay,
        )
        return optim.build(groups, cfg.schedule, cfg.warmup, steps)

    def _optimization(self, phase: Phase, loader) -> _Optimization:
        cuda_amp = self.recipe.device.type == "cuda" and not self.recipe.cached(phase.strategy)
        per_epoch = max(1, -(-len(loader) // self.cfg.grad_accum))
        optimizer, schedule = self._optimizer(phase, per_epoch * phase.epochs)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda_amp)
        return _Optimization(optimizer, schedule, scaler, cuda_amp)

    def _restore(self, opt: _Optimization, state: dict) -> tuple[Outcome, int, int]:
        """(outcome, epochs without improvement, first epoch) of a resumed phase."""
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.schedule.load_state_dict(state["schedule"])
        opt.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        return Outcome(**state["outcome"]), state["bad"], state["epoch"] + 1

    def _train_epoch(self, phase: Phase, epoch: int, loader, opt: _Optimization):
        """One pass over the training batches: (trainable groups, mean training loss)."""
        cfg, recipe = self.cfg, self.recipe
        recipe.set_epoch(epoch)
        n_groups = recipe.set_trainable(phase.strategy, epoch)
        module = self.dist.wrap(recipe.module(phase.strategy))
        total, count = 0.0, 0
        opt.optimizer.zero_grad(set_to_none=True)
        desc = f"{phase.name} epoch {epoch + 1}/{phase.epochs}"
        for i, batch in enumerate(progress(loader, desc, total=len(loader))):
            with torch.autocast(recipe.device.type, dtype=torch.float16, enabled=opt.amp):
                loss, n = recipe.loss(module, batch)
            opt.scaler.scale(loss / cfg.grad_accum).backward()
            total, count = total + loss.item() * n, count + n
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader):
                self._step(opt)
        return n_groups, total / max(1, count)

    def _step(self, opt: _Optimization) -> None:
        if self.cfg.max_grad_norm > 0:
            opt.scaler.unscale_(opt.optimizer)
            nn.utils.clip_grad_norm_(self.recipe.model.parameters(), self.cfg.max_grad_norm)
        rates = {f"{g['name']}/{g['kind']}": g["lr"] for g in opt.optimizer.param_groups}
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.schedule.step()
        opt.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.on_step is not None:  # the rates this step used
            self.on_step(self.step, rates)

    def _keep_best(self, record: dict, val: dict, outcome: Outcome) -> bool:
        """Whether this epoch improved on the best; if so its weights are saved."""
        correct = val.pop("correct", None)
        if not self.better(record, outcome):
            return False
        outcome.best, outcome.best_epoch = record[self.cfg.monitor], record["epoch"]
        outcome.best_val = {f"val_{k}": v for k, v in val.items()}
        outcome.best_correct = correct
        if self.dist.main:  # written with the next snapshot
            self._best = {k: v.detach().to("cpu", copy=True) for k, v in self._state().items()}
        return True

    def _state(self) -> dict:
        return self.recipe.model.state_dict()

    def _snapshot(self, phase: Phase, epoch: int, opt: _Optimization, outcome, bad: int) -> None:
        """The best weights (when they changed) and the resume state, to disk."""
        if self._best is not None:
            model = self.recipe.model
            current = {k: v.detach().to("cpu", copy=True) for k, v in self._state().items()}
            model.load_state_dict(self._best)
            checkpoint.save_weights(self.out, model)
            model.load_state_dict(current)
            self._best = None
        self._save_resume(phase, epoch, opt, outcome, bad)
        self._snapshot_at = time.perf_counter()

    def run(
        self,
        phase: Phase,
        decide: Callable[[int, Outcome], bool] | None = None,
        state: dict | None = None,
    ) -> Outcome:
        """Train `phase`; `decide(epoch_in_phase, outcome)` may end it after an epoch (auto's
        trial); `state`: the resume state of this phase."""
        loader = self.recipe.train_loader(phase.strategy, self.dist)
        opt = self._optimization(phase, loader)
        outcome, bad, start = dataclasses.replace(self.baseline), 0, 0
        if state is not None:
            outcome, bad, start = self._restore(opt, state)
        saved = last = None  # the epochs of the last snapshot and the last one trained
        for epoch in range(start, phase.epochs):
            if bad >= phase.patience:
                break
            t0 = time.perf_counter()
            n_groups, train_loss = self._train_epoch(phase, epoch, loader, opt)
            val = self.recipe.evaluate("val", phase.strategy)
            record = {
                "epoch": len(self.history) + 1,  # 1-based over the run: files, logs, plots
                "phase": phase.name,
                "strategy": phase.strategy,
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in val.items() if isinstance(v, float)},
                "trainable_groups": n_groups,
                "lr": opt.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
            self.history.append(record)
            improved = self._keep_best(record, val, outcome)
            bad = 0 if improved else bad + 1
            outcome.epochs_run += 1
            shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
            self.log(
                f"{phase.name} epoch {epoch + 1}/{phase.epochs}  "
                f"train_loss {record['train_loss']:.4f}  {shown}  "
                f"groups {n_groups}/{len(self.recipe.groups)}  {record['seconds']:.1f}s"
                f"{'  *best*' if improved else ''}"
            )
            last = epoch
            due = epoch == start or time.perf_counter() - self._snapshot_at >= SNAPSHOT_EVERY
            if self.dist.main:
                self.write_metrics(outcome)
                if due:
                    self._snapshot(phase, epoch, opt, outcome, bad)
                    saved = epoch
            if self.on_epoch_end is not None:
                self.on_epoch_end(len(self.history) - 1, record)
            if decide is not None and not decide(epoch, outcome):
                break
        if self.dist.main and last is not None and saved != last:
            self._snapshot(phase, last, opt, outcome, bad)
        if bad >= phase.patience:
            self.log(
                f"early stopping: no {self.cfg.monitor} improvement for {phase.patience} epochs"
            )
        return outcome

    def write_metrics(self, outcome: Outcome, final: dict | None = None) -> None:
        path = self.out / checkpoint.METRICS
        best = final if final is not None else {"epoch": outcome.best_epoch, **outcome.best_val}
        checkpoint.write_json(
            path,
            {
                "monitor": self.cfg.monitor,
                "epochs": self.history,
                "best": best,
                "feature_cache_seconds": self.recipe.cache_seconds,
                **self.extra,
            },
        )

    def _save_resume(self, phase, epoch: int, opt: _Optimization, outcome, bad: int) -> None:
        from safetensors.torch import save_model

        folder = self.out / checkpoint.RESUME
        folder.mkdir(exist_ok=True)
        save_model(self.recipe.model, str(folder / (LAST + ".tmp")))
        state = {
            "phase": phase.name,
            "epoch": epoch,
            "optimizer": opt.optimizer.state_dict(),
            "schedule": opt.schedule.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "outcome": {**outcome.__dict__, "best_correct": None},
            "bad": bad,
            "step": self.step,
            "history": self.history,
            "extra": self.extra,
            "rng": self.recipe.rng_state(),
        }
        torch.save(state, folder / (STATE + ".tmp"))
        (folder / (LAST + ".tmp")).replace(folder / LAST)
        (folder / (STATE + ".tmp")).replace(folder / STATE)

    def load_resume(self) -> dict:
        """The saved state; the model holds the last epoch's weights afterwards."""
        from safetensors.torch import load_model

        folder = self.out / checkpoint.RESUME
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        load_model(self.recipe.model, str(folder / LAST))
        self.history, self.step, self.extra = state["history"], state["step"], state["extra"]
        self.recipe.set_rng_state(state["rng"])
        return state
