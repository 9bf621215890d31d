"""The task contract (DESIGN.md §0): what every stage asks of a task, torch-free.

A task is built from a card (or a checkpoint's config, which has the same fields):
`labels`, `preprocessing`, optional `postprocessing`; text tasks also get the tokenizer file.

    task = tasks.create(card, tokenizer="artifacts/x/v1/tokenizer/tokenizer.json")
    item = task.decode(request_value)              # validated raw input, InputError on misuse
    outputs, embedding = task.run(session_run, [item, ...], stats)   # one batch
    task.postprocess(outputs[i], params)           # the API's answer for one input
    task.drift_samples(outputs, embedding, stats)  # per-sample drift statistics
    task.score(outputs, targets)                   # the task's metrics on labelled inputs

`session_run(feeds) -> [arrays]` is ONNX Runtime's `session.run(None, feeds)` in the service
and export, and the PyTorch model in fine-tuning: the same pre- and post-processing around
either.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tasks.common import Prepared
from tasks.drift import CHECKS, Samples
from tasks.errors import InputError

DEFAULT_TEXT_CHARS = 20_000  # characters per text of a model that records no limit of its own
SessionRun = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Limits:
    """Request limits a task enforces while it decodes an input (service settings)."""

    max_image_pixels: int = 40_000_000
    max_text_chars: int = 0  # 0: the model's own (`preprocessing.max_text_chars`); else a cap
    max_audio_seconds: float = 60.0
    max_output_pixels: int = 4_194_304  # masks and drawn images in answers, scaled to fit


@dataclass(frozen=True)
class Output:
    """One Open Inference Protocol output: name, datatype and shape per input (-1: varies)."""

    name: str
    datatype: str  # FP32, INT64 or BYTES
    shape: tuple[int, ...] = ()  # per-input dimensions after the batch axis


class Task:
    """Base class: one subclass per task, registered by name in `tasks/__init__.py`."""

    name = ""
    heavy_inputs = False  # images or audio: decoded from files (uploads, pixel work)
    generative = False  # answers decoded token by token (tasks/decoding.py, two graphs)
    decode_in_threads = False  # decode is CPU-heavy: the service runs it off the event loop
    heavy_outputs = False  # postprocess draws or resizes images: also off the event loop
    checks: tuple[str, ...] = CHECKS  # drift checks (tasks/drift.py)
    metric = "accuracy"  # the primary metric: early stopping default, variant gates
    onnx_outputs: dict[str, dict[int, str]] = {}  # ONNX output name → dynamic axes
    oip_input_names: tuple[str, ...] = ("INPUT",)  # one name: any single tensor is taken
    oip_numeric_inputs: dict[str, int] = {}  # FP32 [n, k] tensors taken: name → k (tables)
    params: dict[str, type] = {}  # request fields beyond `inputs` (top_k, ...)
    example_input: object = "a text"

    def __init__(self, spec: dict, tokenizer=None, limits: Limits | None = None):
        self.labels = list(spec["labels"])
        self.pre = spec["preprocessing"]
        self.post = {**self.default_postprocessing(), **(spec.get("postprocessing") or {})}
        self.limits = self.served_limits(limits or Limits())
        self.tokenizer = tokenizer
        self.input_names = [i["name"] for i in spec["inputs"]] if "inputs" in spec else None

    def served_limits(self, limits: Limits) -> Limits:
        """`limits` with the text limit resolved: the model's (what it was trained to take,
        recorded by fine-tuning; cards before it: DEFAULT_TEXT_CHARS), capped by the setting."""
        own = int(self.pre.get("max_text_chars") or DEFAULT_TEXT_CHARS)
        cap = limits.max_text_chars
        return dataclasses.replace(limits, max_text_chars=min(own, cap) if cap else own)

    def names(self) -> list[str]:
        """The model's input names: the card's, or the checkpoint's preprocessing."""
        return self.input_names or list(self.pre["input_names"])

    # ------------------------------------------------------------------ contract

    @classmethod
    def default_postprocessing(cls) -> dict:
        return {}

    def decode(self, value) -> Prepared:
        raise NotImplementedError

    def from_holdout(self, value) -> Prepared:
        """A holdout input (checkpoint holdout.npz) as a prepared item."""
        return self.decode(str(value))

    @staticmethod
    def holdout_request(value):
        """A holdout input as a client sends it in `inputs` (benchmarks, replays)."""
        return str(value)

    def run(
        self, session_run: SessionRun, items: Sequence[Prepared], stats: dict | None = None
    ) -> tuple[Sequence, np.ndarray]:
        """Per-item outputs (indexable) and the pooled embeddings [n, dim] of a batch."""
        raise NotImplementedError

    def postprocess(self, output, params: dict) -> dict:
        raise NotImplementedError

    def check_params(self, params: dict) -> dict:
        """Request fields beyond `inputs`, validated (400 naming the field); None = absent."""
        given = {k: v for k, v in params.items() if v is not None}
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise InputError(
                "bad_request",
                f"{', '.join(unknown)} does not apply to a {self.name} model "
                f"(fields: inputs{''.join(', ' + p for p in self.params)})",
            )
        return given

    def example_params(self) -> dict:
        """Request fields of the API docs' example request."""
        return {}

    def example_answer(self) -> dict:
        """An illustrative answer for the API docs (scores made up)."""
        raise NotImplementedError

    def scored(self, response: dict) -> list[tuple[str, float]]:
        """(label, score) pairs of one answer for the prediction counters and histogram."""
        return [(response["label"], response["score"])]

    def drift_samples(self, outputs, embedding: np.ndarray, stats: dict) -> Samples:
        raise NotImplementedError

    def input_text(self, item: Prepared) -> str:
        """The text whose tokens the input statistics count (text tasks)."""
        return str(item.value)

    def agreement(self, a: Sequence, b: Sequence) -> float:
        """Share of inputs whose answers agree between two runs (fp32 and a variant)."""
        same = [self.answer_key(a[i]) == self.answer_key(b[i]) for i in range(len(a))]
        return float(np.mean(same)) if same else 1.0

    def answer_key(self, output):
        """What must be equal for two outputs to give the same answer."""
        raise NotImplementedError

    def item_correct(self, outputs: Sequence, targets: Sequence) -> np.ndarray | None:
        """Per input, whether the answer is right (the paired variant gate); None where the
        task's metric is not a mean over inputs."""
        return None

    def drift_prior(self, train_per_class: dict[str, int]) -> list[float] | None:
        """Reference shares of the prediction check; None = measured on the holdout."""
        return None

    def drift_categories(self) -> int:
        return len(self.labels)

    def score(self, outputs: Sequence, targets: Sequence) -> dict:
        """The task's metrics of outputs against labelled targets; `metric` among them."""
        raise NotImplementedError

    def target(self, label: int, raw_target: str | None):
        """A holdout target: the class index, or the gold of the task's JSON target."""
        return int(label) if raw_target is None else self.gold(json.loads(raw_target))

    def gold(self, target: dict):
        """What `score` compares with, from a data set's target (entity tags, answers)."""
        return target

    # ------------------------------------------------------------------ export helpers

    def parity_feeds(self, items: Sequence[Prepared], length: int | None) -> dict:
        """Model inputs for a parity check; `length` pads every text to that many tokens."""
        raise NotImplementedError

    def parity_lengths(self) -> list[int | None]:
        return [None]

    def warm_items(self) -> tuple[Prepared, Prepared]:
        """A short and a long input for the warm-up."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Open Inference Protocol

    def oip_outputs(self) -> list[Output]:
        raise NotImplementedError

    def oip_items(self, tensors: dict[str, list]) -> list:
        """Raw request values from the named input tensors (values: str or bytes)."""
        if len(tensors) != 1:
            raise InputError("bad_request", "send exactly one input tensor in 'inputs'")
        values = next(iter(tensors.values()))
        if isinstance(values, np.ndarray):
            raise InputError("wrong_type", f"a {self.name} model takes a BYTES input tensor")
        return list(values)

    def oip_tensors(self, outputs: Sequence, responses: list[dict]) -> dict:
        """name → numpy array or list of str (BYTES), first axis the inputs."""
        raise NotImplementedError


def top_k_param(given: dict) -> dict:
    """The request's `top_k` (default 1), a positive integer (classifiers)."""
    top_k = given.get("top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError("bad_top_k", f"top_k must be a positive integer, got {top_k!r}")
    return {"top_k": top_k}


def utf8(value, what: str) -> str:
    """A BYTES element as text."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("bad_text", f"a BYTES {what} element is not UTF-8") from None
    return value
