"""The epoch loop every task trains with (finetune/recipes.py says what a task brings).

One `Phase` is a strategy trained for up to `epochs` epochs under one optimizer and one
schedule (finetune/optim.py): mixed precision on CUDA, gradient accumulation, gradient
clipping, validation each epoch on the task's metric, early stopping after `patience`
epochs without improvement, the best epoch's weights in `model.safetensors`, and the state
of the last epoch in `resume/` so that an interrupted phase continues exactly.

Distributed data parallel: under `torchrun --nproc-per-node N -m finetune ...` every process
trains on its shard of each epoch (DistributedDataParallel, NCCL on GPUs, gloo on CPUs),
validates on the whole validation split (the same figures everywhere, so every process takes
the same early-stopping decision), and only the first process writes files.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from finetune import checkpoint, optim

STATE = "state.pt"
LAST = "last.safetensors"


# --------------------------------------------------------------------------- processes


@dataclass
class Dist:
    """This process's place in a `torchrun` job (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device_kind: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        return cls(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        """Leave the process group (torchrun warns about one left open at exit)."""
        if self.world > 1:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel over the parameters that train now (rebuilt when the
        trainable set changes: DDP registers them at construction)."""
        if self.world <= 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        # Some backbones hold parameters the pooled features never use (BERT's pooler).
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


# --------------------------------------------------------------------------- progress


def progress(items: Iterable, desc: str, total: int | None = None):
    """A tqdm bar on a terminal; otherwise (logs, CI, `kubectl logs`) a plain line every
    25% instead of carriage-return redraws."""
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, unit="batch", leave=False)
        return
    marks = {max(1, round(total * q)) for q in (0.25, 0.5, 0.75)} if total >= 8 else set()
    t0 = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if i in marks:
            print(
                f"{desc}: {i}/{total} batches, {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )


# --------------------------------------------------------------------------- freezing


def set_trainable(model, groups: list[list[nn.Parameter]], strategy: str, epoch: int) -> int:
    """Freeze/unfreeze for this epoch; returns how many backbone groups (from the top) train.
    `gradual`: epoch 0 trains the head, epoch k also the top k groups (ULMFiT)."""
    n = {"full": len(groups), "feature-extraction": 0}.get(strategy, min(epoch, len(groups)))
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= len(groups) - n)
    model.head.requires_grad_(True)
    model.train()
    if n == 0:
        model.backbone.eval()  # frozen: BatchNorm statistics and dropout fixed, as in the cache
        return n
    for module in model.backbone.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            # Trained BatchNorm keeps its pre-trained statistics (its scale and shift still
            # learn): batches of 32 estimate them poorly, and when fine-tuning starts from a
            # probe the features the head learned stay the same (Detectron2's FrozenBN).
            module.eval()
    return n


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


class Trainer:
    """Runs phases of one run: the shared history, step counter and files."""

    def __init__(self, recipe, cfg, out: Path, dist: Dist, log: Callable, hooks: dict):
        self.recipe, self.cfg, self.out, self.dist, self.log = recipe, cfg, out, dist, log
        self.on_epoch_end = hooks.get("on_epoch_end")
        self.on_step = hooks.get("on_step")
        self.history: list[dict] = []
        self.step = 0
        self.extra: dict = {}  # auto's record, kept in the resume state

    def better(self, record: dict, outcome: Outcome) -> bool:
        """An improvement of the monitored metric; a tie on it (small validation sets
        saturate accuracy) is broken by a lower validation loss."""
        if outcome.best is None:
            return True
        value, best = record[self.cfg.monitor], outcome.best
        if self.cfg.monitor == "val_loss":
            return value < best - self.cfg.min_delta
        if value == best:
            return record["val_loss"] < outcome.best_val.get("val_loss", float("inf"))
        return value > best + self.cfg.min_delta

    def better_value(self, value: float | None, best: float | None) -> bool:
        """Strictly better on the monitored metric."""
        if value is None or best is None:
            return value is not None
        return value < best if self.cfg.monitor == "val_loss" else value > best

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

    def run(
        self,
        phase: Phase,
        decide: Callable[[int, Outcome], bool] | None = None,
        state: dict | None = None,
    ) -> Outcome:
        """Train `phase`; `decide(epoch_in_phase, outcome)` may end it after an epoch (auto's
        trial); `state`: the resume state of this phase."""
        cfg, recipe, dist = self.cfg, self.recipe, self.dist
        cuda = recipe.device.type == "cuda"
        cached = recipe.cached(phase.strategy)
        loader = recipe.train_loader(phase.strategy, dist)
        per_epoch = max(1, -(-len(loader) // cfg.grad_accum))
        optimizer, schedule = self._optimizer(phase, per_epoch * phase.epochs)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and not cached)
        outcome, bad, start = Outcome(), 0, 0
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler"])
            outcome = Outcome(**state["outcome"])
            bad, start = state["bad"], state["epoch"] + 1
            self.step = state["step"]
        for epoch in range(start, phase.epochs):
            if bad >= phase.patience:
                break
            t0 = time.perf_counter()
            recipe.set_epoch(epoch)
            n_groups = recipe.set_trainable(phase.strategy, epoch)
            module = dist.wrap(recipe.module(phase.strategy))
            total, count = 0.0, 0
            optimizer.zero_grad(set_to_none=True)
            batches = progress(
                loader, f"{phase.name} epoch {epoch + 1}/{phase.epochs}", total=len(loader)
            )
            for i, batch in enumerate(batches):
                with torch.autocast(
                    recipe.device.type, dtype=torch.float16, enabled=cuda and not cached
                ):
                    loss, n = recipe.loss(module, batch)
                scaler.scale(loss / cfg.grad_accum).backward()
                total, count = total + loss.item() * n, count + n
                if (i + 1) % cfg.grad_accum and i + 1 < len(loader):
                    continue
                if cfg.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(recipe.model.parameters(), cfg.max_grad_norm)
                rates = {f"{g['name']}/{g['kind']}": g["lr"] for g in optimizer.param_groups}
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.on_step is not None:  # the rates this step used
                    self.on_step(self.step, rates)
            val = recipe.evaluate("val", phase.strategy)
            correct = val.pop("correct", None)
            record = {
                "epoch": len(self.history) + 1,  # 1-based over the run: files, logs, plots
                "phase": phase.name,
                "strategy": phase.strategy,
                "train_loss": total / max(1, count),
                **{f"val_{k}": v for k, v in val.items() if isinstance(v, float)},
                "trainable_groups": n_groups,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
            self.history.append(record)
            improved = self.better(record, outcome)
            if improved:
                outcome.best, outcome.best_epoch, bad = record[cfg.monitor], record["epoch"], 0
                outcome.best_val = {f"val_{k}": v for k, v in val.items()}
                outcome.best_correct = correct
                if dist.main:
                    checkpoint.save_weights(self.out, recipe.model)
            else:
                bad += 1
            outcome.epochs_run += 1
            shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
            self.log(
                f"{phase.name} epoch {epoch + 1}/{phase.epochs}  "
                f"train_loss {record['train_loss']:.4f}  {shown}  "
                f"groups {n_groups}/{len(recipe.groups)}  {record['seconds']:.1f}s"
                f"{'  *best*' if improved else ''}"
            )
            if dist.main:
                self.write_metrics(outcome)
                self._save_resume(phase, epoch, optimizer, schedule, scaler, outcome, bad)
            if self.on_epoch_end is not None:
                self.on_epoch_end(len(self.history) - 1, record)
            if decide is not None and not decide(epoch, outcome):
                break
        if bad >= phase.patience:
            self.log(f"early stopping: no {cfg.monitor} improvement for {phase.patience} epochs")
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

    def _save_resume(self, phase, epoch, optimizer, schedule, scaler, outcome, bad) -> None:
        from safetensors.torch import save_model

        folder = self.out / checkpoint.RESUME
        folder.mkdir(exist_ok=True)
        save_model(self.recipe.model, str(folder / (LAST + ".tmp")))
        state = {
            "phase": phase.name,
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
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
