"""Model inputs of classification: in-memory data sets and the batch → device step (normalise
or tokenize)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from finetune.progress import progress
from tasks.common import encoding_columns, text_tokenizer
from tasks.text_windows import window_feeds


class ImageSet(torch.utils.data.Dataset):
    """uint8 NHWC images held in memory → uint8 CHW tensors (augmented when asked)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool):
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        self.transform = None
        if augment:
            from torchvision.transforms import v2

            size = images.shape[1]
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(),
                ]
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].permute(2, 0, 1)
        return (self.transform(x) if self.transform else x), self.labels[i]


class TextSet(torch.utils.data.Dataset):
    def __init__(self, texts: list[str], labels: np.ndarray):
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.texts[i], int(self.labels[i])


class AudioSet(torch.utils.data.Dataset):
    """Clips (base64 files) → the task contract's log-mel features, computed once up front."""

    def __init__(self, clips: list[str], labels: np.ndarray, contract, chunk: int = 64):
        feeds: dict[str, list] = {}
        starts = range(0, len(clips), chunk)
        for s in progress(starts, f"log-mel features of {len(clips)} clips"):
            part = contract.feeds([contract.from_holdout(c) for c in clips[s : s + chunk]])
            for k, v in part.items():
                feeds.setdefault(k, []).append(torch.from_numpy(v))
        self.feeds = {k: torch.cat(v) for k, v in feeds.items()}
        self.labels = torch.from_numpy(np.asarray(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.feeds.items()}, self.labels[i]


class Inputs:
    """Turns a loader batch into model inputs on the device (normalise or tokenize)."""

    def __init__(
        self,
        task: str,
        device: torch.device,
        mean=None,
        std=None,
        tokenizer=None,
        max_length: int = 128,
        pre: dict | None = None,
    ):
        """`tokenizer`: the Hugging Face tokenizer; texts go through its `tokenizers` core
        configured as export and the service configure it (tasks.common.text_tokenizer)."""
        self.task, self.device, self.max_length = task, device, max_length
        self.tokenizer, self.fast = tokenizer, None
        self.contract = None
        if tokenizer is not None:
            pre = {"max_length": max_length, **(pre or {})}
            self.fast = text_tokenizer(tokenizer.backend_tokenizer.to_str(), pre)
            self.names = list(tokenizer.model_input_names)
            if int(pre.get("windows", 1)) > 1:  # long texts: the serving contract's windows
                import tasks

                spec = {"task": task, "labels": [], "preprocessing": pre}
                self.contract = tasks.create(spec, self.fast)
        if mean is not None:  # uint8 images: scaled and normalised on the device
            self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def collate(self, batch):
        if self.fast is None:  # images and audio features: tensors already
            return torch.utils.data.default_collate(batch)
        texts, labels = zip(*batch, strict=True)
        y = torch.tensor(labels, dtype=torch.long)
        if self.contract is not None:
            per_text, _ = self.contract.text_windows([str(t) for t in texts])
            feeds = window_feeds([w for ws in per_text for w in ws], self.names, self.pad_id)
            doc = [i for i, ws in enumerate(per_text) for _ in ws]
            return {**{k: torch.from_numpy(v) for k, v in feeds.items()}, "doc": doc}, y
        feeds = encoding_columns(self.fast.encode_batch([str(t) for t in texts]), self.names)
        return {k: torch.from_numpy(v) for k, v in feeds.items()}, y

    @property
    def pad_id(self) -> int:
        return int(self.fast.padding["pad_id"])

    def __call__(self, model: nn.Module, x):
        if isinstance(x, dict):
            feeds = {k: v.to(self.device, non_blocking=True) for k, v in x.items() if k != "doc"}
            out = model(**feeds)
            if "doc" not in x:
                return out
            # One row per window → one per text: the mean over its windows (of the pooled
            # features, or of the logits: the head is linear, so the two agree).
            doc = torch.tensor(x["doc"], device=out.device)
            n = int(doc.max()) + 1
            total = torch.zeros(n, out.shape[1], dtype=out.dtype, device=out.device)
            total.index_add_(0, doc, out)
            return total / torch.bincount(doc, minlength=n).unsqueeze(1).to(out.dtype)
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        return model(x)
