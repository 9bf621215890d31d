"""The training configuration: one frozen dataclass, mirrored one to one by the CLI flags."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

STRATEGIES = ("auto", "feature-extraction", "full", "gradual")
# Sizes when not set: classifiers' (head and backbone start trained), and the dense models'
# batch (their optimizer steps are sized per model: ModelSpec.train_steps, for_steps)
DEFAULT_EPOCHS, DEFAULT_PATIENCE, DEFAULT_BATCH, DENSE_BATCH, MAX_EPOCHS = 10, 3, 32, 8, 300
SCHEDULES = ("linear", "cosine", "constant")  # after warm-up (finetune/train/optim.py)
MONITORS = (
    "auto",
    "val_macro_f1",
    "val_accuracy",
    "val_loss",
    "val_entity_f1",
    "val_exact_match",
    "val_f1",
    "val_map50",
    "val_map",
    "val_miou",
    "val_pixel_accuracy",
    "val_roc_auc",
    "val_pr_auc",
    "val_wer",  # speech recognition: lower is better (train/loop.py)
    "val_cer",
)


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "auto"  # registry name, HF hub id or local HF dir; auto: by the data
    weights: str = "pretrained"  # 'pretrained', 'random' (tests only) or a local file/directory
    strategy: str = "auto"  # auto (probe vs full, measured), feature-extraction, full, gradual
    epochs: int | None = None  # 0: no training (generative tasks: the pretrained model as is);
    # else the upper bound of a training phase (early stopping usually ends
    # sooner); None: 10, or for detection and segmentation the model's optimizer steps
    batch_size: int | None = None  # samples per forward pass (x grad_accum per optimizer
    # step); None: 32, or 8 for detection and segmentation
    grad_accum: int = 1  # batches whose gradients add up to one optimizer step
    lr: float = 1e-3  # head learning rate (AdamW)
    backbone_lr: float | None = None  # top backbone group's rate; None = lr / 10
    layer_decay: float | None = None  # rate ratio per group downwards; None: 0.8 text, 1 images
    schedule: str = "auto"  # auto (linear for text, cosine for images), linear, cosine, constant
    warmup: float = 0.1  # share of a phase's optimizer steps with a rising learning rate
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); 0 = off
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases and norms)
    dropout: float = 0.1  # dropout before the new head
    label_smoothing: float | None = None  # cross-entropy smoothing; None: 0.1 images, 0 text
    class_weighting: str = "none"  # 'none' or 'balanced' (inverse class frequency in the loss)
    patience: int | None = None  # epochs without improvement of `monitor` before stopping;
    # None: 3, or a quarter of the epochs for detection and segmentation (at least 5)
    monitor: str = "auto"  # auto (the task's: val_macro_f1, val_entity_f1, val_f1), val_loss...
    min_delta: float = 0.0  # smallest change of `monitor` that counts as an improvement
    val_fraction: float = 0.15  # share of the training data carved for validation if not given
    test_fraction: float = 0.15  # share of the training data carved for test if not given
    seed: int = 0  # python, numpy and torch seeds, and the split
    image_size: int | None = None  # crop size in pixels; None = the backbone's own (224 mostly);
    # detection and segmentation: the letterboxed square input (None = 320 and 384)
    ignore_index: int = 255  # segmentation: the mask value of void pixels (not scored)
    categorical: str | None = None  # tables: comma-separated columns to treat as categories
    target_precision: float | None = None  # tables, two classes: threshold for this precision
    # on validation (None: the best F1)
    init_from: str | None = None  # tables: continue training the trees of this earlier run
    clip_seconds: float | None = None  # audio: the model's input window in seconds (longer
    # clips are cut); None = the longest clip of the data, rounded up to 0.1 s, at most 30
    max_length: int = 128  # tokens per window (texts longer than this are read in windows)
    max_windows: int = 8  # text classification: windows read per text, their logits averaged
    stride: int = 0  # entities, answers: tokens shared by consecutive windows; 0 = max_length/4
    max_answer_length: int = 30  # question answering: the longest answer, in tokens
    max_text_chars: int = 0  # entities, answers: characters per text the model takes (its
    # served limit, in the card); 0 = the longest text of the data, at least 20,000
    augment: bool | None = None  # images: random crop + flip; None: when the backbone trains
    cache_features: bool = True  # feature-extraction without augmentation: run the backbone once
    # export's paired int8 gate needs about 800 items to bound a drop within 1 point with 95%
    # confidence (export/gate.py); images and clips are stored whole, so fewer of them (the
    # 2000 also holds for table rows, the 256 for audio clips)
    holdout_size: int | None = None  # test samples for export's gates; None: 2000 texts, 256 images
    budget_minutes: float = 120.0  # auto: wall time it may spend; later epochs are not run
    text_column: str | None = None  # None = guessed (by name, else the longest strings)
    label_column: str | None = None  # None = guessed (by name, else the fewest distinct values)
    data_format: str = "auto"  # auto, csv, tsv, jsonl, parquet
    device: str = "auto"  # auto (cuda when usable), cpu, cuda
    num_workers: int = 0  # DataLoader workers; data sets here are small and held in memory

    def for_family(self, images: bool, dense: bool = False) -> TrainConfig:
        """The per-family defaults filled in (stored resolved, so a resume repeats them):
        BERT-style linear decay and layer-wise rates for text, cosine decay and label
        smoothing for images (timm's recipes). Dense models size epochs and patience once
        their data is read (`for_steps`)."""
        sizes = {"batch_size": DENSE_BATCH if dense else DEFAULT_BATCH}
        if not dense:
            sizes |= {"epochs": DEFAULT_EPOCHS, "patience": DEFAULT_PATIENCE}
        return dataclasses.replace(
            self,
            **{k: v for k, v in sizes.items() if getattr(self, k) is None},
            schedule=("cosine" if images else "linear")
            if self.schedule == "auto"
            else self.schedule,
            layer_decay=(1.0 if images else 0.8) if self.layer_decay is None else self.layer_decay,
            label_smoothing=(0.1 if images else 0.0)
            if self.label_smoothing is None
            else self.label_smoothing,
        )

    def for_steps(self, steps: int, train_items: int) -> tuple[TrainConfig, str | None]:
        """Epochs and patience sized so that training spans `steps` optimizer steps on
        `train_items` (dense heads start untrained and need hundreds of steps, however few
        the images), and why; what the user set is kept."""
        per_epoch = max(1, math.ceil(train_items / (self.batch_size * self.grad_accum)))
        epochs = self.epochs
        if epochs is None:
            epochs = min(MAX_EPOCHS, max(DEFAULT_EPOCHS, math.ceil(steps / per_epoch)))
        patience = self.patience if self.patience is not None else max(5, math.ceil(epochs / 4))
        why = None
        if self.epochs is None or self.patience is None:
            why = (
                f"{epochs} epochs of {per_epoch} optimizer steps (~{steps} steps: {train_items} "
                f"images in batches of {self.batch_size}), patience {patience}"
            )
        return dataclasses.replace(self, epochs=epochs, patience=patience), why

    def holdout_for(self, heavy_inputs: bool) -> int:
        """Test samples kept in holdout.npz (`holdout_size`, or its default by input kind)."""
        return self.holdout_size or (256 if heavy_inputs else 2000)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's trailing comment, the CLI's help text (one source for both)."""
        import inspect
        import re

        src = inspect.getsource(cls)
        return dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.+)$", src, flags=re.M))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def problems(self) -> list[str]:
        """Every invalid field at once, one line each."""
        out = []
        if self.strategy not in STRATEGIES:
            out.append(f"strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if self.monitor not in MONITORS:
            out.append(f"monitor {self.monitor!r} is unknown; use one of {', '.join(MONITORS)}")
        if self.class_weighting not in ("none", "balanced"):
            out.append(f"class_weighting {self.class_weighting!r} must be 'none' or 'balanced'")
        for name, least in (("epochs", 0), ("batch_size", 1)):  # epochs 0: zero-shot (run.py)
            value = getattr(self, name)
            if value is not None and value < least:
                out.append(f"{name} must be >= {least}, got {value}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                out.append(f"{name} must be between 0 and 0.5, got {getattr(self, name)}")
        if self.schedule not in ("auto", *SCHEDULES):
            out.append(f"schedule {self.schedule!r} must be auto, {', '.join(SCHEDULES)}")
        if self.grad_accum < 1:
            out.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.warmup < 1.0:
            out.append(f"warmup must be in [0, 1), got {self.warmup}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            out.append(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            out.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_grad_norm < 0 or self.budget_minutes <= 0:
            out.append("max_grad_norm must be >= 0 and budget_minutes > 0")
        if self.lr <= 0 or (self.backbone_lr is not None and self.backbone_lr <= 0):
            out.append("learning rates must be > 0")
        if self.patience is not None and self.patience < 1:
            out.append(f"patience must be >= 1, got {self.patience}")
        if self.image_size is not None and self.image_size < 16:
            out.append(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.clip_seconds is not None and not 0.1 <= self.clip_seconds <= 30:
            out.append(
                f"clip_seconds must be from 0.1 to 30 s (Whisper's), got {self.clip_seconds}"
            )
        if self.max_windows < 1:
            out.append(f"max_windows must be >= 1, got {self.max_windows}")
        if self.max_length < 8:
            out.append(f"max_length must be >= 8 tokens, got {self.max_length}")
        elif not 0 <= self.stride <= self.max_length // 2:
            # the tokenizer panics once the overlap reaches a window's room for text
            out.append(
                f"stride must be from 0 to max_length / 2 = {self.max_length // 2} tokens "
                f"(consecutive windows share it), got {self.stride}"
            )
        if self.max_text_chars < 0:
            out.append(
                f"max_text_chars must be >= 0 (0: the data's longest), got {self.max_text_chars}"
            )
        if self.data_format not in ("auto", "csv", "tsv", "jsonl", "parquet"):
            out.append(f"data_format {self.data_format!r} must be auto, csv, tsv, jsonl or parquet")
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(f"device {self.device!r} must be auto, cpu or cuda")
        return out
