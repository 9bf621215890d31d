"""Extractive question answering, DESIGN.md §0.

The question and the context go in as a pair; a context longer than `max_length` is cut
into windows overlapping by `stride` tokens, each with the whole question. The answer is the
best span over all windows (start <= end, at most `max_answer_length` tokens, inside the
context) by the windows' start and end log-probabilities; with `allow_no_answer` (SQuAD v2)
the empty answer wins when its score beats every span. Offsets index the context.

ONNX outputs `start_logits`, `end_logits` [batch, sequence] and `pooled_embedding`; the API
answers {"answer", "score", "start", "end"}; OIP inputs `question` and `context` (BYTES),
outputs `answer` (BYTES), `score` (FP32), `start` and `end` (INT64).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.base import Output, utf8
from tasks.common import Prepared, check_text
from tasks.drift import Samples
from tasks.errors import InputError
from tasks.text_windows import WindowedTask, windows

TOP_N = 20  # start and end candidates per window (Hugging Face's pipeline uses 20 too)


@dataclass
class Span:
    answer: str
    score: float
    start: int  # character offsets into the context
    end: int


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def best_span(start: np.ndarray, end: np.ndarray, allowed: np.ndarray, max_len: int):
    """(score, s, e) of the best span of allowed positions, s <= e < s + max_len, by
    start[s] + end[e] (log-probabilities); None when no span is allowed."""
    idx = np.flatnonzero(allowed)
    if not len(idx):
        return None
    starts = idx[np.argsort(-start[idx])[:TOP_N]]
    ends = idx[np.argsort(-end[idx])[:TOP_N]]
    best = None
    for s in starts:
        for e in ends:
            if s <= e < s + max_len:
                score = start[s] + end[e]
                if best is None or score > best[0]:
                    best = (float(score), int(s), int(e))
    return best


class QuestionAnswering(WindowedTask):
    name = "question-answering"
    metric = "f1"
    checks = ("confidence", "embedding", "input")
    pair, content_sequence = True, 1  # (question, context); the context is the input's text
    oip_input_names = ("question", "context")
    onnx_outputs = {
        "start_logits": {0: "batch", 1: "sequence"},
        "end_logits": {0: "batch", 1: "sequence"},
        "pooled_embedding": {0: "batch"},
    }
    example_input = {
        "question": "Where do water droplets collide with ice crystals?",
        "context": "Precipitation forms as smaller droplets coalesce via collision with other "
        "rain drops or ice crystals within a cloud.",
    }

    @classmethod
    def default_postprocessing(cls) -> dict:
        return {"max_answer_length": 30, "allow_no_answer": False}

    # ------------------------------------------------------------------ inputs

    def decode(self, value) -> Prepared:
        if not isinstance(value, dict):
            raise InputError(
                "wrong_type",
                'question-answering inputs are objects {"question": ..., "context": ...}, '
                f"got {type(value).__name__}",
            )
        missing = [k for k in ("question", "context") if k not in value]
        if missing:
            raise InputError("missing_field", f"input has no {' and no '.join(missing)}")
        extra = sorted(set(value) - {"question", "context"})
        if extra:
            raise InputError("bad_request", f"unknown field(s) {', '.join(extra)}")
        q = check_text(value["question"], self.limits.max_text_chars, "question")
        c = check_text(value["context"], self.limits.max_text_chars, "context")
        self.check_question(q)
        return self.windowed(Prepared((q, c)))

    def max_question_tokens(self) -> int:
        """Every window holds the whole question, its special tokens and `stride` tokens of
        context overlap, with room for at least one new context token."""
        specials = self.tokenizer.post_processor.num_special_tokens_to_add(True)
        return int(self.pre["max_length"]) - specials - int(self.pre.get("stride", 0)) - 1

    def check_question(self, question: str) -> None:
        """A question too long for the windows is this input's 413 (the tokenizer would
        panic inside the batch)."""
        if self.tokenizer is None or self.tokenizer.post_processor is None:
            return
        length = int(self.pre["max_length"])
        try:
            n = len(self.tokenizer.encode(question, add_special_tokens=False).ids)
        except Exception:  # past max_length, pair truncation asks for the context: too long
            n = length + 1
        limit = self.max_question_tokens()
        if n > limit:
            shown = f"more than {length}" if n > length else str(n)
            raise InputError(
                "question_too_long",
                f"question has {shown} tokens; this model reads at most {limit} (max_length "
                f"{self.pre['max_length']} minus special tokens and the stride of "
                f"{self.pre.get('stride', 0)})",
                status=413,
            )

    def from_holdout(self, value) -> Prepared:
        return self.decode(json.loads(str(value)))

    @staticmethod
    def holdout_request(value) -> dict:
        return json.loads(str(value))

    def input_text(self, item: Prepared) -> str:
        return item.value[1]

    # ------------------------------------------------------------------ model

    def read(self, pair: tuple[str, str], wins: Sequence, outs: Sequence[list]) -> Span:
        context = pair[1]
        max_len = int(self.post["max_answer_length"])
        best, null = None, None
        for enc, (start_logits, end_logits, _) in zip(wins, outs, strict=True):
            n = len(enc.ids)
            in_context = np.array([s == 1 for s in enc.sequence_ids])
            allowed = in_context.copy()
            allowed[0] = True  # the first token ([CLS]) stands for "no answer"
            start = np.where(allowed, start_logits[:n], -np.inf)
            end = np.where(allowed, end_logits[:n], -np.inf)
            start, end = log_softmax(start), log_softmax(end)
            window_null = float(start[0] + end[0])
            null = window_null if null is None else min(null, window_null)
            span = best_span(start, end, in_context, max_len)
            if span is not None and (best is None or span[0] > best[0]):
                best = (*span, enc)
        no_answer = best is None or (
            self.post["allow_no_answer"] and null is not None and null > best[0]
        )
        if no_answer:
            return Span("", float(np.exp(null)) if null is not None else 0.0, 0, 0)
        score, s, e, enc = best
        a, b = enc.offsets[s][0], enc.offsets[e][1]
        return Span(context[a:b], float(np.exp(score)), a, b)

    def training_windows(self, raw: str, target: dict):
        """Windows labelled with the first gold answer (SQuAD trains on one answer)."""
        item = json.loads(raw)
        answers, starts = target["answers"], target.get("starts", [])
        if not answers:
            return self.label_windows(item["question"], item["context"], None, "")
        return self.label_windows(item["question"], item["context"], starts[0], answers[0])

    def label_windows(self, question: str, context: str, answer_start: int | None, answer: str):
        """Training: each window with the token positions of the answer, or (0, 0) (the first
        token) when the answer is not wholly inside the window or there is none."""
        out = []
        a = answer_start
        b = None if a is None else a + len(answer)
        for enc in windows(self.tokenizer.encode(question, context)):
            s_tok = e_tok = 0
            if a is not None:
                ctx = [i for i, q in enumerate(enc.sequence_ids) if q == 1]
                if ctx and enc.offsets[ctx[0]][0] <= a and enc.offsets[ctx[-1]][1] >= b:
                    s_tok = next(i for i in ctx if enc.offsets[i][1] > a)
                    e_tok = next(i for i in reversed(ctx) if enc.offsets[i][0] < b)
            out.append((enc, (s_tok, e_tok)))
        return out

    # ------------------------------------------------------------------ answers

    def postprocess(self, output: Span, params: dict) -> dict:
        return {
            "answer": output.answer,
            "score": output.score,
            "start": output.start,
            "end": output.end,
        }

    def scored(self, response: dict) -> list[tuple[str, float]]:
        return [("answer" if response["answer"] else "no_answer", response["score"])]

    def example_answer(self) -> dict:
        return {"answer": "within a cloud", "score": 0.62, "start": 103, "end": 117}

    def answer_key(self, output: Span):
        return (output.start, output.end)

    def gold(self, target: dict) -> list[str]:
        return target["answers"]

    def score(self, outputs: Sequence[Span], targets: Sequence[list[str]]) -> dict:
        from tasks.metrics import squad_scores

        return squad_scores([o.answer for o in outputs], [list(t) for t in targets])

    # ------------------------------------------------------------------ drift

    def drift_samples(self, outputs: Sequence[Span], embedding, stats) -> Samples:
        n = len(outputs)
        return Samples(
            np.zeros(n, dtype=np.int64),
            np.array([o.score for o in outputs]),
            embedding,
            np.asarray(stats["tokens"], dtype=np.float64),
        )

    def drift_categories(self) -> int:
        return 1

    # ------------------------------------------------------------------ export and OIP

    def parity_lengths(self) -> list[int | None]:
        max_len = int(self.pre["max_length"])
        return [None] + sorted({min(16, max_len), max_len})

    def warm_items(self):
        short = self.windowed(Prepared(("what?", "warm up")))
        return short, self.windowed(Prepared(("what is warm?", " ".join(["warm up"] * 512))))

    def oip_outputs(self) -> list[Output]:
        return [
            Output("answer", "BYTES"),
            Output("score", "FP32"),
            Output("start", "INT64"),
            Output("end", "INT64"),
        ]

    def oip_items(self, tensors: dict[str, list]) -> list:
        names = set(tensors)
        if names != {"question", "context"}:
            raise InputError(
                "bad_request",
                f"send two BYTES inputs named 'question' and 'context'; got {sorted(names)}",
            )
        q, c = tensors["question"], tensors["context"]
        if len(q) != len(c):
            raise InputError(
                "bad_tensor", f"{len(q)} questions but {len(c)} contexts; send one per context"
            )
        return [
            {"question": utf8(a, "question"), "context": utf8(b, "context")}
            for a, b in zip(q, c, strict=True)
        ]

    def oip_tensors(self, outputs, responses) -> dict:
        return {
            "answer": [r["answer"] for r in responses],
            "score": np.array([r["score"] for r in responses], dtype=np.float32),
            "start": np.array([r["start"] for r in responses], dtype=np.int64),
            "end": np.array([r["end"] for r in responses], dtype=np.int64),
        }
