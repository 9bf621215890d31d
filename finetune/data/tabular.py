"""Tabular data (DESIGN.md §1): a table of feature columns and a label column.

Files: CSV or TSV (a header row, or none: columns then numbered from 0), Parquet, or a
headerless whitespace-separated table (UCI's `german.data`). `--label-column` takes a name
or an index (`-1`: the last); without it a column named like a label, else the last.
Columns are numeric when every present value parses as a number, else categorical;
`--categorical a,b` forces some. Missing values ("", NA, NaN, ?) are allowed.

Cleaning, counted: rows without a label (dropped), duplicate rows (dropped), constant columns
(dropped, named); a column equal to the label, or one-to-one with it, is refused by name.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from finetune.data.dataset import Dataset, Split, split_summary
from finetune.data.splits import ROLES, three_way
from finetune.errors import DataError

TASK = "tabular-classification"
MISSING = {"", "na", "nan", "null", "none", "?"}
LABEL_NAMES = ("label", "class", "target", "y", "default", "fraud", "is_fraud", "outcome")
TABLE_SUFFIXES = {".csv", ".tsv", ".parquet", ".pq", ".data", ".txt", ""}


def _whitespace_table(path: Path) -> bool:
    """Lines of the same number (3 or more) of whitespace-separated fields, no tab or comma."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in (f.readline() for _ in range(20)) if ln.strip()]
    except OSError:
        return False
    if not lines or any("\t" in ln or "," in ln for ln in lines):
        return False
    counts = {len(ln.split()) for ln in lines}
    return len(counts) == 1 and counts.pop() >= 3


def read_table(path: Path, nrows: int | None = None):
    """The table as strings (missing: None), columns named by the header or numbered;
    `nrows`: the first rows only (CSV, TSV and whitespace tables)."""
    import pandas as pd

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path).astype(object)
            df = df.where(df.notna(), None).map(lambda v: None if v is None else str(v))
        elif _whitespace_table(path):
            df = pd.read_csv(
                path, sep=r"\s+", header=None, dtype=str, keep_default_na=False, nrows=nrows
            )
        else:
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            with open(path, encoding="utf-8", errors="replace") as f:
                sample = f.read(20_000)
            try:
                header = 0 if csv.Sniffer().has_header(sample) else None
            except csv.Error:
                header = 0
            df = pd.read_csv(
                path, sep=sep, header=header, dtype=str, keep_default_na=False, nrows=nrows
            )
    except Exception as e:  # pandas raises many types: the file and the reason, one line
        raise DataError(f"cannot read the table '{path}': {str(e).splitlines()[0]}") from None
    df.columns = [str(c) for c in df.columns]
    return df.map(lambda v: None if v is None or str(v).strip().lower() in MISSING else v)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def is_tabular(path: Path) -> bool:
    """A file of feature columns (3 or more, none free text) rather than texts to classify."""
    if not path.is_file() or path.suffix.lower() not in TABLE_SUFFIXES:
        return False
    if _whitespace_table(path):
        return True
    if path.suffix.lower() not in (".csv", ".tsv", ".parquet", ".pq"):
        return False
    try:
        df = read_table(path, nrows=200).head(200)  # a Parquet file is read whole
    except DataError:
        return False
    if df.shape[1] < 3:
        return False
    for c in df.columns:
        values = [str(v) for v in df[c] if v is not None]
        texty = [v for v in values if " " in v.strip() and len(v) > 20]
        if values and len(texty) > 0.3 * len(values):
            return False  # a column of sentences: text classification
    return True


def _label_column(df, given: str | None, path: Path) -> str:
    cols = list(df.columns)
    if given is not None:
        if given in cols:
            return given
        try:
            return cols[int(given)]
        except (ValueError, IndexError):
            raise DataError(
                f"label column '{given}' not in '{path}' (columns: {', '.join(cols)}; "
                f"or an index, -1 for the last)"
            ) from None
    return next((c for c in cols if c.lower() in LABEL_NAMES), cols[-1])


