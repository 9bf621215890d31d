"""Speech recognition (DESIGN.md §0): a clip of any length in, its transcript out, with the
seconds each chunk covers. Numpy only; the decoding loop is tasks/decoding.py.

    task = tasks.create(card, tokenizer=Tokenizer.from_file(".../tokenizer/tokenizer.json"))
    item = task.decode(base64_audio)
    answers = task.run(graphs, [item, ...])   # graphs.encode(feeds), graphs.step(feeds)

A clip longer than the model's window (Whisper: 30 s) is cut into windows that overlap by
`overlap_seconds`; each window is transcribed alone, and neighbours are joined where their
token sequences agree best inside the overlap (the longest-common-sequence merge of Hugging
Face's ASR pipeline), the left window's tokens kept up to the middle of that agreement and
the right's after it, so no word is repeated or lost. Each chunk of the answer owns the
seconds from the middle of its left overlap to the middle of its right one: the chunks
tile the clip from 0 to its duration.

Answer: `{"text", "chunks": [{"text", "start", "end"}]}` (Hugging Face's ASR pipeline with
timestamps). Metrics: WER and CER by jiwer on Whisper's English normaliser's output (so
`MISTER QUILTER` and `Mister Quilter.` are the same words). Drift: confidence = exp(mean
token log-probability); input = duration; features: words per second, the no-speech
probability, loudness.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

from tasks.audio import HOP, SAMPLE_RATE, log_mel, loudness_db, read_audio, wav_bytes
from tasks.base import Output, Task, utf8
from tasks.common import Prepared, encoded_bytes, softmax
from tasks.decoding import Layout, Sequence, decode_all
from tasks.drift import FEATURE, Samples
from tasks.errors import InputError

FEATURES = "input_features"
MAX_BEAMS = 1  # greedy only for now: num_beams > 1 is refused with a 400
WPS, NO_SPEECH, LOUDNESS = "words_per_second", "no_speech", "loudness"


@dataclass(frozen=True, slots=True)
class Speech:
    """A decoded clip: mono float32 samples at SAMPLE_RATE and its loudness."""

    wave: np.ndarray
    loudness_db: float

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE

    @property
    def nbytes(self) -> int:
        return self.wave.nbytes


@dataclass(frozen=True)
class Window:
    """One window of a clip: its samples [start, stop) and the seconds it owns."""

    start: int
    stop: int
    own_start: float
    own_end: float


def windows(n_samples: int, window: int, overlap: int) -> list[Window]:
    """Windows of `window` samples every `window - overlap`; owned seconds tile the clip."""
    step = window - overlap
    n = 1 if n_samples <= window else 1 + math.ceil((n_samples - window) / step)
    out = []
    for k in range(n):
        start = k * step
        own_start = 0.0 if k == 0 else (start + overlap / 2) / SAMPLE_RATE
        own_end = (
            n_samples / SAMPLE_RATE if k == n - 1 else ((k + 1) * step + overlap / 2) / SAMPLE_RATE
        )
        out.append(Window(start, min(start + window, n_samples), own_start, own_end))
    return out


def merge_overlap(left: list[int], right: list[int]) -> tuple[int, int]:
    """(tokens of `left` kept, tokens of `right` dropped) where `right` starts inside the end
    of `left`: the alignment with the most equal tokens (at least two), cut at its middle."""
    best, cut = 0.0, (len(left), 0)
    for i in range(1, min(len(left), len(right)) + 1):
        a, b = left[len(left) - i :], right[:i]
        matches = sum(x == y for x, y in zip(a, b, strict=True))
        score = matches / i + i / 10_000  # ties: the longer agreement
        if matches > 1 and score > best:
            best, cut = score, (len(left) - i + i // 2, i // 2)
    return cut


@dataclass
class Transcript:
    """One input's decoding: per window its sequence, merged into the answer."""

    item: Prepared
    spans: list[Window]
    seqs: list[Sequence]
    embedding: np.ndarray  # mean of the windows' pooled encoder states


