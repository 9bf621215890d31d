"""Texts longer than the model's length, cut into overlapping windows (token classification,
question answering): the `tokenizers` library's overflowing encodings with a stride, padded
per batch here. Offsets in every window index the original string."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.common import length_buckets


def window_tokenizer(tok, pre: dict, pair: bool = False):
    """Configure `tok` for windows: truncation at max_length with `stride` tokens of overlap
    (pairs: only the second sequence, the context, is cut), no padding (done per batch)."""
    max_length, stride = int(pre["max_length"]), int(pre.get("stride", 0))
    tok.no_padding()
    strategy = "only_second" if pair else "longest_first"
    tok.enable_truncation(max_length, stride=stride, strategy=strategy)
    return tok


def windows(encoding) -> list:
    """The first window and its overflowing ones."""
    return [encoding, *encoding.overflowing]


def pad_rows(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> np.ndarray:
    width = width or max(len(r) for r in rows)
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def window_feeds(encs: Sequence, names: list[str], pad_id: int) -> dict[str, np.ndarray]:
    """Windows of different lengths as int64 model inputs, right-padded to the longest."""
    width = max(len(e.ids) for e in encs)
    columns = {
        "input_ids": (lambda e: e.ids, pad_id),
        "attention_mask": (lambda e: e.attention_mask, 0),
        "token_type_ids": (lambda e: e.type_ids, 0),
    }
    return {n: pad_rows([columns[n][0](e) for e in encs], columns[n][1], width) for n in names}


MAX_WINDOWS = 64  # windows per model call: a batch of long texts stays within memory


def run_windows(session_run, encs: Sequence, names: list[str], pad_id: int) -> list[list]:
    """Every window through the model, in length buckets of at most MAX_WINDOWS; per window
    the list of its outputs (each without the batch axis)."""
    lengths = np.array([len(e.ids) for e in encs])
    results: list[list] = [[] for _ in encs]
    for bucket in length_buckets(lengths):
        for start in range(0, len(bucket), MAX_WINDOWS):
            idx = bucket[start : start + MAX_WINDOWS]
            outs = session_run(window_feeds([encs[i] for i in idx], names, pad_id))
            for row, i in enumerate(idx):
                results[i] = [o[row] for o in outs]
    return results


def fit_length(a: np.ndarray, length: int, value: int) -> np.ndarray:
    """Cut or pad the sequence axis to `length`."""
    if a.shape[1] >= length:
        return a[:, :length]
    pad = np.full((a.shape[0], length - a.shape[1]), value, dtype=a.dtype)
    return np.concatenate([a, pad], axis=1)


def first_window_feeds(encodings: Sequence, names: list[str], pad_id: int, length: int | None):
    """Parity feeds: the first window of each input, padded or cut to `length` tokens."""
    feeds = window_feeds([windows(e)[0] for e in encodings], names, pad_id)
    if length is None:
        return feeds
    return {k: fit_length(v, length, pad_id if k == "input_ids" else 0) for k, v in feeds.items()}
