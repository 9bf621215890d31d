"""Classification in the shared loop: images, texts and audio clips, one label each.

Batches come from memory; with a frozen backbone and no augmentation the backbone runs once
per split and the head trains on the cached features; evaluation is accuracy, macro-F1 and
the confusion matrix. The three recipes differ in how an input becomes features:
`ImageClassification` (resize, crop and normalise; small images keep a small input),
`TextClassification` (the tokenizer as export and the service configure it; long texts in
windows) and `AudioClassification` (Whisper log-mel features through the task contract).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tasks
from finetune import models
from finetune.data import Dataset, median_image_side
from finetune.models import Classifier
from finetune.progress import progress
from finetune.recipes.base import EVAL_BATCH, EncoderRecipe, Setup
from finetune.recipes.inputs import AudioSet, ImageSet, Inputs, TextSet
from tasks.metrics import classification_metrics

SMALLEST_INPUT = 96  # pixels: 3x3 cells after the 32x downsampling of the CNN backbones


class ClassifierRecipe(EncoderRecipe):
    """Image, text and audio classification: a linear head on the pooled features."""

    head_type = Classifier
    curve_scores = ()  # report/curves.png: its default, validation accuracy and macro-F1

    def __init__(self, run: Setup, device: torch.device, log=print):
        super().__init__(run, device, log)
        model, ds, cfg = self.model, self.ds, self.cfg
        self.inputs = self.make_inputs(run, device)
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.head_only = nn.Sequential(model.dropout, model.head)
        self.feature_inputs = Inputs("features", device)  # cached features: already pooled
        self.loaders: dict[str, DataLoader] = {}
        self.audio: dict[str, AudioSet] = {}
        weight = None
        if cfg.class_weighting == "balanced":
            counts = np.bincount(ds.train.labels, minlength=len(ds.labels)).astype(np.float64)
            weight = torch.tensor(
                len(ds.train) / (len(ds.labels) * counts), dtype=torch.float32, device=device
            )
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

    def make_inputs(self, run: Setup, device: torch.device) -> Inputs:
        return Inputs(run.ds.task, device)

    def cached(self, strategy: str) -> bool:
        return (
            strategy == "feature-extraction"
            and self.cfg.cache_features
            and not self.augment(strategy)
        )

    def augment(self, strategy: str) -> bool:
        """Augment images: as asked, or by default whenever the backbone trains (a frozen
        backbone's features are cached instead: timm's and torchvision's fine-tuning recipes
        augment; a linear probe on cached features does not)."""
        if self.cfg.augment is not None:
            return self.cfg.augment
        return self.images and strategy != "feature-extraction"

    def module(self, strategy: str) -> nn.Module:
        """The module that trains under `strategy`; `self.feed` turns its batches into inputs."""
        cached = self.cached(strategy)
        self.feed = self.feature_inputs if cached else self.inputs
        return self.head_only if cached else self.model

    def _set(self, split: str, augment: bool):
        part = getattr(self.ds, split)
        return TextSet(part.inputs, part.labels)

    def _plain_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._set(split, False),
            batch_size=EVAL_BATCH,
            collate_fn=self.inputs.collate,
            num_workers=self.cfg.num_workers,
        )

    def _cache(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen backbone's features of `split`, computed once (test only if asked)."""
        if split not in self.features:
            t0 = time.perf_counter()
            encoder = self.model.backbone.eval()
            feats, labels = [], []
            with torch.no_grad():
                for x, y in progress(self._plain_loader(split), f"caching {split} features"):
                    with torch.autocast(
                        self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"
                    ):
                        feats.append(self.inputs(encoder, x).float().cpu())
                    labels.append(y)
            self.features[split] = (torch.cat(feats), torch.cat(labels))
            self.cache_seconds = (self.cache_seconds or 0.0) + time.perf_counter() - t0
        return self.features[split]

    def train_loader(self, strategy: str, dist) -> DataLoader:
        key = "cached" if self.cached(strategy) else f"raw-{self.augment(strategy)}"
        if key not in self.loaders:
            if key == "cached":
                self.loaders[key] = self._loader(TensorDataset(*self._cache("train")), dist)
            else:
                self.loaders[key] = self._loader(
                    self._set("train", self.augment(strategy)),
                    dist,
                    collate_fn=self.inputs.collate,
                    num_workers=self.cfg.num_workers,
                    pin_memory=self.device.type == "cuda",
                )
        return self.loaders[key]

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        y = y.to(self.device, non_blocking=True)
        return self.criterion(self.feed(module, x).float(), y), len(y)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        module = self.module(strategy)
        module.eval()
        if self.cached(strategy):
            feats, labels = self._cache(split)
            batches = [
                (feats[s : s + 256], labels[s : s + 256]) for s in range(0, len(labels), 256)
            ]
        else:
            batches = self._plain_loader(split)
        losses, preds, truth = 0.0, [], []
        for x, y in batches:
            with torch.autocast(
                self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"
            ):
                logits = self.feed(module, x).float()
            y = y.to(logits.device)
            losses += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
            truth.append(y.cpu())
        y_true, y_pred = torch.cat(truth).numpy(), torch.cat(preds).numpy()
        m = classification_metrics(y_true, y_pred, self.ds.labels)
        return {
            "loss": losses / len(y_true),
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "per_class": m["per_class"],
            "confusion_matrix": m["confusion_matrix"],
            "correct": (y_true == y_pred).tolist(),  # auto's paired comparison; not saved
        }


