"""Classification data (DESIGN.md §1): one label per example.

Layouts, detected from the path:
- image, audio or text class folders: `<root>/<label>/*.jpg|*.wav|*.txt`, optionally
  pre-split as `<root>/train/<label>/...` plus `<root>/{val,dev}/<label>/...` and
  `<root>/test/<label>/...`;
- a text table (data/tables.py), or a folder holding `train.*` and `val.*` / `dev.*` and / or
  `test.*` tables.

Splits (data/splits.py): train, val (selection) and test (never seen by selection); the
ones the data gives are used as given, the others carved from training.

Cleaning, counted in `Dataset.summary["cleaning"]`: exact duplicates (content hash), empty
texts, missing labels, images that do not decode (paths listed), validation or test items
that also appear in training (and test items in validation), labels unknown to training.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.dataset import MAX_LISTED_FILES, Dataset, ImagePrep, Record, Split, split_summary
from finetune.data.splits import ROLES, three_way
from finetune.data.tables import TABLE_EXTS, table_kind, table_records
from finetune.errors import DataError
from tasks.audio import AUDIO_EXTS
from tasks.common import resize_crop
from tasks.errors import InputError

MAX_CLIP_SECONDS = 30.0  # Whisper's window: longer clips are dropped as over-long
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "dev", "eval")
TEST_NAMES = ("test", "testing", "holdout")
CLEANING = (
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


@dataclass
class _Work:
    """What the cleaning of one data set counts and needs."""

    cfg: object  # TrainConfig
    prep: ImagePrep | None
    counts: Counter = field(default_factory=Counter)
    undecodable: list[str] = field(default_factory=list)


def _text_content(r: Record) -> bytes | None:
    r.item = str(r.item).strip()
    return r.item.encode("utf-8") if r.item else None


def _file_content(r: Record) -> bytes:
    return Path(r.item).read_bytes()


def load_image(path: str | Path, prep: ImagePrep) -> np.ndarray:
    """Decode, resize the shorter side to `prep.resize`, centre-crop to `prep.crop`: uint8 HWC."""
    from PIL import Image

    with Image.open(path) as im:
        return resize_crop(im, prep.resize, prep.crop, prep.interpolation)


def _decode_images(records: list[Record], work: _Work) -> list[Record]:
    """The records whose image decodes, each now holding its uint8 array as `item`."""
    if work.prep is None:
        raise ValueError("image data needs an ImagePrep")
    kept = []
    for r in records:
        try:
            r.item = load_image(r.item, work.prep)
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            work.undecodable.append(str(r.item))
            continue
        kept.append(r)
    return kept


def _decode_audio(records: list[Record], work: _Work) -> list[Record]:
    """The records whose audio decodes, each now holding the file as base64 (what a client
    sends; the holdout keeps it so export and benchmarks replay the served path) and its
    duration. Counts empty or silent clips and over-long ones (dropped), and clips longer
    than an asked --clip-seconds (kept: the window cuts them)."""
    from tasks.audio import SAMPLE_RATE, read_audio

    kept, asked, counts = [], work.cfg.clip_seconds, work.counts
    limit = MAX_CLIP_SECONDS if asked is None else max(asked, 0.1)
    for r in records:
        data = Path(r.item).read_bytes()
        try:
            wave = read_audio(data, math.inf)
        except InputError as e:
            if e.reason == "empty_audio":
                counts["empty_audio"] += 1
            else:
                work.undecodable.append(str(r.item))
            continue
        seconds = len(wave) / SAMPLE_RATE
        if not np.any(wave):
            counts["empty_audio"] += 1
            continue
        if seconds > limit and asked is None:
            counts["over_long"] += 1
            continue
        counts["cut_to_window"] += int(seconds > limit)
        r.item, r.seconds = base64.b64encode(data).decode(), seconds
        kept.append(r)
    return kept


def _as_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class Kind:
    """One kind of class-folder data: the task it trains and how its files become examples."""

    task: str
    exts: frozenset[str]
    read: Callable[[Path], object]  # a file → the record's item (its path, or its text)
    content: Callable[[Record], bytes | None]  # what is hashed; None: an empty text (dropped)
    decode: Callable[[list[Record], _Work], list[Record]] | None = None
    images: bool = False  # decoded to uint8 arrays: needs an ImagePrep, stored as one array
    counted: tuple[str, ...] = ()  # cleaning counts of its own


KINDS = (  # looked for in this order: a folder with images is image data
    Kind("image-classification", frozenset(IMAGE_EXTS), Path, _file_content, _decode_images, True),
    Kind(
        "audio-classification",
        frozenset(AUDIO_EXTS),
        Path,
        _file_content,
        _decode_audio,
        counted=("empty_audio", "over_long", "cut_to_window"),
    ),
    Kind("text-classification", frozenset({".txt"}), _as_text, _text_content),
)
TABLES = KINDS[-1]  # text tables are text classification


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _named(children: list[Path], names: tuple[str, ...], *, dirs: bool) -> Path | None:
    for name in names:
        for p in children:
            if dirs and p.is_dir() and p.name.lower() == name:
                return p
            if not dirs and p.is_file() and p.stem.lower() == name and table_kind(p, "auto"):
                return p
    return None


def _given(children: list[Path], dirs: bool) -> dict[str, Path]:
    found = {
        role: _named(children, names, dirs=dirs)
        for role, names in (("train", TRAIN_NAMES), ("val", VAL_NAMES), ("test", TEST_NAMES))
    }
    return {role: p for role, p in found.items() if p is not None}


def locate(path: Path) -> tuple[str, Kind, dict[str, Path]]:
    """(layout, kind, {"train": source, and "val" / "test" where the data has them})."""
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    if path.is_file():
        return "table", TABLES, {"train": path}
    children = _children(path)
    if not children:
        raise DataError(f"data folder '{path}' is empty")
    folders = _given(children, dirs=True)
    if "train" in folders:
        return "class-folders", _folder_kind(folders["train"]), folders
    files = _given(children, dirs=False)
    if "train" in files:
        return "table", TABLES, files
    if any(p.is_dir() for p in children):
        return "class-folders", _folder_kind(path), {"train": path}
    tables = [p for p in children if p.suffix.lower() in TABLE_EXTS]
    if len(tables) == 1:
        return "table", TABLES, {"train": tables[0]}
    raise DataError(
        f"cannot tell the layout of '{path}': expected class folders (<label>/*.jpg or "
        f"<label>/*.txt), one table file (.csv .tsv .jsonl .parquet), or train.* and val.* files"
    )


def detect(path: Path) -> str:
    return locate(path)[1].task


def median_image_side(path: str | Path, sample: int = 200) -> int | None:
    """The median shorter side of up to `sample` training images, read from their headers
    (no decoding); None when the data is not image folders or nothing opens."""
    from PIL import Image

    _, kind, sources = locate(Path(path))
    if not kind.images:
        return None
    files = sorted(f for f in sources["train"].rglob("*") if f.suffix.lower() in kind.exts)
    step = max(1, len(files) // sample)
    sides = []
    for f in files[::step][:sample]:
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except Exception:  # counted later by the cleaning; a size sniff skips it
            continue
    return int(np.median(sides)) if sides else None


def _folder_kind(root: Path) -> Kind:
    exts = Counter(
        f.suffix.lower() for d in _children(root) if d.is_dir() for f in d.iterdir() if f.is_file()
    )
    for kind in KINDS:
        if sum(n for ext, n in exts.items() if ext in kind.exts):
            return kind
    raise DataError(
        f"no images, audio ({', '.join(AUDIO_EXTS)}) or .txt files found in the class "
        f"folders of '{root}'"
    )


def _folder_records(root: Path, kind: Kind) -> list[Record]:
    return [
        Record(kind.read(f), label_dir.name)
        for label_dir in _children(root)
        if label_dir.is_dir()
        for f in _children(label_dir)
        if f.is_file() and f.suffix.lower() in kind.exts
    ]


def _clean(records: list[Record], kind: Kind, counts: Counter) -> list[Record]:
    """Drop empty texts, missing labels and exact duplicates; set each record's hash."""
    seen: dict[str, str | None] = {}
    kept = []
    for r in records:
        if r.label is None:
            counts["missing_label"] += 1
            continue
        content = kind.content(r)
        if content is None:
            counts["empty_text"] += 1
            continue
        r.key = hashlib.sha256(content).hexdigest()
        if r.key in seen:
            counts["duplicates"] += 1
            if seen[r.key] != r.label:
                counts["conflicting_labels"] += 1
            continue
        seen[r.key] = r.label
        kept.append(r)
    return kept


