"""Token classification (named entities), DESIGN.md §0.

Tags are IOB2 (`O`, `B-PER`, `I-PER`, ...; the data loader converts IOB1 and BIOES). A text
is tokenized as it comes, in windows of `max_length` tokens overlapping by `stride`; a word
(as the tokenizer's pre-tokenizer splits it) takes the tag of its first sub-token, read from
the window where that sub-token has the most context on both sides. Words merge into entities
as Hugging Face's `aggregation_strategy="first"` does; offsets index the original text.

ONNX outputs `logits` [batch, sequence, tags] and `pooled_embedding`; the API answers
{"entities": [{"text", "label", "start", "end", "score"}]}; OIP output `entities` (BYTES,
one JSON list per input).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.base import Output, utf8
from tasks.common import Prepared, check_text, softmax
from tasks.drift import Samples
from tasks.text_windows import WindowedTask, windows

IGNORE = -100  # label of sub-tokens that are not a word's first (cross-entropy ignore_index)


@dataclass
class Tagged:
    """The model's reading of one text: its words and their tags."""

    text: str
    spans: list[tuple[int, int]]  # character offsets of each word
    tags: list[int]  # tag index per word
    scores: list[float]  # probability of that tag


def entity_type(tag: str) -> str:
    return tag[2:] if len(tag) > 2 and tag[1] == "-" else tag