class ImageClassification(ClassifierRecipe):
    images = True

    @classmethod
    def prepare(cls, cfg, spec, data, log):
        """The input size (the backbone's own, or smaller for small images) and the
        backbone's resize, crop and normalisation."""
        if cfg.image_size is None:
            size = _image_size(data, spec, log)
            cfg = dataclasses.replace(cfg, image_size=size)
            if size is not None and cfg.augment is None:
                # Small images are scans, glyphs and icons, where a flip or a crop changes
                # the class (a mirrored 3 is no 3): digits' fine-tune reached 0.952 with
                # augmentation after 3 epochs, 0.989 without. Photographs keep it.
                cfg = dataclasses.replace(cfg, augment=False)
                log("small images: no augmentation (a flip or a crop may change their class)")
        prep, mean, std = models.image_prep(spec, cfg.image_size)
        return cfg, {"prep": prep, "mean": mean, "std": std}

    @classmethod
    def preprocessing(cls, run: Setup, encoder) -> dict:
        prep = run.extra["prep"]
        return {
            "resize": prep.resize,
            "crop_size": prep.crop,
            "interpolation": prep.interpolation,
            "mean": list(run.extra["mean"]),
            "std": list(run.extra["std"]),
            "scale": 1 / 255,
            "channels": "RGB",
            "layout": "NCHW",
            "resize_mode": "shorter-side, then centre crop",
        }

    def make_inputs(self, run: Setup, device: torch.device) -> Inputs:
        return Inputs(run.ds.task, device, run.extra["mean"], run.extra["std"])

    def _set(self, split: str, augment: bool):
        part = getattr(self.ds, split)
        return ImageSet(part.inputs, part.labels, augment)


class TextClassification(ClassifierRecipe):
    @classmethod
    def windows(cls, cfg) -> dict:
        """Long texts: read in up to `max_windows` windows whose logits are averaged."""
        if cfg.max_windows <= 1:
            return {}
        stride = cfg.stride if cfg.stride else cfg.max_length // 4
        return {"stride": stride, "windows": cfg.max_windows, "combine": "mean"}

    def make_inputs(self, run: Setup, device: torch.device) -> Inputs:
        # Texts are tokenized as export and the service will: from the stored preprocessing.
        pre = run.config["preprocessing"]
        return Inputs(run.ds.task, device, None, None, run.tokenizer, self.cfg.max_length, pre)


class AudioClassification(ClassifierRecipe):
    @classmethod
    def loaded(cls, cfg, ds: Dataset, log):
        """The audio window: as asked, or the longest clip rounded up to 0.1 s (Whisper's
        encoder then reads that many frames instead of 30 s of mostly padding)."""
        if cfg.clip_seconds is not None:
            return dataclasses.replace(cfg, clip_seconds=float(cfg.clip_seconds))
        longest = ds.summary["clip_seconds"]["max"]
        window = min(30.0, max(0.1, math.ceil(longest * 10 - 1e-6) / 10))
        log(f"audio window {window:.1f} s (the longest clip is {longest:.2f} s)")
        return dataclasses.replace(cfg, clip_seconds=window)

    @classmethod
    def preprocessing(cls, run: Setup, encoder) -> dict:
        from tasks.audio import HOP, N_FFT, SAMPLE_RATE

        return {
            "sample_rate": SAMPLE_RATE,
            "n_mels": int(encoder.encoder.config.num_mel_bins),
            "n_fft": N_FFT,
            "hop_length": HOP,
            "clip_seconds": run.cfg.clip_seconds,
            "features": "whisper log-mel (log10, floored 8 below the maximum, (x + 4) / 4)",
            "input_names": ["input_features", "attention_mask"],
        }

    def make_inputs(self, run: Setup, device: torch.device) -> Inputs:
        inputs = Inputs(run.ds.task, device)
        inputs.contract = tasks.create(run.config)  # clips become log-mel features
        return inputs

    def _set(self, split: str, augment: bool):
        """Features once per split (no audio augmentation)."""
        if split not in self.audio:
            part = getattr(self.ds, split)
            self.audio[split] = AudioSet(part.inputs, part.labels, self.inputs.contract)
        return self.audio[split]


def _image_size(data, spec, log) -> int | None:
    """The backbone's own input size, or a smaller one when the images are much smaller
    (8x8 digits gain nothing from 224 pixels but cost 5x the compute): the median shorter
    side rounded up to a multiple of 32, at least SMALLEST_INPUT."""
    own = models.image_prep(spec, None)[0].crop
    side = median_image_side(data)
    if side is None or side >= own:
        return None
    size = max(SMALLEST_INPUT, -(-side // 32) * 32)
    if size >= own:
        return None
    log(f"images are small (median side {side} px): input size {size} instead of {own}")
    return size
