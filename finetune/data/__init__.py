"""Reading a user's data (DESIGN.md §1): the format is detected from the path, by the first
row of `FORMATS` that recognises it, and loaded into a `Dataset` of three splits.

    ds = load_dataset("data/flowers", TrainConfig(), image_prep)

One module per format family: `spans.py` (CoNLL, token JSONL, SQuAD), `dense.py` (VOC, COCO,
images + masks), `tabular.py` (feature tables), `classes.py` (class folders of images,
audio or texts, and text tables, on `tables.py`); `splits.py` carves the missing splits and
`dataset.py` holds what they all load into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.data import classes, dense, spans, speech, tabular
from finetune.data.classes import load_image, median_image_side
from finetune.data.dataset import Dataset, ImagePrep, Split, describe, split_summary
from finetune.data.splits import ROLES, three_way
from finetune.data.tabular import schema as table_schema


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], str | None]  # the task of data at a path, None: not this format
    load: Callable[..., Dataset]  # (path, cfg, image_prep) → the three splits


FORMATS = (  # tried in this order; the last one names what it expected when nothing fits
    Format("LibriSpeech / audiofolder", speech.detect, speech.load),  # before class folders
    Format("CoNLL / token JSONL / SQuAD", spans.detect, spans.load),
    Format("VOC / COCO / images + masks", dense.detect, dense.load),
    Format("feature table", tabular.detect, tabular.load),
    Format("class folders / text table", classes.detect, classes.load_classes),
)


def _format(path: Path) -> tuple[Format, str]:
    for fmt in FORMATS[:-1]:
        task = fmt.detect(path)
        if task is not None:
            return fmt, task
    return FORMATS[-1], FORMATS[-1].detect(path)


def detect_task(path: str | Path) -> str:
    """Tell the task by the layout and a sniff of the files (no decoding)."""
    return _format(Path(path))[1]


def load_dataset(path: str | Path, cfg, image_prep: ImagePrep | None = None) -> Dataset:
    """Read, clean and split the data at `path` into train, val and test (`cfg` is a
    TrainConfig; data/splits.py says how missing splits are carved)."""
    path = Path(path)
    return _format(path)[0].load(path, cfg, image_prep)


__all__ = [
    "FORMATS",
    "ROLES",
    "Dataset",
    "Format",
    "ImagePrep",
    "Split",
    "describe",
    "detect_task",
    "load_dataset",
    "load_image",
    "median_image_side",
    "split_summary",
    "table_schema",
    "three_way",
]