def merge(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """IOB2 words → entities (type, first word, last word), seqeval's default (lenient) rules:
    an I- tag after O or after another type starts an entity."""
    out, current = [], None
    for i, tag in enumerate(list(tags) + ["O"]):
        kind = entity_type(tag)
        starts = tag.startswith("B-") or (
            tag.startswith("I-") and (current is None or current[0] != kind)
        )
        if current is not None and (tag == "O" or starts):
            out.append((current[0], current[1], i - 1))
            current = None
        if starts:
            current = (kind, i)
    return out


def tags_from_entities(text: str, entities: list[dict]) -> list[str]:
    """IOB2 tags of the whitespace-separated tokens of `text` from an API answer's entities
    (a token inside an entity continues it; the one where it starts begins it)."""
    spans = sorted((e["start"], e["end"], e["label"]) for e in entities)
    out, pos = [], 0
    for token in text.split(" "):
        if token:
            tag = "O"
            for start, end, label in spans:
                if start == pos:
                    tag = "B-" + label
                elif start < pos < end:
                    tag = "I-" + label
            out.append(tag)
        pos += len(token) + 1
    return out


class TokenClassification(WindowedTask):
    name = "token-classification"
    metric = "entity_f1"
    checks = ("prediction", "confidence", "embedding", "input", "entities")
    onnx_outputs = {
        "logits": {0: "batch", 1: "sequence"},
        "pooled_embedding": {0: "batch"},
    }
    example_input = "Angela Merkel met Emmanuel Macron in Paris."

    def __init__(self, spec, tokenizer=None, limits=None):
        super().__init__(spec, tokenizer, limits)
        self.types = sorted({entity_type(t) for t in self.labels if t != "O"})

    # ------------------------------------------------------------------ inputs

    def decode(self, value) -> Prepared:
        return self.windowed(Prepared(check_text(value, self.limits.max_text_chars)))

    def from_holdout(self, value) -> Prepared:
        return Prepared(str(value))

    @staticmethod
    def first_tokens(enc) -> dict[int, tuple[int, int]]:
        """word id → (position of its first sub-token in this window, context around it)."""
        content = [i for i, s in enumerate(enc.sequence_ids) if s is not None]
        lo, hi = (content[0], content[-1]) if content else (0, -1)
        out: dict[int, tuple[int, int]] = {}
        for pos in range(lo, hi + 1):
            w = enc.word_ids[pos]
            if w is not None and w not in out and (pos == lo or enc.word_ids[pos - 1] != w):
                out[w] = (pos, min(pos - lo, hi - pos))
        return out

    def word_spans(self, wins: Sequence) -> dict[int, tuple[int, int]]:
        spans: dict[int, tuple[int, int]] = {}
        for enc in wins:
            for pos, w in enumerate(enc.word_ids):
                if w is None or enc.sequence_ids[pos] is None:
                    continue
                s, e = enc.offsets[pos]
                old = spans.get(w)
                spans[w] = (s, e) if old is None else (min(old[0], s), max(old[1], e))
        return spans

    # ------------------------------------------------------------------ model

    def read(self, text: str, wins: Sequence, outs: Sequence[list]) -> Tagged:
        """Word tags from the windows' logits [len, tags]: the first sub-token's tag, from
        the window where it has the most context."""
        best: dict[int, tuple[int, int, int]] = {}  # word → (context, window, position)
        for wi, enc in enumerate(wins):
            for w, (pos, context) in self.first_tokens(enc).items():
                if w not in best or context > best[w][0]:
                    best[w] = (context, wi, pos)
        spans = self.word_spans(wins)
        words = sorted(best)
        probs = [softmax(o[0]) for o in outs]  # [len, tags] per window, once
        tags, scores = [], []
        for w in words:
            _, wi, pos = best[w]
            p = probs[wi][pos]
            tags.append(int(p.argmax()))
            scores.append(float(p.max()))
        return Tagged(text, [spans[w] for w in words], tags, scores)

    def training_windows(self, raw: str, target: dict):
        return self.label_windows(raw, target["tags"])

    def label_windows(
        self, text: str, token_tags: Sequence[str]
    ) -> list[tuple[object, np.ndarray]]:
        """Training: the windows of `text` (its data tokens joined by single spaces) with a tag
        index at each word's first sub-token and IGNORE elsewhere. A data token the
        pre-tokenizer splits ("U.S." → U . S .) tags its first word with the token's tag
        and the rest as its continuation (I-), so that serving merges them back."""
        import bisect

        starts, pos = [], 0
        for token in text.split(" "):
            starts.append(pos)
            pos += len(token) + 1
        index = {t: i for i, t in enumerate(self.labels)}
        out = []
        for enc in windows(self.tokenizer.encode(text)):
            labels = np.full(len(enc.ids), IGNORE, dtype=np.int64)
            for pos_, _ in self.first_tokens(enc).values():
                s = enc.offsets[pos_][0]
                k = bisect.bisect_right(starts, s) - 1
                tag = token_tags[k]
                if s != starts[k] and tag != "O":
                    tag = "I-" + entity_type(tag)
                labels[pos_] = index.get(tag, index.get("O", 0))
            out.append((enc, labels))
        return out

    # ------------------------------------------------------------------ answers

    def entities(self, t: Tagged) -> list[dict]:
        names = [self.labels[i] for i in t.tags]
        out = []
        for kind, a, b in merge(names):
            start, end = t.spans[a][0], t.spans[b][1]
            out.append(
                {
                    "text": t.text[start:end],
                    "label": kind,
                    "start": start,
                    "end": end,
                    "score": float(np.mean(t.scores[a : b + 1])),
                }
            )
        return out

    def postprocess(self, output: Tagged, params: dict) -> dict:
        return {"entities": self.entities(output)}

    def scored(self, response: dict) -> list[tuple[str, float]]:
        return [(e["label"], e["score"]) for e in response["entities"]]

    def example_answer(self) -> dict:
        kind = self.types[0] if self.types else "PER"
        return {
            "entities": [
                {"text": "Angela Merkel", "label": kind, "start": 0, "end": 13, "score": 0.99}
            ]
        }

    def answer_key(self, output: Tagged):
        return tuple((e["label"], e["start"], e["end"]) for e in self.entities(output))

    # ------------------------------------------------------------------ evaluation

    def gold(self, target: dict) -> list[str]:
        return target["tags"]

    def token_tags(self, t: Tagged) -> list[str]:
        """The predicted tag of each whitespace-separated token of the text (the data's
        tokens): the tag of the word that starts where the token starts."""
        by_start = {s: self.labels[tag] for (s, _), tag in zip(t.spans, t.tags, strict=True)}
        out, pos = [], 0
        for token in t.text.split(" "):
            if token:
                out.append(by_start.get(pos, "O"))
            pos += len(token) + 1
        return out

    def score(self, outputs: Sequence[Tagged], targets: Sequence[list[str]]) -> dict:
        """Entity-level micro and per-type precision, recall and F1 by seqeval's rules."""
        from tasks.metrics import entity_scores

        pred = [self.token_tags(t) for t in outputs]
        gold = [list(g) for g in targets]
        for p, g in zip(pred, gold, strict=True):
            if len(p) != len(g):
                raise ValueError(f"{len(p)} predicted tags for {len(g)} tokens")
        return entity_scores(gold, pred)

    # ------------------------------------------------------------------ drift

    def drift_samples(self, outputs: Sequence[Tagged], embedding, stats) -> Samples:
        pred, conf, count = [], [], []
        none = len(self.types)
        for t in outputs:
            ents = self.entities(t)
            kinds = [e["label"] for e in ents]
            # The text's dominant entity type (ties: the first to appear), or "none".
            top = max(kinds, key=kinds.count) if kinds else None
            pred.append(self.types.index(top) if top in self.types else none)
            conf.append(float(np.mean(t.scores)) if t.scores else 1.0)
            count.append(len(ents))
        return Samples(
            np.asarray(pred),
            np.asarray(conf),
            embedding,
            np.asarray(stats["tokens"]),
            np.asarray(count),
        )

    def drift_categories(self) -> int:
        return len(self.types) + 1

    # ------------------------------------------------------------------ export and OIP

    def parity_lengths(self) -> list[int | None]:
        max_len = int(self.pre["max_length"])
        return [None] + sorted({min(8, max_len), max_len})

    def warm_items(self):
        long = " ".join(["warm up"] * 512)
        return self.windowed(Prepared("warm up")), self.windowed(Prepared(long))

    def oip_outputs(self) -> list[Output]:
        return [Output("entities", "BYTES")]

    def oip_items(self, tensors):
        return [utf8(v, "text") for v in super().oip_items(tensors)]

    def oip_tensors(self, outputs, responses) -> dict:
        return {"entities": [json.dumps(r["entities"]) for r in responses]}