class SpeechRecognition(Task):
    name = "speech-recognition"
    heavy_inputs = decode_in_threads = True
    generative = True
    metric = "wer"
    lower_is_better = True
    checks = (
        "confidence",
        "embedding",
        "input",
        FEATURE + WPS,
        FEATURE + NO_SPEECH,
        FEATURE + LOUDNESS,
    )
    params = {"max_new_tokens": int, "num_beams": int, "language": str, "task": str}
    oip_input_names = ("AUDIO", "INPUT")
    # Two graphs (export/seq2seq.py): the encoder's outputs are these and, per decoder layer,
    # cross_key_{i} / cross_value_{i} [batch, heads, frames_out, d] (Layout.names("cross"));
    # the decoder's are `logits` [batch, tokens, vocab] and present_key_{i} / present_value_{i}.
    onnx_outputs = {"pooled_embedding": {0: "batch"}}

    def __init__(self, spec, tokenizer=None, limits=None):
        super().__init__(spec, tokenizer, limits)
        gen = self.pre["generation"]
        self.layout = Layout.of(gen)
        self.gen = gen
        self.window = int(round(float(self.pre["window_seconds"]) * SAMPLE_RATE))
        self.overlap = int(round(float(self.pre["overlap_seconds"]) * SAMPLE_RATE))
        self.n_mels = int(self.pre.get("n_mels", 80))

    @property
    def example_input(self) -> str:
        t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
        return base64.b64encode(wav_bytes(0.3 * np.sin(2 * np.pi * 440 * t))).decode()

    # ------------------------------------------------------------------ requests

    def decode(self, value, max_seconds: float | None = None) -> Prepared:
        """A request's clip (at most `max_audio_seconds`; a 413 beyond), its windows as cost."""
        limit = self.limits.max_audio_seconds if max_seconds is None else max_seconds
        wave = read_audio(encoded_bytes(value, "audio"), limit)
        n = len(windows(len(wave), self.window, self.overlap))
        return Prepared(Speech(wave, loudness_db(wave)), cost=n)

    def from_holdout(self, value) -> Prepared:
        """A clip of the data (validation, test, holdout): no request limit on its length."""
        return self.decode(str(value), math.inf)

    def check_params(self, params: dict) -> dict:
        given = super().check_params(params)
        out = {"max_new_tokens": int(self.gen["max_new_tokens"])}
        if "max_new_tokens" in given:
            m = given["max_new_tokens"]
            if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= out["max_new_tokens"]:
                raise InputError(
                    "bad_max_new_tokens",
                    f"max_new_tokens must be an integer in [1, {out['max_new_tokens']}], got {m!r}",
                )
            out["max_new_tokens"] = m
        beams = given.get("num_beams", 1)
        if isinstance(beams, bool) or not isinstance(beams, int) or not 1 <= beams <= MAX_BEAMS:
            raise InputError(
                "bad_num_beams", f"num_beams must be an integer in [1, {MAX_BEAMS}], got {beams!r}"
            )
        out["prompt"] = self.prompt(given.get("language"), given.get("task", "transcribe"))
        return out

    def prompt(self, language: str | None, task: str = "transcribe") -> list[int]:
        """The decoder's start tokens: start of transcript, [language, task,] no timestamps.
        `task`: transcribe, or translate (into English; multilingual models)."""
        gen = self.gen
        langs = gen.get("languages") or {}
        if task not in ("transcribe", "translate"):
            raise InputError("bad_task", f"task must be transcribe or translate, got {task!r}")
        if task == "translate" and not langs:
            raise InputError("bad_task", "this model is English-only: it does not translate")
        if language is None:
            lang = gen.get("language")
        elif not langs:
            raise InputError("bad_language", "this model is English-only: it takes no language")
        elif language not in langs:
            raise InputError(
                "bad_language",
                f"unknown language {language!r}; known: {', '.join(sorted(langs)[:20])}, ...",
            )
        else:
            lang = language
        ids = [int(gen["start_id"])]
        if langs and lang:
            ids += [int(langs[lang]), int(gen[f"{task}_id"])]
        return ids + [int(gen["no_timestamps_id"])]

    # ------------------------------------------------------------------ the model

    def features(self, items) -> tuple[np.ndarray, list[list[Window]]]:
        """Log-mel features of every window of every item [windows, mels, frames]."""
        spans = [windows(len(i.value.wave), self.window, self.overlap) for i in items]
        feats = [
            log_mel(i.value.wave[w.start : w.stop], self.window, self.n_mels)
            for i, ws in zip(items, spans, strict=True)
            for w in ws
        ]
        return np.stack(feats), spans

    def start(self, items, encoded: dict, spans, params: list[dict]) -> list[Transcript]:
        """Sequences to decode from the encoder's outputs (rows in window order)."""
        out, row = [], 0
        cross_names = self.layout.names("cross")
        for item, ws, p in zip(items, spans, params, strict=True):
            seqs = []
            for _ in ws:
                cross = [encoded[n][row] for n in cross_names]
                seqs.append(
                    Sequence(
                        (len(out), len(seqs)), list(p["prompt"]), p["max_new_tokens"], cross=cross
                    )
                )
                row += 1
            emb = encoded["pooled_embedding"][row - len(ws) : row].mean(axis=0)
            out.append(Transcript(item, ws, seqs, emb))
        return out

    def begin(self, graphs, items, params: list[dict], max_batch: int) -> list[Transcript]:
        """Every window of `items` encoded (at most `max_batch` per encoder call), as the
        transcripts whose sequences are still to decode (run, and the service's Generator)."""
        feats, spans = self.features(items)
        encoded = {}
        for i in range(0, len(feats), max_batch):  # the encoder at the decoder's batch size
            part = graphs.encode({FEATURES: feats[i : i + max_batch]})
            for k, v in part.items():
                encoded.setdefault(k, []).append(v)
        encoded = {k: np.concatenate(v) for k, v in encoded.items()}
        return self.start(items, encoded, spans, params)

    def run(self, graphs, items, stats=None, params=None, max_batch: int = 16):
        """Transcripts of a batch of items: encode every window, decode them together."""
        params = params or [self.check_params({}) for _ in items]
        transcripts = self.begin(graphs, items, params, max_batch)
        decode_all(self.layout, graphs.step, [s for t in transcripts for s in t.seqs], max_batch)
        if stats is not None:
            stats["duration"] = [i.value.seconds for i in items]
        return transcripts, np.stack([t.embedding for t in transcripts])

    def postprocess(self, output: Transcript, params: dict) -> dict:
        tokens = [s.tokens for s in output.seqs]
        keep = [[0, len(t)] for t in tokens]
        for k in range(1, len(tokens)):
            kept, dropped = merge_overlap(tokens[k - 1][keep[k - 1][0] :], tokens[k])
            keep[k - 1][1] = keep[k - 1][0] + kept
            keep[k][0] = dropped
        chunks = []
        for w, t, (a, b) in zip(output.spans, tokens, keep, strict=True):
            chunks.append(
                {
                    "text": self._text(t[a:b]).strip(),
                    "start": round(w.own_start, 3),
                    "end": round(w.own_end, 3),
                }
            )
        text = self._text([tok for t, (a, b) in zip(tokens, keep, strict=True) for tok in t[a:b]])
        return {"text": text.strip(), "chunks": chunks}

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def answer_key(self, output: Transcript):
        return tuple(tuple(s.tokens) for s in output.seqs)

    def scored(self, response: dict) -> list[tuple[str, float]]:
        return []

    # ------------------------------------------------------------------ metrics, drift

    def gold(self, target: dict):
        return target["text"] if isinstance(target, dict) else str(target)

    def target(self, label, raw_target):
        import json

        return self.gold(json.loads(raw_target))

    def score(self, outputs, targets) -> dict:
        hyp = [self.postprocess(o, {})["text"] for o in outputs]
        from tasks.metrics import error_rates

        return error_rates(hyp, list(targets))

    def no_speech(self, output: Transcript) -> float:
        """Probability of the no-speech token at the start position (Whisper's
        `no_speech_prob`), of the first window."""
        ns = self.gen.get("no_speech_id")
        first = output.seqs[0].first_logits
        if ns is None or first is None:
            return 0.0
        return float(softmax(first[0])[int(ns)])

    def drift_samples(self, outputs, embedding, stats) -> Samples:
        n = len(outputs)
        conf = np.array([math.exp(np.mean([s.mean_logprob for s in o.seqs])) for o in outputs])
        secs = np.array([max(o.item.value.seconds, 1e-3) for o in outputs])
        words = np.array([len(self.postprocess(o, {})["text"].split()) for o in outputs])
        features = np.column_stack(
            [
                words / secs,
                [self.no_speech(o) for o in outputs],
                [o.item.value.loudness_db for o in outputs],
            ]
        )
        s = Samples(np.zeros(n, dtype=np.int64), conf, np.asarray(embedding), secs)
        s.features, s.kinds = features, ("numeric",) * 3
        return s

    def drift_categories(self) -> int:
        return 1

    def input_summary(self, clips: list[Speech]) -> dict:
        """The card's reference input statistics (export, on the holdout)."""
        from tasks.common import quantile_hist

        return {
            "duration_seconds": quantile_hist([c.seconds for c in clips]),
            "loudness_db": quantile_hist([c.loudness_db for c in clips]),
        }

    def warm_items(self):
        rng = np.random.default_rng(0)
        long = (0.1 * rng.standard_normal(self.window)).astype(np.float32)
        short = np.zeros(HOP * 10, dtype=np.float32)
        return Prepared(Speech(short, loudness_db(short))), Prepared(
            Speech(long, loudness_db(long))
        )

    def example_answer(self) -> dict:
        return {
            "text": "hello world",
            "chunks": [{"text": "hello world", "start": 0.0, "end": 1.2}],
        }

    # ------------------------------------------------------------------ Open Inference Protocol

    def oip_items(self, tensors: dict[str, list]) -> list:
        values = super().oip_items(tensors)
        return [v if isinstance(v, bytes | bytearray) else utf8(v, "audio") for v in values]

    def oip_outputs(self) -> list[Output]:
        return [Output("text", "BYTES"), Output("chunks", "BYTES")]

    def oip_tensors(self, outputs, responses: list[dict]) -> dict:
        import json

        return {
            "text": [r["text"] for r in responses],
            "chunks": [json.dumps(r["chunks"]) for r in responses],
        }
