"""The training configuration: one frozen dataclass, mirrored one to one by the CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STRATEGIES = ("feature-extraction", "full", "gradual")
AUTO_BACKBONES = {"image-classification": "efficientnet_lite0", "text-classification": "minilm"}
MONITORS = (
    "auto",
    "val_macro_f1",
    "val_accuracy",
    "val_loss",
    "val_entity_f1",
    "val_exact_match",
    "val_f1",
)


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "auto"  # registry name, HF hub id or local HF dir; auto: by the data
    weights: str = "pretrained"  # 'pretrained', 'random' (tests only) or a local file/directory
    strategy: str = "feature-extraction"  # feature-extraction, full or gradual
    epochs: int = 10  # upper bound; early stopping usually ends sooner
    batch_size: int = 32  # samples per optimizer step
    lr: float = 1e-3  # head learning rate (AdamW)
    backbone_lr: float | None = None  # full/gradual: backbone rate; None = lr / 10 (discriminative)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    dropout: float = 0.1  # dropout before the new head
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_weighting: str = "none"  # 'none' or 'balanced' (inverse class frequency in the loss)
    patience: int = 3  # epochs without improvement of `monitor` before stopping
    monitor: str = "auto"  # auto (the task's: val_macro_f1, val_entity_f1, val_f1), val_loss...
    min_delta: float = 0.0  # smallest change of `monitor` that counts as an improvement
    val_fraction: float = 0.2  # share of data held out for validation when not pre-split
    seed: int = 0  # python, numpy and torch seeds, and the split
    image_size: int | None = None  # crop size in pixels; None = the backbone's own (224 mostly)
    max_length: int = 128  # tokens per text (per window for entities and answers)
    stride: int = 0  # entities, answers: tokens shared by consecutive windows; 0 = max_length/4
    max_answer_length: int = 30  # question answering: the longest answer, in tokens
    augment: bool = False  # images: random resized crop + flip (disables the feature cache)
    cache_features: bool = True  # feature-extraction without augmentation: run the backbone once
    holdout_size: int = 256  # validation samples kept in holdout.npz for export
    text_column: str | None = None  # None = guessed (by name, else the longest strings)
    label_column: str | None = None  # None = guessed (by name, else the fewest distinct values)
    data_format: str = "auto"  # auto, csv, tsv, jsonl, parquet
    device: str = "auto"  # auto (cuda when usable), cpu, cuda
    num_workers: int = 0  # DataLoader workers; data sets here are small and held in memory

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
        if self.epochs < 1:
            out.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            out.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            out.append(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.lr <= 0 or (self.backbone_lr is not None and self.backbone_lr <= 0):
            out.append("learning rates must be > 0")
        if self.patience < 1:
            out.append(f"patience must be >= 1, got {self.patience}")
        if self.image_size is not None and self.image_size < 16:
            out.append(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.max_length < 8:
            out.append(f"max_length must be >= 8 tokens, got {self.max_length}")
        if self.data_format not in ("auto", "csv", "tsv", "jsonl", "parquet"):
            out.append(f"data_format {self.data_format!r} must be auto, csv, tsv, jsonl or parquet")
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(f"device {self.device!r} must be auto, cpu or cuda")
        return out
