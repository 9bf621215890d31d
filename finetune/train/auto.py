"""`--strategy auto`: decide from the data how much of the backbone to retrain.

How many layers to retrain depends on how large the data set is and how close it is to what
the backbone was trained on. Rather than guess from sizes alone, auto measures, on the same
train/validation split, for every task with a backbone:

1. a linear probe: the frozen backbone and the head (cheap: features are cached where the
   task allows, so up to `PROBE_EPOCHS_CACHED` epochs cost about one forward pass);
2. a short full fine-tune started from the probe's head (LP-FT: Kumar et al. 2022; the
   BatchNorm statistics stay frozen, so it starts exactly where the probe ended), whose
   first epochs are the trial.

After each trial epoch the best fine-tuned figure is compared with the probe's on the task's
validation metric, against the noise of that metric on this validation split (one standard
error of the difference, at least `MIN_GAIN`: paired, from the validation items the two
models disagree on, where the task scores items one by one; small validation sets need a
larger gain). Clearly better: full fine-tuning continues on the schedule it started, while
its epochs fit in `budget_minutes` (the cost: epochs that would pass the budget are not
run). Otherwise one more trial epoch, up to `TRIAL_MAX_EPOCHS` (the first ones run at
warm-up rates, and the first fine-tune epoch often dips below the probe before it passes
it: digits went 0.971 -> 0.940 -> 0.974 -> 0.989). After the last one, clearly worse keeps
the probe; within the noise, the fine-tune continues if it is ahead (the budget allowing)
and the better of the two on validation is kept at the end, else the probe is kept. What
was tried, the figures and the choice go to the log and to `metrics.json` (`auto`).
"""

from __future__ import annotations

import math
import shutil
import time

from finetune import checkpoint
from finetune.train.loop import Outcome, Phase, Trainer

PROBE_EPOCHS_CACHED = 100  # the head alone on cached features: ~0.1 s per epoch
PROBE_EPOCHS_UNCACHED = 2  # a forward pass over the data per epoch (span tasks)
TRIAL_MAX_EPOCHS = 3  # trial epochs while the difference stays within the noise
MIN_GAIN = 0.005  # the smallest validation gain worth a full fine-tune
PROBE = "probe.safetensors"


def margin(value: float, n_val: int, monitor: str, discordant: int | None = None) -> float:
    """The gain needed over `value`, one standard error of the difference: paired where the
    items the two models disagree on are known (`discordant`, McNemar's b + c: sqrt(b + c)
    / n), else that of a proportion on `n_val` items; a loss: MIN_GAIN of it."""
    if monitor == "val_loss":
        return MIN_GAIN * max(value, 1e-9)
    if discordant is not None:
        return max(MIN_GAIN, math.sqrt(discordant) / n_val)
    p = min(max(value, 0.0), 1.0)
    return max(MIN_GAIN, math.sqrt(max(p * (1 - p), 1.0 / n_val) / n_val))


def discordant(a: list[bool] | None, b: list[bool] | None) -> int | None:
    """How many validation items exactly one of two models gets right (None: unknown)."""
    if a is None or b is None or len(a) != len(b):
        return None
    return sum(x != y for x, y in zip(a, b, strict=True))


def choose(
    probe: float, trial: float, n_val: int, monitor: str, disagree: int | None = None
) -> tuple[str, float, float]:
    """(verdict, gain, margin): "full" when the trial beats the probe by more than the noise,
    "feature-extraction" when it is worse by more, "undecided" in between."""
    gain = (probe - trial) if monitor == "val_loss" else (trial - probe)
    need = margin(probe, n_val, monitor, disagree)
    verdict = "full" if gain > need else "feature-extraction" if gain < -need else "undecided"
    return verdict, gain, need


