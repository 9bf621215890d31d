"""Checkpoint holdout → ONNX feeds (numpy), exactly as training fed the model.

Images: uint8 NHWC → float32 NCHW, `(x / 255 - mean) / std`. Text: the checkpoint's tokenizer,
truncation at `max_length`, padding to the longest text (or to a fixed length for parity).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

IMAGE_INPUT = "pixel_values"


def image_feeds(images: np.ndarray, preprocessing: dict) -> dict[str, np.ndarray]:
    mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return {IMAGE_INPUT: ((x - mean) / std).astype(np.float32)}


def text_feeds(tokenizer, texts, preprocessing: dict, length: int | None = None) -> dict:
    """Tokenize; `length` pads (and truncates) every text to that many tokens."""
    enc = tokenizer(
        [str(t) for t in texts],
        truncation=True,
        max_length=length or preprocessing["max_length"],
        padding="max_length" if length else "longest",
        return_tensors="np",
    )
    return {k: enc[k].astype(np.int64) for k in preprocessing["input_names"]}


def input_names(task: str, preprocessing: dict) -> list[str]:
    return [IMAGE_INPUT] if task == "image-classification" else list(preprocessing["input_names"])


class Feeder:
    """Builds feeds for any subset of a checkpoint's holdout."""

    def __init__(self, ckpt, tokenizer=None):
        self.task, self.pre = ckpt.task, ckpt.config["preprocessing"]
        self.inputs, self.labels, self.tokenizer = (
            ckpt.holdout_inputs,
            ckpt.holdout_labels,
            tokenizer,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int, offset: int = 0) -> np.ndarray:
        """n holdout indices starting at offset, wrapping around when n exceeds the holdout."""
        return (np.arange(n) + offset) % len(self.labels)

    def feeds(self, idx: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
        if self.task == "image-classification":
            return image_feeds(self.inputs[idx], self.pre)
        return text_feeds(self.tokenizer, self.inputs[idx], self.pre, length)

    def batches(self, batch_size: int = 64) -> Iterator[tuple[np.ndarray, dict]]:
        for start in range(0, len(self.labels), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self.labels)))
            yield idx, self.feeds(idx)
