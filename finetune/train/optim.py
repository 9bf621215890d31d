"""Optimizer and learning-rate schedule of one training phase.

- AdamW with decoupled weight decay on weight matrices only: biases and normalisation
  weights (every parameter with fewer than 2 dimensions) are not decayed (BERT, timm).
- Discriminative rates (ULMFiT; "layer-wise learning-rate decay" in ELECTRA/BEiT): the head
  at `lr`, the top backbone group at `backbone_lr`, each group below at `layer_decay` times
  the one above.
- The schedule from `transformers.get_scheduler`: linear warm-up over `warmup` of the
  optimizer steps, then linear or cosine decay to 0, or constant.
"""

from __future__ import annotations

import torch
from torch import nn


def _split_decay(params: list[nn.Parameter]) -> tuple[list, list]:
    decay = [p for p in params if p.ndim >= 2]
    return decay, [p for p in params if p.ndim < 2]


def param_groups(
    head: list[nn.Parameter],
    backbone: list[list[nn.Parameter]],
    lr: float,
    backbone_lr: float,
    layer_decay: float,
    weight_decay: float,
) -> list[dict]:
    """AdamW groups: (head | backbone group i) x (decayed | not decayed); `backbone` from
    the bottom group to the top one. Each group carries its name for logs and tests."""
    named = [("head", head, lr)]
    n = len(backbone)
    for i, params in enumerate(backbone):
        named.append((f"backbone.{i}", params, backbone_lr * layer_decay ** (n - 1 - i)))
    groups = []
    for name, params, rate in named:
        decay, no_decay = _split_decay(params)
        for kind, ps, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if ps:
                groups.append(
                    {"params": ps, "lr": rate, "weight_decay": wd, "name": name, "kind": kind}
                )
    return groups


def build(
    groups: list[dict], schedule: str, warmup: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `groups` and its schedule over `steps` optimizer steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(groups)
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    steps = max(1, steps)
    sched = get_scheduler(
        name, optimizer, num_warmup_steps=int(round(warmup * steps)), num_training_steps=steps
    )
    return optimizer, sched
