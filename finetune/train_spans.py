"""Training loop of the span tasks (token classification, question answering): windows of
each example labelled by the task contract (`tasks/`), the task's head and loss
(`finetune/heads.py`), validation through the contract's own post-processing and metrics
around the PyTorch model, so the figures are those export and the service reproduce.

Warm-up over the first 10% of steps, then linear decay (the schedule BERT fine-tuning uses).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune import checkpoint
from finetune.heads import collate_windows
from tasks.common import INPUT_ORDER

WARMUP = 0.1  # share of the optimizer steps with a rising learning rate


def torch_session(model, device):
    """`session_run` for the task contract: numpy feeds → the model's export outputs."""

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(feeds[n]).to(device) for n in INPUT_ORDER if n in feeds]
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            outs = model.export_outputs(*args)
        return [o.float().cpu().numpy() for o in outs]

    return run


class LengthGroupedBatches:
    """Shuffled batches of windows of similar length (less padding, about 2x faster on
    CoNLL sentences): random pools of 50 batches, each sorted by length and cut."""

    def __init__(self, lengths: list[int], batch_size: int, gen: torch.Generator, pool: int = 50):
        self.lengths, self.batch_size, self.gen, self.pool = lengths, batch_size, gen, pool

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.gen).tolist()
        size = self.batch_size * self.pool
        batches = []
        for s in range(0, len(order), size):
            chunk = sorted(order[s : s + size], key=lambda i: self.lengths[i])
            batches += [
                chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)
            ]
        for i in torch.randperm(len(batches), generator=self.gen).tolist():
            yield batches[i]


def window_rows(contract, inputs, targets) -> list[tuple[dict, object]]:
    rows = []
    for raw, target in zip(inputs, targets, strict=True):
        for enc, y in contract.training_windows(raw, target):
            feeds = {
                "input_ids": enc.ids,
                "attention_mask": enc.attention_mask,
                "token_type_ids": enc.type_ids,
            }
            rows.append((feeds, y))
    return rows


@torch.no_grad()
def evaluate(model, contract, ds_split, val_loader, device, batch_size: int) -> dict:
    """val_loss over the labelled windows, then the task's metrics from its own reading of
    the model's outputs (entities, answers)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in val_loader:
        x = {k: v.to(device) for k, v in x.items()}
        args = [x[n] for n in INPUT_ORDER if n in x]
        loss = model.loss(model(*args), y.to(device))
        total, count = total + loss.item() * len(y), count + len(y)
    run = torch_session(model, device)
    items = [contract.from_holdout(v) for v in ds_split.inputs]
    outputs = []
    for s in range(0, len(items), batch_size):
        outputs.extend(contract.run(run, items[s : s + batch_size])[0])
    golds = [contract.gold(t) for t in ds_split.targets]
    metrics = contract.score(outputs, golds)
    return {"val_loss": total / max(1, count), **{f"val_{k}": v for k, v in metrics.items()}}


def train_spans(model, groups, ds, contract, cfg, out: Path, device, on_epoch_end, log, helpers):
    """Returns the best epoch's validation metrics (weights of that epoch in `out`)."""
    better, set_trainable, plot_curves = helpers
    names = contract.names()
    pad_id = contract.pad_id
    train_rows = window_rows(contract, ds.train.inputs, ds.train.targets)
    val_rows = window_rows(contract, ds.val.inputs, ds.val.targets)
    log(
        f"windows: {len(train_rows)} train, {len(val_rows)} val (max_length "
        f"{contract.pre['max_length']}, stride {contract.pre.get('stride', 0)})"
    )
    gen = torch.Generator().manual_seed(cfg.seed)

    def collate(rows):
        return collate_windows(rows, names, pad_id, model)

    train_loader = DataLoader(
        train_rows, batch_size=cfg.batch_size, shuffle=True, generator=gen, collate_fn=collate
    )
    val_loader = DataLoader(val_rows, batch_size=64, collate_fn=collate)
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10
    params = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    if cfg.strategy != "feature-extraction":
        params.append({"params": [p for g in groups for p in g], "lr": backbone_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epochs * len(train_loader))
    warm = max(1, int(WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    history, best, best_epoch, bad, best_val = [], None, None, 0, None
    for epoch in range(cfg.epochs):
        if bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        n_groups = set_trainable(model, groups, cfg.strategy, epoch)
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for x, y in bar:
            x = {k: v.to(device) for k, v in x.items()}
            args = [x[n] for n in INPUT_ORDER if n in x]
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                loss = model.loss(model(*args), y.to(device), cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        val = evaluate(model, contract, ds.val, val_loader, device, cfg.batch_size)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(1, count),
            **{k: v for k, v in val.items() if isinstance(v, float)},
            "trainable_groups": n_groups,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        improved = better(val[cfg.monitor], best, cfg)
        if improved:
            best, best_epoch, bad, best_val = val[cfg.monitor], epoch + 1, 0, val
            checkpoint.save_weights(out, model)
        else:
            bad += 1
        shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  {shown}  "
            f"groups {n_groups}/{len(groups)}  {record['seconds']:.1f}s"
            f"{'  *best*' if improved else ''}"
        )
        checkpoint.write_json(
            out / checkpoint.METRICS,
            {
                "monitor": cfg.monitor,
                "epochs": history,
                "best": {"epoch": best_epoch, **best_val},
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    if bad >= cfg.patience:
        log(f"early stopping: no {cfg.monitor} improvement for {cfg.patience} epochs")
    from safetensors.torch import load_model

    load_model(model, str(out / checkpoint.WEIGHTS))
    report = out / "report"
    report.mkdir(exist_ok=True)
    plot_curves(history, report / "curves.png", best_epoch, f"val_{contract.metric}")
    return {"epoch": best_epoch, **best_val}
