"""Checkpoint holdout → model feeds and outputs, through the task contract (`tasks/`): the
same pre- and post-processing as training and serving, here around ONNX Runtime sessions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

import tasks
from tasks.common import text_tokenizer
from tasks.vision import IMAGE_INPUT  # noqa: F401 (re-exported)


def contract_for(ckpt, tokenizer=None) -> tasks.Task:
    """The task of a checkpoint; `tokenizer`: its Hugging Face tokenizer (text tasks)."""
    tok = None
    if tasks.uses_tokenizer(ckpt.task):
        if tokenizer is None:
            from finetune.checkpoint import load_tokenizer

            tokenizer = load_tokenizer(ckpt)
        tok = text_tokenizer(tokenizer.backend_tokenizer.to_str(), ckpt.config["preprocessing"])
    elif tasks.generates(ckpt.task):  # decodes generated ids: its tokenizer.json as it is
        from finetune.checkpoint import TOKENIZER

        tok = tasks.load_tokenizer(ckpt.path / TOKENIZER, ckpt.config)
    return tasks.create(ckpt.config, tok)


class Feeder:
    """Feeds and outputs for any subset of a checkpoint's holdout."""

    def __init__(self, ckpt, tokenizer=None):
        self.task, self.pre = ckpt.task, ckpt.config["preprocessing"]
        self.contract = contract_for(ckpt, tokenizer)
        self.tokenizer = self.contract.tokenizer
        self.inputs, self.labels = ckpt.holdout_inputs, ckpt.holdout_labels
        self.items = [self.contract.from_holdout(x) for x in self.inputs]
        raw = ckpt.holdout_targets
        self.targets = [
            self.contract.target(int(y), None if raw is None else str(raw[i]))
            for i, y in enumerate(self.labels)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def take(self, n: int, offset: int = 0) -> np.ndarray:
        """n holdout indices starting at offset, wrapping around when n exceeds the holdout."""
        return (np.arange(n) + offset) % len(self.items)

    def feeds(self, idx: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
        return self.contract.parity_feeds([self.items[i] for i in idx], length)

    def batches(self, batch_size: int = 64) -> Iterator[tuple[np.ndarray, dict]]:
        for start in range(0, len(self.items), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self.items)))
            yield idx, self.feeds(idx)

    def run(self, session, batch_size: int = 64):
        """(per-item outputs, embeddings [n, dim], input statistics) of the whole holdout,
        through the task's serving path around `session` (ONNX Runtime)."""
        outputs, embeddings, stats = [], [], {}
        for start in range(0, len(self.items), batch_size):
            part: dict = {}
            out, emb = self.contract.run(
                lambda feeds: session.run(None, feeds), self.items[start : start + batch_size], part
            )
            outputs.extend(out[i] for i in range(len(emb)))
            embeddings.append(emb)
            for k, v in part.items():
                if isinstance(v, list):
                    stats.setdefault(k, []).extend(v)
        return outputs, np.concatenate(embeddings), stats


def input_names(task: str, preprocessing: dict) -> list[str]:
    """The model's input names (images: pixel_values; texts: the tokenizer's)."""
    return list(preprocessing.get("input_names") or [IMAGE_INPUT])
