"""Data loading and cleaning (DESIGN.md §1).

Layouts, detected from the path:
- image, audio or text class folders: `<root>/<label>/*.jpg|*.wav|*.txt`, optionally
  pre-split as `<root>/train/<label>/...` plus `<root>/{val,dev}/<label>/...` and
  `<root>/test/<label>/...`;
- a text table (CSV, TSV, JSONL, Parquet, or an extension-less file sniffed as one), or a
  folder holding `train.*` and `val.*` / `dev.*` and / or `test.*` tables.

Splits (finetune/splits.py): train, val (selection) and test (never seen by selection); the
ones the data gives are used as given, the others carved from training.

Cleaning, counted in `Dataset.summary["cleaning"]`: exact duplicates (content hash), empty
texts, missing labels, images that do not decode (paths listed), validation or test items
that also appear in training (and test items in validation), labels unknown to training.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data_spans import load_span_dataset, span_task
from finetune.errors import DataError
from finetune.splits import ROLES, three_way
from tasks.audio import AUDIO_EXTS
from tasks.common import resize_crop
from tasks.errors import InputError

IMAGE_TASK = "image-classification"
TEXT_TASK = "text-classification"
AUDIO_TASK = "audio-classification"
MAX_CLIP_SECONDS = 30.0  # Whisper's window: longer clips are dropped as over-long

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
VAL_NAMES = ("val", "valid", "validation", "dev", "eval")
TEST_NAMES = ("test", "testing", "holdout")
TEXT_NAMES = ("text", "sentence", "content", "message", "sms", "review", "document", "body")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "sentiment", "intent", "y")
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
    val: Split  # model selection and early stopping
    test: Split  # never seen by selection: holdout, export gates, test_* figures
    summary: dict = field(default_factory=dict)


@dataclass
class _Record:
    item: Path | str  # image path, or the text itself (audio: the file, base64)
    label: str | None
    key: str = ""  # content hash
    seconds: float = 0.0  # audio: the clip's duration


# --------------------------------------------------------------------------- layout


def detect_task(path: str | Path) -> str:
    """Tell the task by the layout and a sniff of the files (no decoding)."""
    from finetune.data_vision import vision_task

    path = Path(path)
    if path.exists():
        span = span_task(path)
        if span is not None:
            return span[0]
        dense = vision_task(path)
        if dense is not None:
            return dense
        from finetune.data_tabular import TASK, is_tabular

        if is_tabular(path):
            return TASK
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


def _locate(path: Path) -> tuple[str, str, dict[str, Path]]:
    """Return (layout, task, {"train": source, and "val" / "test" where the data has them})."""
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    if path.is_file():
        return "table", TEXT_TASK, {"train": path}
    children = _children(path)
    if not children:
        raise DataError(f"data folder '{path}' is empty")

    def given(dirs: bool) -> dict[str, Path]:
        found = {
            role: _named(children, names, dirs=dirs)
            for role, names in (("train", TRAIN_NAMES), ("val", VAL_NAMES), ("test", TEST_NAMES))
        }
        return {role: p for role, p in found.items() if p is not None}

    folders = given(dirs=True)
    if "train" in folders:
        return "class-folders", _class_folder_task(folders["train"]), folders
    files = given(dirs=False)
    if "train" in files:
        return "table", TEXT_TASK, files
    if any(p.is_dir() for p in children):
        return "class-folders", _class_folder_task(path), {"train": path}
    tables = [p for p in children if p.suffix.lower() in TABLE_EXTS]
    if len(tables) == 1:
        return "table", TEXT_TASK, {"train": tables[0]}
    raise DataError(
        f"cannot tell the layout of '{path}': expected class folders (<label>/*.jpg or "
        f"<label>/*.txt), one table file (.csv .tsv .jsonl .parquet), or train.* and val.* files"
    )


def median_image_side(path: str | Path, sample: int = 200) -> int | None:
    """The median shorter side of up to `sample` training images, read from their headers
    (no decoding); None when the data is not image folders or nothing opens."""
    from PIL import Image

    layout, task, sources = _locate(Path(path))
    if task != IMAGE_TASK:
        return None
    files = sorted(f for f in sources["train"].rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    step = max(1, len(files) // sample)
    sides = []
    for f in files[::step][:sample]:
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except Exception:  # counted later by the cleaning; a size sniff skips it
            continue
    return int(np.median(sides)) if sides else None


def _class_folder_task(root: Path) -> str:
    exts = Counter(
        f.suffix.lower() for d in _children(root) if d.is_dir() for f in d.iterdir() if f.is_file()
    )
    n_images = sum(n for ext, n in exts.items() if ext in IMAGE_EXTS)
    if n_images:
        return IMAGE_TASK
    if sum(n for ext, n in exts.items() if ext in AUDIO_EXTS):
        return AUDIO_TASK
    if exts.get(".txt"):
        return TEXT_TASK
    raise DataError(
        f"no images, audio ({', '.join(AUDIO_EXTS)}) or .txt files found in the class "
        f"folders of '{root}'"
    )


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
            if (task == IMAGE_TASK and ext in IMAGE_EXTS) or (
                task == AUDIO_TASK and ext in AUDIO_EXTS
            ):
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
    """The records whose image decodes, each now holding its uint8 array as `item`."""
    kept = []
    for r in records:
        try:
            r.item = load_image(r.item, prep)
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            undecodable.append(str(r.item))
            continue
        kept.append(r)
    return kept


def _decode_audio(records: list[_Record], cfg, counts: Counter, undecodable: list[str]):
    """The records whose audio decodes, each now holding the file as base64 (what a client
    sends; the holdout keeps it so export and benchmarks replay the served path) and its
    duration. Counts empty or silent clips and over-long ones (dropped), and clips longer
    than an asked --clip-seconds (kept: the window cuts them)."""
    from tasks.audio import SAMPLE_RATE, read_audio

    kept = []
    limit = MAX_CLIP_SECONDS if cfg.clip_seconds is None else max(cfg.clip_seconds, 0.1)
    for r in records:
        data = Path(r.item).read_bytes()
        try:
            wave = read_audio(data, math.inf)
        except InputError as e:
            if e.reason == "empty_audio":
                counts["empty_audio"] += 1
            else:
                undecodable.append(str(r.item))
            continue
        seconds = len(wave) / SAMPLE_RATE
        if not np.any(wave):
            counts["empty_audio"] += 1
            continue
        if seconds > limit and cfg.clip_seconds is None:
            counts["over_long"] += 1
            continue
        counts["cut_to_window"] += int(seconds > limit)
        r.item, r.seconds = base64.b64encode(data).decode(), seconds
        kept.append(r)
    return kept


def _check_classes(records: list[_Record], where: str, minimum: int) -> None:
    per_class = Counter(r.label for r in records)
    if not per_class:
        raise DataError(f"no usable examples in '{where}' after cleaning")
    if len(per_class) < 2:
        only = next(iter(per_class))
        raise DataError(f"only one class ('{only}') in '{where}'; need at least 2 classes")
    small = sorted(c for c, n in per_class.items() if n < minimum)
    if small:
        raise DataError(
            f"class(es) {', '.join(repr(c) for c in small)} in '{where}' have fewer than "
            f"{minimum} examples (one for training and one per split carved from it); "
            f"add examples or remove the class"
        )


def load_dataset(path: str | Path, cfg, image_prep: ImagePrep | None = None) -> Dataset:
    """Read, clean and split the data at `path` into train, val and test (`cfg` is a
    TrainConfig; finetune/splits.py says how missing splits are carved)."""
    from finetune.data_vision import load_vision_dataset, vision_task

    path = Path(path)
    span = span_task(path) if path.exists() else None
    if span is not None:
        return load_span_dataset(path, span[0], span[1], cfg)
    dense = vision_task(path) if path.exists() else None
    if dense is not None:
        return load_vision_dataset(path, dense, cfg)
    layout, task, sources = _locate(path)
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

    parts = {role: _clean(read(src), counts, task) for role, src in sources.items()}
    undecodable: list[str] = []
    if task == IMAGE_TASK:  # the decoded array travels with its record through the split
        parts = {
            role: _decode_images(recs, image_prep, undecodable) for role, recs in parts.items()
        }
    if task == AUDIO_TASK:
        parts = {
            role: _decode_audio(recs, cfg, counts, undecodable) for role, recs in parts.items()
        }
        seconds = [r.seconds for recs in parts.values() for r in recs]
        if seconds:
            columns["clip_seconds"] = {
                "median": round(float(np.median(seconds)), 3),
                "max": round(float(np.max(seconds)), 3),
            }
    _check_classes(parts["train"], str(sources["train"]), 1 + len(set(ROLES) - set(parts)))
    parts = three_way(
        parts,
        cfg,
        str(path),
        key=lambda r: r.key,
        label=lambda r: r.label,
        counts=counts,
    )
    labels = sorted({r.label for r in parts["train"]})
    index = {name: i for i, name in enumerate(labels)}
    for role in ("val", "test"):
        before = len(parts[role])
        parts[role] = [r for r in parts[role] if r.label in index]
        counts[f"unknown_{role}_label"] = before - len(parts[role])
        if not parts[role]:
            raise DataError(
                f"no usable {role} examples in '{sources.get(role, path)}' after cleaning"
            )

    def split(records) -> Split:
        y = np.array([index[r.label] for r in records], dtype=np.int64)
        if task == IMAGE_TASK:
            return Split(np.stack([r.item for r in records]).astype(np.uint8), y)
        return Split([str(r.item) for r in records], y)

    cleaning = {
        k: int(counts[k])
        for k in (
            "duplicates",
            "conflicting_labels",
            "empty_text",
            "missing_label",
            "leaked_from_train",
            "test_in_train",
            "test_in_val",
            "unknown_val_label",
            "unknown_test_label",
        )
    }
    if task == AUDIO_TASK:
        cleaning |= {k: int(counts[k]) for k in ("empty_audio", "over_long", "cut_to_window")}
    cleaning["undecodable"] = len(undecodable)
    cleaning["undecodable_files"] = undecodable[:MAX_LISTED_FILES]
    ds = Dataset(task, labels, *(split(parts[role]) for role in ROLES))
    ds.summary = {
        "path": str(path),
        "layout": layout,
        **split_summary(sources, ds, labels),
        **columns,
        "cleaning": cleaning,
    }
    return ds


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
    lines = [
        f"data: {summary['path']} ({summary['layout']}): {sizes}, "
        f"{len(summary['train_per_class'])} {summary.get('counted', 'classes')}",
        "cleaning: "
        + ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in c if k != "undecodable_files"),
    ]
    lines += [f"  skipped undecodable file: {p}" for p in c["undecodable_files"]]
    return "\n".join(lines)
