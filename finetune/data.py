"""Data loading and cleaning (DESIGN.md §1).

Layouts, detected from the path:
- image or text class folders: `<root>/<label>/*.jpg|*.txt`, optionally pre-split as
  `<root>/train/<label>/...` plus `<root>/{val,dev,test}/<label>/...`;
- a text table (CSV, TSV, JSONL, Parquet, or an extension-less file sniffed as one), or a
  folder holding `train.*` and `val.*` / `dev.*` / `test.*` tables.

Cleaning, counted in `Dataset.summary["cleaning"]`: exact duplicates (content hash), empty
texts, missing labels, images that do not decode (paths listed), validation items that also
appear in training, validation labels unknown to training.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data_spans import load_span_dataset, span_task
from finetune.errors import DataError
from tasks.common import resize_crop

IMAGE_TASK = "image-classification"
TEXT_TASK = "text-classification"

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLE_EXTS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "dev", "test", "eval")
TEXT_NAMES = ("text", "sentence", "content", "message", "sms", "review", "document", "body")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "sentiment", "intent", "y")
MIN_PER_CLASS = 2  # a stratified split needs two examples of every class
MAX_LISTED_FILES = 50  # undecodable files listed by path in the summary


@dataclass(frozen=True)
class ImagePrep:
    """How an image becomes a model input; stored in the checkpoint so serving matches."""

    resize: int  # shorter side after resizing, pixels
    crop: int  # centre crop, pixels (square)
    interpolation: str  # 'bilinear', 'bicubic' or 'nearest'


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
    val: Split
    summary: dict = field(default_factory=dict)


@dataclass
class _Record:
    item: Path | str  # image path, or the text itself
    label: str | None
    key: str = ""  # content hash


# --------------------------------------------------------------------------- layout


def detect_task(path: str | Path) -> str:
    """Tell the task by the layout and a sniff of the files (no decoding)."""
    path = Path(path)
    if path.exists():
        span = span_task(path)
        if span is not None:
            return span[0]
    return _locate(path)[1]


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _named(children: list[Path], names: tuple[str, ...], *, dirs: bool) -> Path | None:
    for name in names:
        for p in children:
            if dirs and p.is_dir() and p.name.lower() == name:
                return p
            if not dirs and p.is_file() and p.stem.lower() == name and _table_kind(p, "auto"):
                return p
    return None


def _locate(path: Path) -> tuple[str, str, Path, Path | None]:
    """Return (layout, task, train source, val source or None)."""
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    if path.is_file():
        return "table", TEXT_TASK, path, None
    children = _children(path)
    if not children:
        raise DataError(f"data folder '{path}' is empty")
    train_dir = _named(children, TRAIN_NAMES, dirs=True)
    if train_dir is not None:
        val_dir = _named(children, VAL_NAMES, dirs=True)
        return "class-folders", _class_folder_task(train_dir), train_dir, val_dir
    train_file = _named(children, TRAIN_NAMES, dirs=False)
    if train_file is not None:
        return "table", TEXT_TASK, train_file, _named(children, VAL_NAMES, dirs=False)
    if any(p.is_dir() for p in children):
        return "class-folders", _class_folder_task(path), path, None
    tables = [p for p in children if p.suffix.lower() in TABLE_EXTS]
    if len(tables) == 1:
        return "table", TEXT_TASK, tables[0], None
    raise DataError(
        f"cannot tell the layout of '{path}': expected class folders (<label>/*.jpg or "
        f"<label>/*.txt), one table file (.csv .tsv .jsonl .parquet), or train.* and val.* files"
    )


def _class_folder_task(root: Path) -> str:
    exts = Counter(
        f.suffix.lower() for d in _children(root) if d.is_dir() for f in d.iterdir() if f.is_file()
    )
    n_images = sum(n for ext, n in exts.items() if ext in IMAGE_EXTS)
    if n_images:
        return IMAGE_TASK
    if exts.get(".txt"):
        return TEXT_TASK
    raise DataError(f"no images or .txt files found in the class folders of '{root}'")


# --------------------------------------------------------------------------- reading


def _class_folder_records(root: Path, task: str) -> list[_Record]:
    records = []
    for label_dir in _children(root):
        if not label_dir.is_dir():
            continue
        for f in _children(label_dir):
            if not f.is_file():
                continue
            ext = f.suffix.lower()
            if task == IMAGE_TASK and ext in IMAGE_EXTS:
                records.append(_Record(f, label_dir.name))
            elif task == TEXT_TASK and ext == ".txt":
                records.append(
                    _Record(f.read_text(encoding="utf-8", errors="replace"), label_dir.name)
                )
    return records


def _table_kind(path: Path, data_format: str) -> str | None:
    if data_format != "auto":
        return data_format
    kind = TABLE_EXTS.get(path.suffix.lower())
    if kind or path.suffix:
        return kind
    with open(path, "rb") as f:  # extension-less file (e.g. SMSSpamCollection): sniff it
        head = f.read(4096).decode("utf-8", errors="replace")
    first = head.splitlines()[0] if head else ""
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in first else "csv"


def _read_table(path: Path, data_format: str):
    import pandas as pd

    kind = _table_kind(path, data_format)
    if kind is None:
        raise DataError(
            f"'{path}' is not a table file I can read; use .csv .tsv .jsonl or .parquet, "
            f"or pass --data-format"
        )
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        # TSV quoting is off: quotes appear inside texts (SMS Spam Collection, AG News).
        quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
        sep = "\t" if kind == "tsv" else ","
        df = pd.read_csv(
            path,
            sep=sep,
            header=None,
            dtype=str,
            keep_default_na=False,
            quoting=quoting,
            on_bad_lines="error",
            engine="python",
        )
    except DataError:
        raise
    except Exception as e:  # pandas raises many types; the user needs the file and the reason
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read '{path}' as {kind}: {reason}") from e
    if df.empty:
        return df
    # A header row either names a known column or holds values that never recur in their
    # column; a data row's label ("ham") recurs. CSV and TSV files come both ways.
    first = [str(v) for v in df.iloc[0]]
    known = any(v.strip().lower() in TEXT_NAMES + LABEL_NAMES for v in first)
    sample = df.iloc[1:1000]
    recurs = any(v in set(sample.iloc[:, i]) for i, v in enumerate(first))
    if known or not recurs:
        df.columns = [str(v).strip() for v in df.iloc[0]]
        df = df.iloc[1:].reset_index(drop=True)
    else:
        df.columns = [str(i) for i in range(df.shape[1])]
    return df


def _pick_columns(df, path: Path, text_column: str | None, label_column: str | None):
    cols = [str(c) for c in df.columns]
    df.columns = cols
    listed = ", ".join(cols)
    for given, what in ((text_column, "text"), (label_column, "label")):
        if given is not None and given not in cols:
            raise DataError(f"{what} column '{given}' not found in '{path}'; columns: {listed}")
    if len(cols) < 2:
        raise DataError(
            f"'{path}' has {len(cols)} column ({listed}); need a text and a label column"
        )

    def by_name(names):
        return next((c for c in cols if c.lower() in names), None)

    text = text_column or by_name(TEXT_NAMES)
    if text is None:
        lengths = {c: df[c].astype(str).str.len().mean() for c in cols if c != label_column}
        text = max(lengths, key=lengths.get)
    label = label_column or by_name(LABEL_NAMES)
    if label is None or label == text:
        rest = [c for c in cols if c != text]
        label = min(rest, key=lambda c: df[c].astype(str).nunique())
    return text, label


def _table_records(path: Path, cfg) -> tuple[list[_Record], str, str]:
    df = _read_table(path, cfg.data_format)
    if df.empty:
        raise DataError(f"'{path}' has no rows")
    text_col, label_col = _pick_columns(df, path, cfg.text_column, cfg.label_column)
    records = []
    for text, label in zip(df[text_col].tolist(), df[label_col].tolist(), strict=True):
        text = "" if _missing(text) else str(text)
        records.append(_Record(text, None if _missing(label) else str(label).strip()))
    return records, text_col, label_col


def _missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


# --------------------------------------------------------------------------- cleaning


def load_image(path: str | Path, prep: ImagePrep) -> np.ndarray:
    """Decode, resize the shorter side to `prep.resize`, centre-crop to `prep.crop`: uint8 HWC."""
    from PIL import Image

    with Image.open(path) as im:
        return resize_crop(im, prep.resize, prep.crop, prep.interpolation)


def _clean(records: list[_Record], counts: Counter, task: str) -> list[_Record]:
    """Drop empty texts, missing labels and exact duplicates; set each record's hash."""
    seen: dict[str, str | None] = {}
    kept = []
    for r in records:
        if r.label is None:
            counts["missing_label"] += 1
            continue
        if task == TEXT_TASK:
            r.item = str(r.item).strip()
            if not r.item:
                counts["empty_text"] += 1
                continue
            content = r.item.encode("utf-8")
        else:
            content = Path(r.item).read_bytes()
        r.key = hashlib.sha256(content).hexdigest()
        if r.key in seen:
            counts["duplicates"] += 1
            if seen[r.key] != r.label:
                counts["conflicting_labels"] += 1
            continue
        seen[r.key] = r.label
        kept.append(r)
    return kept