class _Decision:
    """After each trial epoch of the fine-tune: keep going, or stop (auto's verdict, or the
    budget); what it measured goes into `record`."""

    def __init__(self, trainer: Trainer, cfg, n_val: int, probe: Outcome, record: dict):
        self.trainer, self.cfg, self.n_val = trainer, cfg, n_val
        self.probe, self.record = probe, record
        self.t_start = time.perf_counter()
        self.budget = cfg.budget_minutes * 60

    def __call__(self, epoch: int, trial: Outcome) -> bool:
        """Rank 0 decides (its clock, its record); under torchrun every rank takes that."""
        go = self._go(epoch, trial)
        go, record = self.trainer.dist.agree((go, dict(self.record)))
        self.record.clear()
        self.record.update(record)
        return go

    def _go(self, epoch: int, trial: Outcome) -> bool:
        if "chosen" not in self.record and not self._verdict(epoch, trial):
            return self.record.get("chosen") is None
        elapsed = time.perf_counter() - self.t_start
        if elapsed + self.trainer.history[-1]["seconds"] > self.budget:
            self.record["stopped_by_budget"] = True
            self.trainer.log(
                f"auto: the next epoch would pass the {self.cfg.budget_minutes:g}-minute budget"
            )
            return False
        return True

    def _verdict(self, epoch: int, trial: Outcome) -> bool:
        """Compare the trial with the probe; False when full fine-tuning is not chosen
        (still undecided: `chosen` stays unset and training goes on)."""
        cfg, probe, record = self.cfg, self.probe, self.record
        best = trial.best_val[cfg.monitor]
        disagree = discordant(probe.best_correct, trial.best_correct)
        verdict, gain, need = choose(probe.best, best, self.n_val, cfg.monitor, disagree)
        if verdict != "full" and epoch + 1 < TRIAL_MAX_EPOCHS:
            verdict = "undecided"  # early epochs run at warm-up rates: not yet a verdict
        elif verdict == "undecided":
            verdict = "full" if gain > 0 else "feature-extraction"
            record["provisional"] = verdict == "full"  # kept only if it ends ahead
        per_epoch = self.trainer.history[-1]["seconds"]
        self.trainer.log(
            f"auto: probe {cfg.monitor} {probe.best:.4f}, full after {epoch + 1} epoch(s) "
            f"{best:.4f} (gain {gain:+.4f}, noise margin {need:.4f} on "
            f"{self.n_val} validation items; ~{per_epoch:.0f}s per full epoch): {verdict}"
        )
        if verdict == "undecided":
            return False
        record.update(
            trial={
                "strategy": "full",
                "epochs": epoch + 1,
                cfg.monitor: best,
                "seconds_per_epoch": round(per_epoch, 1),
            },
            gain=gain,
            margin=need,
            margin_kind="paired" if disagree is not None else "unpaired",
            validation_size=self.n_val,
            predicted_full_seconds=round(per_epoch * cfg.epochs, 1),
            budget_seconds=self.budget,
            chosen=verdict,
        )
        return verdict == "full"


def _probe(trainer: Trainer, cfg, state: dict | None, record: dict) -> Outcome:
    """The linear probe (or, resumed in the fine-tune phase, its saved figures); its weights
    are kept in resume/ for the fine-tune to start from."""
    folder = trainer.out / checkpoint.RESUME
    if state is not None and state["phase"] != "probe":  # the probe's per-item answers are gone
        return Outcome(best=record["probe"][cfg.monitor], best_epoch=record["probe"]["best_epoch"])
    cached = trainer.recipe.cached("feature-extraction")
    epochs = PROBE_EPOCHS_CACHED if cached else PROBE_EPOCHS_UNCACHED
    t0 = time.perf_counter()
    probe = trainer.run(
        Phase("probe", "feature-extraction", epochs, max(cfg.patience, 5)), state=state
    )
    record["probe"] = {
        "strategy": "feature-extraction",
        "epochs": probe.epochs_run,
        "best_epoch": probe.best_epoch,
        cfg.monitor: probe.best,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if trainer.dist.main:
        folder.mkdir(exist_ok=True)
        shutil.copyfile(trainer.out / checkpoint.WEIGHTS, folder / PROBE)
    trainer.dist.barrier()
    return probe


def run(trainer: Trainer, cfg, n_val: int, state: dict | None) -> tuple[Outcome, str]:
    """Probe, trial, decision, and the chosen training; returns (outcome, strategy)."""
    record = trainer.extra.setdefault("auto", {})
    probe = _probe(trainer, cfg, state, record)
    if state is not None and state["phase"] == "probe":
        state = None
    folder = trainer.out / checkpoint.RESUME
    _load(trainer, folder / PROBE)  # the fine-tune starts from the probe's head (LP-FT)
    decide = _Decision(trainer, cfg, n_val, probe, record)
    full = trainer.run(Phase("fine-tune", "full", cfg.epochs, cfg.patience), decide, state)
    record.setdefault("chosen", "feature-extraction")  # the phase ended while undecided
    if record.get("provisional") and not trainer.better_value(full.best, probe.best):
        record["chosen"] = "feature-extraction"
        trainer.log("auto: the fine-tune did not end ahead of the probe; keeping the probe")
    if record["chosen"] == "full":
        return full, "full"
    _load(trainer, folder / PROBE)
    if trainer.dist.main:
        checkpoint.save_weights(trainer.out, trainer.recipe.model)
    return probe, "feature-extraction"


def _load(trainer: Trainer, path) -> None:
    from safetensors.torch import load_model

    load_model(trainer.recipe.model, str(path))
