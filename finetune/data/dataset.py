"""What every data format loads into: a `Dataset` of three `Split`s (train, val, test) with its
labels and a summary of sizes and cleaning counts (DESIGN.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from finetune.data.splits import ROLES

MAX_LISTED_FILES = 50  # undecodable files listed by path in the summary


@dataclass(frozen=True)
class ImagePrep:
    """How an image becomes a model input; stored in the checkpoint so serving matches."""

    resize: int  # shorter side after resizing, pixels
    crop: int  # centre crop, pixels (square)
    interpolation: str  # 'bilinear', 'bicubic' or 'nearest'


@dataclass
class Record:
    """One labelled example while it is read and cleaned."""

    item: object  # image path then its uint8 array, the text itself, or audio (file, base64)
    label: str | None
    key: str = ""  # content hash
    seconds: float = 0.0  # audio: the clip's duration


@dataclass
class Split:
    inputs: np.ndarray | list[str]  # images: uint8 [N, crop, crop, 3]; text: strings
    labels: np.ndarray  # int64 indices into Dataset.labels (zeros for span tasks)
    targets: list[dict] | None = None  # span tasks: each input's gold (tags, answers)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    task: str
    labels: list[str]
    train: Split
    val: Split  # model selection and early stopping
    test: Split  # never seen by selection: holdout, export gates, test_* figures
    summary: dict = field(default_factory=dict)


def split_summary(sources: dict, ds: Dataset, labels: list[str] | None) -> dict:
    """Where each split came from ("given" by the data or "carved" from training), its size
    and, for classification, its examples per class."""
    out = {
        "pre_split": "val" in sources,
        "splits": {role: "given" if role in sources else "carved" for role in ROLES},
    }
    for role in ROLES:
        part = getattr(ds, role)
        out[f"{role}_size"] = len(part)
        if labels is not None:
            out[f"{role}_per_class"] = {
                labels[i]: int(n)
                for i, n in enumerate(np.bincount(part.labels, minlength=len(labels)))
            }
    return out


def describe(summary: dict) -> str:
    """Human summary of sizes and cleaning counts, a few lines."""
    c = summary["cleaning"]
    splits = summary.get("splits", {})
    sizes = ", ".join(
        f"{summary.get(f'{role}_size', 0)} {role}"
        + (" (carved)" if splits.get(role) == "carved" and role != "train" else "")
        for role in ("train", "val", "test")
    )
    per_class, counted = summary["train_per_class"], summary.get("counted", "classes")
    classes = f"{len(per_class)} class" + ("" if len(per_class) == 1 else "es")
    if "speakers" in summary:  # transcribed speech: speakers per split, by speaker or clip
        n = summary["speakers"]
        classes = (
            f"speakers {n['train']} / {n['val']} / {n['test']}, split by {summary['split_by']}"
        )
    elif counted != "classes":  # detection, segmentation: boxes or pixels per class
        classes += f" ({sum(per_class.values()):,} {counted} in train)"
    lines = [
        f"data: {summary['path']} ({summary['layout']}): {sizes}, {classes}",
        "cleaning: "
        + ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in c if k != "undecodable_files"),
    ]
    lines += [f"  skipped undecodable file: {p}" for p in c["undecodable_files"]]
    return "\n".join(lines)