def _check_classes(records: list[Record], where: str, minimum: int) -> None:
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


def _read(layout: str, kind: Kind, sources: dict[str, Path], work: _Work, columns: dict):
    """Every source's records, cleaned and decoded."""
    parts = {}
    for role, src in sources.items():
        if layout == "class-folders":
            records = _folder_records(src, kind)
        else:
            records, text_col, label_col = table_records(src, work.cfg)
            columns.update(text_column=text_col, label_column=label_col)
        parts[role] = _clean(records, kind, work.counts)
        if kind.decode is not None:  # the decoded item travels with its record through the split
            parts[role] = kind.decode(parts[role], work)
    seconds = [r.seconds for recs in parts.values() for r in recs if r.seconds]
    if seconds:
        columns["clip_seconds"] = {
            "median": round(float(np.median(seconds)), 3),
            "max": round(float(np.max(seconds)), 3),
        }
    return parts


def _known_labels(parts: dict, sources: dict, path: Path, counts: Counter) -> list[str]:
    """The training labels; validation and test items of other labels are dropped."""
    labels = sorted({r.label for r in parts["train"]})
    for role in ("val", "test"):
        before = len(parts[role])
        parts[role] = [r for r in parts[role] if r.label in labels]
        counts[f"unknown_{role}_label"] = before - len(parts[role])
        if not parts[role]:
            raise DataError(
                f"no usable {role} examples in '{sources.get(role, path)}' after cleaning"
            )
    return labels


def load_classes(path: Path, cfg, image_prep: ImagePrep | None = None) -> Dataset:
    """Read, clean and split class folders or text tables into train, val and test."""
    layout, kind, sources = locate(path)
    work, columns = _Work(cfg, image_prep), {}
    parts = _read(layout, kind, sources, work, columns)
    _check_classes(parts["train"], str(sources["train"]), 1 + len(set(ROLES) - set(parts)))
    parts = three_way(
        parts, cfg, str(path), key=lambda r: r.key, label=lambda r: r.label, counts=work.counts
    )
    labels = _known_labels(parts, sources, path, work.counts)
    index = {name: i for i, name in enumerate(labels)}

    def split(records) -> Split:
        y = np.array([index[r.label] for r in records], dtype=np.int64)
        if kind.images:
            return Split(np.stack([r.item for r in records]).astype(np.uint8), y)
        return Split([str(r.item) for r in records], y)

    cleaning = {k: int(work.counts[k]) for k in CLEANING + kind.counted}
    cleaning["undecodable"] = len(work.undecodable)
    cleaning["undecodable_files"] = work.undecodable[:MAX_LISTED_FILES]
    ds = Dataset(kind.task, labels, *(split(parts[role]) for role in ROLES))
    ds.summary = {
        "path": str(path),
        "layout": layout,
        **split_summary(sources, ds, labels),
        **columns,
        "cleaning": cleaning,
    }
    return ds
