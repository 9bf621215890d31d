"""Text tables: CSV, TSV, JSONL or Parquet files (or an extension-less file sniffed as one)
with a text column and a label column, named or guessed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from finetune.data.dataset import Record
from finetune.errors import DataError

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
TEXT_NAMES = ("text", "sentence", "content", "message", "sms", "review", "document", "body")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "sentiment", "intent", "y")


def table_kind(path: Path, data_format: str) -> str | None:
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

    kind = table_kind(path, data_format)
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


def table_records(path: Path, cfg) -> tuple[list[Record], str, str]:
    df = _read_table(path, cfg.data_format)
    if df.empty:
        raise DataError(f"'{path}' has no rows")
    text_col, label_col = _pick_columns(df, path, cfg.text_column, cfg.label_column)
    records = []
    for text, label in zip(df[text_col].tolist(), df[label_col].tolist(), strict=True):
        text = "" if _missing(text) else str(text)
        records.append(Record(text, None if _missing(label) else str(label).strip()))
    return records, text_col, label_col


def _missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()