def _leaks(df, label: str) -> None:
    y = df[label].astype(str)
    for c in df.columns:
        if c == label:
            continue
        x = df[c].astype(str)
        one_to_one = (
            df.groupby(x)[label].nunique().max() == 1 and df.groupby(y)[c].nunique().max() == 1
        )
        if (x == y).all() or one_to_one:
            raise DataError(
                f"column '{c}' is the label '{label}' under another name (it determines it "
                f"row by row): drop it from the data, a model would learn nothing else"
            )


def schema(train, columns: list[str], categorical: set[str]) -> list[dict]:
    """Each feature's kind and what encodes it, from the training rows only."""
    features = []
    for c in columns:
        values = [v for v in train[c] if v is not None and not (isinstance(v, float) and v != v)]
        if c not in categorical and values and all(_is_number(v) for v in values):
            x = np.array([float(v) for v in values])
            features.append(
                {
                    "name": c,
                    "kind": "numeric",
                    "mean": float(x.mean()),
                    "std": float(x.std()) or 1.0,
                    "median": float(np.median(x)),
                }
            )
        else:
            counts = Counter(str(v) for v in values)
            cats = [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
            codes = np.arange(len(cats), dtype=float)
            features.append(
                {
                    "name": c,
                    "kind": "categorical",
                    "categories": cats,
                    "mean": float(codes.mean()) if len(cats) else 0.0,
                    "std": float(codes.std()) or 1.0,
                }
            )
    return features


def load(path: Path, cfg, image_prep=None) -> Dataset:
    """The Dataset of a table: inputs are the raw rows (dicts of strings); the schema and the
    encoding are made from the training split (finetune/recipes/tabular.py)."""
    df = read_table(path)
    if df.empty:
        raise DataError(f"'{path}' has no rows")
    label = _label_column(df, cfg.label_column, path)
    counts: Counter = Counter()
    unlabelled = df[label].isna()
    counts["rows_without_label"] = int(unlabelled.sum())
    df = df[~unlabelled]
    before = len(df)
    df = df.drop_duplicates()
    counts["duplicates"] = before - len(df)
    _leaks(df, label)
    features = [c for c in df.columns if c != label]
    constant = [c for c in features if df[c].nunique(dropna=False) <= 1]
    counts["constant_columns"] = len(constant)
    features = [c for c in features if c not in constant]
    if not features:
        raise DataError(f"'{path}' has no feature column that varies")
    categorical = {c.strip() for c in (cfg.categorical or "").split(",") if c.strip()}
    unknown = sorted(categorical - set(features))
    if unknown:
        raise DataError(
            f"--categorical names {', '.join(unknown)}, not feature columns of '{path}' "
            f"(columns: {', '.join(features)})"
        )
    labels = sorted(df[label].astype(str).str.strip().unique())
    if len(labels) < 2:
        raise DataError(f"'{path}': the label column '{label}' holds one class ({labels})")
    rows = [
        (dict(zip(features, r[:-1], strict=True)), labels.index(str(r[-1]).strip()))
        for r in df[features + [label]].itertuples(index=False, name=None)
    ]
    parts = three_way({"train": rows}, cfg, str(path), label=lambda r: r[1], counts=counts)
    ds = Dataset(
        TASK,
        labels,
        *(
            Split([r[0] for r in parts[role]], np.array([r[1] for r in parts[role]], np.int64))
            for role in ROLES
        ),
    )
    ds.summary = {
        "path": str(path),
        "layout": "table",
        "label_column": label,
        "dropped_columns": constant,
        **split_summary({"train": path}, ds, labels),
        "train_per_class": {
            labels[i]: int(n) for i, n in enumerate(np.bincount(ds.train.labels, minlength=2))
        },
        "cleaning": {k: int(v) for k, v in sorted(counts.items())} | {"undecodable_files": []},
    }
    ds.features, ds.categorical = features, categorical
    return ds


def detect(path: Path) -> str | None:
    return TASK if path.exists() and is_tabular(path) else None
