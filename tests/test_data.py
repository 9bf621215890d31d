"""Data formats, cleaning counts and data errors (DESIGN.md §1)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from finetune.config import TrainConfig
from finetune.data import ImagePrep, detect_task, load_dataset
from finetune.errors import DataError
from tests.conftest import make_images, make_texts

IMAGE_TASK, TEXT_TASK = "image-classification", "text-classification"

PREP = ImagePrep(resize=36, crop=32, interpolation="bilinear")
CFG = TrainConfig(val_fraction=0.25, test_fraction=0.2)


def _keys(split) -> set:
    if isinstance(split.inputs, np.ndarray):
        return {x.tobytes() for x in split.inputs}
    return set(split.inputs)


def test_image_class_folders_three_stratified_splits(image_dir):
    ds = load_dataset(image_dir, CFG, PREP)
    assert ds.task == IMAGE_TASK and ds.labels == ["blue", "green", "red"]
    assert ds.train.inputs.shape == (len(ds.train), 32, 32, 3)
    assert ds.train.inputs.dtype == np.uint8
    assert (len(ds.train), len(ds.val), len(ds.test)) == (16, 8, 6)  # 30 x (1 - .25 - .2)
    per_class = np.bincount(ds.val.labels)  # round(30 * 0.25) = 8, stratified over 3 classes
    assert per_class.sum() == 8 and set(per_class.tolist()) <= {2, 3}
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]
    assert ds.summary["splits"] == {"train": "given", "val": "carved", "test": "carved"}
    train, val, test = _keys(ds.train), _keys(ds.val), _keys(ds.test)
    assert not (train & val or train & test or val & test)  # the holdout was never seen
    # The crop keeps the class colour: red images are mostly red.
    red = ds.train.inputs[ds.train.labels == ds.labels.index("red")].mean(axis=(0, 1, 2))
    assert red[0] > 150 and red[2] < 100


def test_split_is_fixed_by_the_seed(image_dir):
    a, b = load_dataset(image_dir, CFG, PREP), load_dataset(image_dir, CFG, PREP)
    c = load_dataset(image_dir, TrainConfig(val_fraction=0.25, seed=1), PREP)
    assert np.array_equal(a.val.inputs, b.val.inputs)
    assert np.array_equal(a.test.inputs, b.test.inputs)
    assert not np.array_equal(a.val.inputs, c.val.inputs)


def _copy(root, source: str, target: str) -> None:
    """An exact copy of one image file under another name: a duplicate or a leak."""
    (root / target).write_bytes((root / source).read_bytes())


def test_pre_split_images_cleaning_counts(tmp_path):
    root = tmp_path / "pets"
    make_images(root / "train", per_class=4, seed=1)
    make_images(root / "val", per_class=2, seed=2)
    _copy(root, "train/red/1_0.png", "train/red/copy.png")
    _copy(root, "train/blue/1_0.png", "val/blue/leak.png")
    (root / "train" / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    ds = load_dataset(root, CFG, PREP)
    c = ds.summary["cleaning"]
    assert (c["duplicates"], c["leaked_from_train"], c["undecodable"]) == (1, 1, 1)
    assert c["undecodable_files"] == [str(root / "train" / "green" / "broken.jpg")]
    assert ds.summary["pre_split"] and (len(ds.train), len(ds.val)) == (9, 6)
    assert len(ds.test) == 3  # carved from training: max(3 classes, round(12 x 0.2))
    assert ds.summary["splits"] == {"train": "given", "val": "given", "test": "carved"}


def test_pre_split_train_val_test_used_as_given_and_leaks_dropped(tmp_path):
    root = tmp_path / "pets"
    make_images(root / "train", per_class=4, seed=1)
    make_images(root / "valid", per_class=2, seed=2)
    make_images(root / "test", per_class=2, seed=3)
    _copy(root, "train/red/1_0.png", "test/red/seen.png")
    _copy(root, "valid/red/2_0.png", "test/red/picked.png")
    ds = load_dataset(root, CFG, PREP)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 6, 6)
    c = ds.summary["cleaning"]
    assert (c["test_in_train"], c["test_in_val"]) == (1, 1)
    assert ds.summary["splits"] == {"train": "given", "val": "given", "test": "given"}


def _write(df: pd.DataFrame, path, fmt):
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        df.to_parquet(path)
    else:  # headerless, tab-separated, quotes inside texts, like the SMS Spam Collection
        path.write_text("".join(f"{lab}\t{txt}\n" for txt, lab in df.itertuples(index=False)))


@pytest.mark.parametrize(
    "fmt,name",
    [
        ("csv", "d.csv"),
        ("jsonl", "d.jsonl"),
        ("parquet", "d.parquet"),
        ("tsv", "d.tsv"),
        ("tsv", "SMSCollection"),
    ],
)
def test_text_table_formats(tmp_path, fmt, name):
    rows = make_texts(10) + [('he said "free" prize, "call"', "spam")]
    df = pd.DataFrame(rows, columns=["text", "label"])
    _write(df, tmp_path / name, fmt)
    assert detect_task(tmp_path / name) == TEXT_TASK
    ds = load_dataset(tmp_path / name, CFG)
    assert ds.labels == ["ham", "spam"]
    texts = list(ds.train.inputs) + list(ds.val.inputs) + list(ds.test.inputs)
    assert 'he said "free" prize, "call"' in texts  # quotes kept verbatim
    assert len(texts) + ds.summary["cleaning"]["duplicates"] == len(rows)


def test_columns_guessed_without_known_names(tmp_path):
    rows = make_texts(8)
    pd.DataFrame(
        {
            "id": range(len(rows)),
            "body_text": [t for t, _ in rows],
            "kind": [lab for _, lab in rows],
        }
    ).to_csv(tmp_path / "x.csv", index=False)
    ds = load_dataset(tmp_path / "x.csv", CFG)
    assert ds.summary["text_column"] == "body_text" and ds.summary["label_column"] == "kind"


def test_text_cleaning_counts(tmp_path):
    rows = [
        {"text": "free cash now", "label": "spam"},
        {"text": "free cash now", "label": "spam"},
        {"text": "free cash now", "label": "ham"},
        {"text": "   ", "label": "ham"},
        {"text": "no label here", "label": None},
    ]
    rows += [{"text": t, "label": lab} for t, lab in make_texts(6, seed=3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = load_dataset(tmp_path / "d.jsonl", CFG).summary["cleaning"]
    assert c["empty_text"] == 1 and c["missing_label"] == 1
    assert c["duplicates"] >= 2 and c["conflicting_labels"] >= 1


def test_pre_split_tables_and_leakage(tmp_path):
    train, dev = make_texts(8, seed=1), make_texts(3, seed=2)
    dev.append(train[0])
    pd.DataFrame(train, columns=["sentence", "label"]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(dev, columns=["sentence", "label"]).to_csv(tmp_path / "dev.csv", index=False)
    ds = load_dataset(tmp_path, CFG)
    assert ds.summary["pre_split"] and ds.summary["cleaning"]["leaked_from_train"] >= 1
    assert train[0][0] not in list(ds.val.inputs)


def test_text_class_folders(tmp_path):
    for i, (text, label) in enumerate(make_texts(5)):
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / f"{i}.txt").write_text(text + "\n")
    ds = load_dataset(tmp_path, CFG)
    assert ds.task == TEXT_TASK and ds.labels == ["ham", "spam"]
    sizes = len(ds.train) + len(ds.val) + len(ds.test)
    assert sizes + ds.summary["cleaning"]["duplicates"] == 10


def test_bad_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_dataset(tmp_path / "empty", CFG)
    make_images(tmp_path / "one", per_class=4)
    for name in ("green", "blue"):
        for f in (tmp_path / "one" / name).iterdir():
            f.unlink()
        (tmp_path / "one" / name).rmdir()
    with pytest.raises(DataError, match="only one class"):
        load_dataset(tmp_path / "one", CFG, PREP)
    pd.DataFrame(make_texts(4), columns=["text", "label"]).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"text column 'msg' not found .* columns: text, label"):
        load_dataset(tmp_path / "t.csv", TrainConfig(text_column="msg"))
    pd.DataFrame([("a b", "x"), ("c d", "x"), ("e f", "y")], columns=["text", "label"]).to_csv(
        tmp_path / "small.csv", index=False
    )
    with pytest.raises(DataError, match="'x', 'y'.* fewer than 3"):
        load_dataset(tmp_path / "small.csv", CFG)
