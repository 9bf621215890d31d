"""`--backbone auto` for text tasks: the larger encoder when the data and the time budget allow
it, measured on this machine, else the small one; a cased encoder for entities when one is
installed. The reason goes to the log and to the checkpoint (`backbone.chosen_by`).

    spec, why = choose_text_backbone(task, cfg, ds, device, log)

The time rule: one optimizer step of each candidate (a batch of `batch_size` windows as long
as the data's 90th-percentile text, forward and backward) is timed after a warm-up step, and
the run's training estimated as steps per epoch x epochs x that time x 1.3 (validation and
auto's trial epochs). A candidate whose estimate passes half of `budget_minutes` is passed
over: the budget also pays for the trials of `--strategy auto` and the evaluation.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

import tasks
from finetune.errors import UnsupportedBackbone
from finetune.models.registry import MODELS, ModelSpec

# Training items below which the larger encoder is not tried: on 2,000 AG News rows it gained
# (bench/RESULTS.md, "Text backbones"); on a few hundred a 110M-parameter encoder fits the
# noise of a validation split of dozens of items as readily as the signal.
MIN_ROWS_LARGER = 1000
OVERHEAD = 1.3  # validation passes and auto's trial epochs, over the training steps
SAMPLE = 256  # texts whose tokens are counted for the window length


def candidates(task: str) -> list[ModelSpec]:
    """The registered encoders for `task`, largest first (decoders are not candidates)."""
    rows = [s for s in MODELS.values() if task in s.tasks and s.family == "hf" and not s.decoder]
    return sorted(rows, key=lambda s: -s.params_m)


def _texts(raw) -> str:
    """A data set input as one text: a string, a word list (entities), a (question, context)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict):
        return " ".join(str(v) for v in raw.values() if isinstance(v, str))
    return " ".join(str(v) for v in raw)


def window_tokens(tokenizer, ds, max_length: int) -> int:
    """The 90th percentile of the training texts' token counts, within max_length."""
    texts = [_texts(r) for r in ds.train.inputs[:SAMPLE]]
    if not texts:
        return max_length
    counts = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    return int(min(max_length, max(8, np.percentile(counts, 90))))


def step_seconds(spec: ModelSpec, batch: int, length: int, device: torch.device) -> float:
    """One forward and backward of the pretrained encoder on `batch` x `length` tokens,
    timed after a warm-up step."""
    from finetune.models.encoders import build_encoder

    encoder, _ = build_encoder(spec, "pretrained")
    encoder.to(device).train()
    vocab = int(encoder.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        encoder(input_ids=ids, attention_mask=mask).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del encoder
    return times[-1]


def choose_text_backbone(task: str, cfg, ds, device: torch.device) -> tuple[ModelSpec, str]:
    """(the encoder `--backbone auto` trains for this text data, why). Under torchrun every
    process trains what the first one measured."""
    import torch.distributed as dist

    choice = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        spec, why = _choose(task, cfg, ds, device)
        choice = [spec.name, why]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return MODELS[choice[0]], choice[1]


def _choose(task: str, cfg, ds, device: torch.device) -> tuple[ModelSpec, str]:
    from finetune.models.encoders import hf_location, load_tokenizer

    found, missing = [], []
    for spec in candidates(task):
        try:
            hf_location(spec)  # the weights are installed (unpacked on first use)
            found.append(spec)
        except UnsupportedBackbone:
            missing.append(spec.name)
    if not found:
        raise UnsupportedBackbone(f"no text encoder is installed: {', '.join(missing)}")
    notes = []
    if missing:
        notes.append(f"not installed: {', '.join(missing)} (make backbones)")
    if tasks.names_things(task):
        cased = [s for s in found if s.cased]
        if cased:
            found = cased
        else:
            notes.append("no cased encoder is installed, so entities are read lowercased")
    rows = len(ds.train)
    steps = math.ceil(rows / (cfg.batch_size * cfg.grad_accum)) * cfg.grad_accum
    budget = cfg.budget_minutes * 60 / 2
    for spec in found:
        if spec is found[-1]:
            break  # the smallest: nothing to fall back on
        if rows < MIN_ROWS_LARGER:
            notes.append(f"{spec.name} needs {MIN_ROWS_LARGER} training items, the data has {rows}")
            continue
        length = window_tokens(load_tokenizer(hf_location(spec)), ds, cfg.max_length)
        step = step_seconds(spec, cfg.batch_size, length, device)
        estimate = steps * cfg.epochs * step * OVERHEAD
        what = (
            f"{spec.name}: {step:.2f} s per step of {cfg.batch_size} x {length} tokens, "
            f"{cfg.epochs} epochs of {steps} steps ~ {estimate / 60:.0f} min"
        )
        if estimate <= budget:
            return spec, "; ".join(
                [what + f" <= half the {cfg.budget_minutes:g}-min budget", *notes]
            )
        notes.append(what + f" > half the {cfg.budget_minutes:g}-min budget")
    chosen = found[-1]
    return chosen, "; ".join([f"{chosen.name} (the smallest)", *notes])
