"""Texts longer than the model's length, cut into overlapping windows (token classification,
question answering): the `tokenizers` library's overflowing encodings with a stride, padded
per batch here. Offsets in every window index the original string."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.base import Task
from tasks.common import Prepared, length_buckets, unknown_id


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


def content_tokens(wins: Sequence, sequence: int) -> int:
    """Distinct tokens of one sequence of an input over its overlapping windows."""
    return len({e.offsets[p] for e in wins for p, q in enumerate(e.sequence_ids) if q == sequence})


class WindowedTask(Task):
    """A text task read in windows (entities, answers): each input's windows run in length
    buckets, `read` turns one input's window outputs into its answer, and the input's
    embedding is its windows' pooled embeddings (the last output) weighted by their tokens."""

    pair = False  # inputs are (question, context) pairs; only the second is cut into windows
    content_sequence = 0  # the sequence whose tokens are the input's (pairs: the context)

    def __init__(self, spec, tokenizer=None, limits=None):
        super().__init__(spec, tokenizer, limits)
        if tokenizer is not None:
            window_tokenizer(tokenizer, self.pre, pair=self.pair)
            self.unk_id = unknown_id(tokenizer)
            self.pad_id = int(self.pre.get("pad_id", tokenizer.token_to_id("[PAD]") or 0))

    # Tokenizing a text of 20,000 characters takes about 10 ms: decode runs on the service's
    # threads, and its windows price the request for admission (`Prepared.cost`).
    decode_in_threads = True

    def encode(self, values: Sequence) -> list[list]:
        """Per input (a text, or a (question, context) pair), its windows."""
        return [windows(e) for e in self.tokenizer.encode_batch(list(values))]

    @staticmethod
    def cost_floor(value) -> int:
        """A lower bound of an input's cost (its windows' tokens) before it is tokenized: the
        tokenizers these models use split on whitespace first, so a text has at least one
        token per word. A request whose floor is already too much work for the timeout is
        refused without tokenizing it (64 texts of 20,000 characters held ~66 MB tokenized)."""
        texts = value.values() if isinstance(value, dict) else (value,)
        return sum(len(t.split()) for t in texts if isinstance(t, str))

    def windowed(self, item: Prepared) -> Prepared:
        """`item` with its windows and their token count as its cost (no tokenizer: as is)."""
        if self.tokenizer is not None:
            value = item.value if isinstance(item.value, str) else tuple(item.value)
            item.windows = self.encode([value])[0]
            item.cost = sum(len(w.ids) for w in item.windows)
        return item

    def read(self, value, wins: Sequence, outs: Sequence[list]):
        """One input's answer from its windows' outputs (each a list of the model outputs)."""
        raise NotImplementedError

    def run(self, session_run, items, stats=None):
        values = [i.value for i in items]
        todo = [k for k, i in enumerate(items) if i.windows is None]
        encoded = iter(self.encode([values[k] for k in todo]) if todo else [])
        per_item = [i.windows if i.windows is not None else next(encoded) for i in items]
        flat = [w for wins in per_item for w in wins]
        results = run_windows(session_run, flat, self.names(), self.pad_id)
        outputs, embedding, tokens, k = [], [], [], 0
        for value, wins in zip(values, per_item, strict=True):
            outs = results[k : k + len(wins)]
            k += len(wins)
            outputs.append(self.read(value, wins, outs))
            weights = np.array([sum(w.attention_mask) for w in wins], dtype=np.float64)
            pooled = np.stack([o[-1] for o in outs])
            embedding.append((pooled * weights[:, None]).sum(0) / weights.sum())
            tokens.append(content_tokens(wins, self.content_sequence))
        if stats is not None:
            stats["tokens"] = tokens
            stats["truncated"] = sum(len(wins) > 1 for wins in per_item)
            stats["unknown_ratio"] = [
                sum(w.ids.count(self.unk_id) for w in wins) / max(1, n)
                for wins, n in zip(per_item, tokens, strict=True)
            ]
        return outputs, np.asarray(embedding, dtype=np.float32)

    def parity_feeds(self, items, length=None) -> dict:
        """The first window of each input (padded or cut to `length` tokens when given)."""
        encs = self.tokenizer.encode_batch([i.value for i in items])
        return first_window_feeds(encs, self.names(), self.pad_id, length)
