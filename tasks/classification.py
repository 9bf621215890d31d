"""Image and text classification: one label per input (DESIGN.md §0).

ONNX outputs `logits` [batch, classes] and `pooled_embedding` [batch, dim]; the API answers
{"label", "score", "top_k"}; OIP outputs `logits`, `probabilities` (FP32) and `label` (BYTES).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.base import Output, Task, top_k_param, utf8
from tasks.common import (
    Prepared,
    check_text,
    decode_image,
    encoded_bytes,
    encoding_columns,
    length_buckets,
    softmax,
    unknown_id,
)
from tasks.drift import Samples
from tasks.vision import ImageInput


class Classification(Task):
    """What image and text classification share: everything after the logits."""

    metric = "accuracy"
    params = {"top_k": int}
    onnx_outputs = {"logits": {0: "batch"}, "pooled_embedding": {0: "batch"}}

    def check_params(self, params: dict) -> dict:
        return top_k_param(super().check_params(params))

    def postprocess(self, output: np.ndarray, params: dict) -> dict:
        return self.describe(softmax(output), params.get("top_k", 1))

    def describe(self, p: np.ndarray, top_k: int = 1) -> dict:
        """Top-1 label and score and the top k, from one row of probabilities."""
        order = np.argsort(-p)[: max(1, min(top_k, len(self.labels)))]
        return {
            "label": self.labels[order[0]],
            "score": float(p[order[0]]),
            "top_k": [{"label": self.labels[i], "score": float(p[i])} for i in order],
        }

    def example_params(self) -> dict:
        return {"top_k": min(2, len(self.labels))}

    def example_answer(self) -> dict:
        top = self.labels[:2]
        scores = [0.9, 0.1][: len(top)]
        return {
            "label": top[0],
            "score": scores[0],
            "top_k": [{"label": lb, "score": s} for lb, s in zip(top, scores, strict=True)],
        }

    def drift_samples(self, outputs, embedding, stats) -> Samples:
        return Samples.from_logits(np.asarray(outputs), embedding, self.drift_input(stats))

    def drift_input(self, stats: dict) -> list:
        raise NotImplementedError

    def drift_prior(self, train_per_class: dict[str, int]) -> list[float]:
        total = sum(train_per_class.values())
        return [train_per_class.get(c, 0) / total for c in self.labels]

    def answer_key(self, output) -> int:
        return int(np.argmax(output))

    def item_correct(self, outputs, targets) -> np.ndarray:
        return np.array(
            [self.answer_key(o) == int(t) for o, t in zip(outputs, targets, strict=True)]
        )

    def score(self, outputs, targets) -> dict:
        from tasks.metrics import classification_metrics

        pred = np.asarray(outputs).argmax(1)
        m = classification_metrics(np.asarray(targets), pred, self.labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    def oip_outputs(self) -> list[Output]:
        n = len(self.labels)
        return [
            Output("logits", "FP32", (n,)),
            Output("probabilities", "FP32", (n,)),
            Output("label", "BYTES"),
        ]

    def oip_tensors(self, outputs, responses) -> dict:
        logits = np.asarray(outputs, dtype=np.float32)
        probs = softmax(logits).astype(np.float32)
        return {
            "logits": logits,
            "probabilities": probs,
            "label": [self.labels[i] for i in probs.argmax(1)],
        }


class ImageClassification(ImageInput, Classification):
    name = "image-classification"

    def decode(self, value) -> Prepared:
        value = encoded_bytes(value, "image")
        pre = self.pre
        return decode_image(
            value,
            self.limits.max_image_pixels,
            int(pre["resize"]),
            int(pre["crop_size"]),
            pre["interpolation"],
        )

    def from_holdout(self, value) -> Prepared:
        return Prepared(np.asarray(value, dtype=np.uint8))  # already resized and cropped

    def run(self, session_run, items, stats=None):
        logits, embedding = session_run(self.feeds(items, stats))
        return logits, embedding

    def drift_input(self, stats: dict) -> list:
        return stats["brightness"]

    def warm_items(self):
        c = int(self.pre["crop_size"])
        item = Prepared(np.full((c, c, 3), 127, dtype=np.uint8))
        return item, item

    def oip_items(self, tensors):
        return super().oip_items(tensors)  # raw bytes (binary) or base64 strings (JSON)


class TextClassification(Classification):
    name = "text-classification"
    example_input = "an example text to classify"

    def __init__(self, spec, tokenizer=None, limits=None):
        super().__init__(spec, tokenizer, limits)
        self.unk_id = unknown_id(tokenizer) if tokenizer is not None else None
        # Long documents: up to `windows` windows of max_length tokens (overlapping by
        # `stride`), whose logits and embeddings are averaged (= the linear head on the mean
        # pooled embedding). 1 (and cards without the field): cut at max_length.
        self.max_windows = int(self.pre.get("windows", 1))
        self.windowed = None
        if tokenizer is not None and self.max_windows > 1:
            from tokenizers import Tokenizer

            from tasks.text_windows import window_tokenizer

            self.windowed = window_tokenizer(Tokenizer.from_str(tokenizer.to_str()), self.pre)

    def decode(self, value) -> Prepared:
        return Prepared(check_text(value, self.limits.max_text_chars))

    def from_holdout(self, value) -> Prepared:
        return Prepared(str(value))

    def feeds(self, items: Sequence[Prepared], stats: dict | None = None) -> dict:
        encs = self.tokenizer.encode_batch([i.value for i in items])
        if stats is not None:
            lengths = [sum(e.attention_mask) for e in encs]
            stats["tokens"] = lengths
            stats["truncated"] = sum(1 for e in encs if e.overflowing)
            stats["unknown_ratio"] = [
                e.ids.count(self.unk_id) / max(1, n) for e, n in zip(encs, lengths, strict=True)
            ]
        return encoding_columns(encs, self.names())

    def parity_feeds(self, items, length=None) -> dict:
        if length is None:
            return self.feeds(items)
        tok = self.tokenizer
        saved_trunc, saved_pad = tok.truncation, tok.padding
        tok.enable_truncation(length)
        tok.enable_padding(
            pad_id=saved_pad["pad_id"], pad_token=saved_pad["pad_token"], length=length
        )
        try:
            return self.feeds(items)
        finally:
            tok.enable_truncation(saved_trunc["max_length"])
            tok.enable_padding(pad_id=saved_pad["pad_id"], pad_token=saved_pad["pad_token"])

    def parity_lengths(self) -> list[int | None]:
        max_len = int(self.pre["max_length"])
        return [None] + sorted({min(8, max_len), min(32, max_len), max_len})

    def run(self, session_run, items, stats=None):
        if self.windowed is not None:
            return self.run_windows(session_run, items, stats)
        feeds = self.feeds(items, stats)
        # Texts of very different lengths padded together waste most of the compute (SMS:
        # 5 to 100+ tokens). Sorted by length, they run in chunks padded to their own longest.
        lengths = feeds["attention_mask"].sum(1)
        logits = embedding = None
        for idx in length_buckets(lengths):
            width = int(lengths[idx].max())
            lo, emb = session_run({k: v[idx, :width] for k, v in feeds.items()})
            if logits is None:
                logits = np.empty((len(items), lo.shape[1]), lo.dtype)
                embedding = np.empty((len(items), emb.shape[1]), emb.dtype)
            logits[idx], embedding[idx] = lo, emb
        return logits, embedding

    def text_windows(self, texts: Sequence[str]) -> tuple[list[list], int]:
        """Each text's first `max_windows` windows (`tokenizers` encodings, unpadded), and
        how many texts had more."""
        from tasks.text_windows import windows

        every = [windows(e) for e in self.windowed.encode_batch(list(texts))]
        cut = sum(1 for ws in every if len(ws) > self.max_windows)
        return [ws[: self.max_windows] for ws in every], cut

    def run_windows(self, session_run, items, stats=None):
        from tasks.text_windows import run_windows

        per_text, cut = self.text_windows([i.value for i in items])
        flat = [w for ws in per_text for w in ws]
        pad_id = int(self.tokenizer.padding["pad_id"])
        outs = run_windows(session_run, flat, self.names(), pad_id)
        logits, embedding, start = [], [], 0
        for ws in per_text:
            rows = outs[start : start + len(ws)]
            start += len(ws)
            logits.append(np.mean([r[0] for r in rows], axis=0))
            embedding.append(np.mean([r[1] for r in rows], axis=0))
        if stats is not None:
            lengths = [sum(sum(w.attention_mask) for w in ws) for ws in per_text]
            stats["tokens"] = lengths
            stats["truncated"] = cut
            stats["unknown_ratio"] = [
                sum(w.ids.count(self.unk_id) for w in ws) / max(1, n)
                for ws, n in zip(per_text, lengths, strict=True)
            ]
        return np.stack(logits), np.stack(embedding)

    def drift_input(self, stats: dict) -> list:
        return stats["tokens"]

    def warm_items(self):
        return Prepared("warm up"), Prepared(" ".join(["warm up"] * 512))

    def oip_items(self, tensors):
        return [utf8(v, "text") for v in super().oip_items(tensors)]