def _decode_images(records: list[_Record], prep: ImagePrep, undecodable: list[str]):
    kept, arrays = [], []
    for r in records:
        try:
            arrays.append(load_image(r.item, prep))
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            undecodable.append(str(r.item))
            continue
        kept.append(r)
    return kept, arrays


def _check_classes(records: list[_Record], where: str) -> None:
    per_class = Counter(r.label for r in records)
    if not per_class:
        raise DataError(f"no usable examples in '{where}' after cleaning")
    if len(per_class) < 2:
        only = next(iter(per_class))
        raise DataError(f"only one class ('{only}') in '{where}'; need at least 2 classes")
    small = sorted(c for c, n in per_class.items() if n < MIN_PER_CLASS)
    if small:
        raise DataError(
            f"class(es) {', '.join(repr(c) for c in small)} in '{where}' have fewer than "
            f"{MIN_PER_CLASS} examples; add examples or remove the class"
        )


def _stratified_split(records: list[_Record], fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    n_classes = len({r.label for r in records})
    n_val = max(n_classes, int(round(len(records) * fraction)))
    if len(records) - n_val < n_classes:
        raise DataError(
            f"{len(records)} examples are too few to split {n_classes} classes "
            f"with val_fraction={fraction}"
        )
    labels = [r.label for r in records]
    train, val = train_test_split(records, test_size=n_val, random_state=seed, stratify=labels)
    return train, val


def load_dataset(path: str | Path, cfg, image_prep: ImagePrep | None = None) -> Dataset:
    """Read, clean and split the data at `path` (`cfg` is a TrainConfig)."""
    path = Path(path)
    span = span_task(path) if path.exists() else None
    if span is not None:
        return load_span_dataset(path, span[0], span[1], cfg)
    layout, task, train_src, val_src = _locate(path)
    if task == IMAGE_TASK and image_prep is None:
        raise ValueError("image data needs an ImagePrep")
    counts: Counter = Counter()
    columns = {}

    def read(src: Path) -> list[_Record]:
        if layout == "class-folders":
            return _class_folder_records(src, task)
        recs, text_col, label_col = _table_records(src, cfg)
        columns.update(text_column=text_col, label_column=label_col)
        return recs

    train = _clean(read(train_src), counts, task)
    if val_src is not None:
        val = _clean(read(val_src), counts, task)
        train_keys = {r.key for r in train}
        before = len(val)
        val = [r for r in val if r.key not in train_keys]
        counts["leaked_from_train"] = before - len(val)
    undecodable: list[str] = []
    arrays = {}
    if task == IMAGE_TASK:
        train, arrays["train"] = _decode_images(train, image_prep, undecodable)
        if val_src is not None:
            val, arrays["val"] = _decode_images(val, image_prep, undecodable)
    _check_classes(train, str(train_src))
    if val_src is None:
        if task == IMAGE_TASK:
            for r, a in zip(train, arrays["train"], strict=True):
                r.item = a  # keep the decoded array with its record through the split
        train, val = _stratified_split(train, cfg.val_fraction, cfg.seed)
        if task == IMAGE_TASK:
            arrays = {"train": [r.item for r in train], "val": [r.item for r in val]}
    labels = sorted({r.label for r in train})
    index = {name: i for i, name in enumerate(labels)}
    unknown = [r for r in val if r.label not in index]
    if unknown:
        counts["unknown_val_label"] = len(unknown)
        keep = [r.label in index for r in val]
        val = [r for r, k in zip(val, keep, strict=True) if k]
        if task == IMAGE_TASK:
            arrays["val"] = [a for a, k in zip(arrays["val"], keep, strict=True) if k]
    if not val:
        raise DataError(f"no usable validation examples in '{val_src or path}' after cleaning")

    def split(records, key) -> Split:
        y = np.array([index[r.label] for r in records], dtype=np.int64)
        if task == IMAGE_TASK:
            return Split(np.stack(arrays[key]).astype(np.uint8), y)
        return Split([str(r.item) for r in records], y)

    cleaning = {
        k: int(counts[k])
        for k in (
            "duplicates",
            "conflicting_labels",
            "empty_text",
            "missing_label",
            "leaked_from_train",
            "unknown_val_label",
        )
    }
    cleaning["undecodable"] = len(undecodable)
    cleaning["undecodable_files"] = undecodable[:MAX_LISTED_FILES]
    ds = Dataset(task, labels, split(train, "train"), split(val, "val"))
    ds.summary = {
        "path": str(path),
        "layout": layout,
        "pre_split": val_src is not None,
        **columns,
        "train_size": len(ds.train),
        "val_size": len(ds.val),
        "train_per_class": {
            labels[i]: int(n)
            for i, n in enumerate(np.bincount(ds.train.labels, minlength=len(labels)))
        },
        "val_per_class": {
            labels[i]: int(n)
            for i, n in enumerate(np.bincount(ds.val.labels, minlength=len(labels)))
        },
        "cleaning": cleaning,
    }
    return ds


def describe(summary: dict) -> str:
    """Human summary of sizes and cleaning counts, a few lines."""
    c = summary["cleaning"]
    lines = [
        f"data: {summary['path']} ({summary['layout']}, "
        f"{'pre-split' if summary['pre_split'] else 'stratified split'}): "
        f"{summary['train_size']} train, {summary['val_size']} val, "
        f"{len(summary['train_per_class'])} {summary.get('counted', 'classes')}",
        "cleaning: "
        + ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in c if k != "undecodable_files"),
    ]
    lines += [f"  skipped undecodable image: {p}" for p in c["undecodable_files"]]
    return "\n".join(lines)
