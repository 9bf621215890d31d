"""Inference on one artifact with ONNX Runtime: no bentoml, no torch, so tests and benchmarks
call it directly.

    rt = Runtime(Path("artifacts/digits/v1"))
    item = rt.prepare(base64_png)           # validate + preprocess one input (InputError)
    rt.predict([item, ...], top_k=3)        # one batched model call

Pre-processing is built from card.json alone and matches training exactly: images are
decoded, converted to RGB, resized on the shorter side and centre-cropped with PIL, then
normalised; texts go through the artifact's own tokenizer (the `tokenizers` library).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tasks
from export.card import decoder_file, load_card, variant_file, verify_files
from export.errors import CardError
from service.errors import ArtifactError
from tasks.common import Prepared, brightness, length_buckets, softmax  # noqa: F401 (re-exported)
from tasks.decoding import OrtGraphs
from tasks.errors import UnknownTask

log = logging.getLogger("tuneserve")
GPU_PROVIDERS = {
    "TensorrtExecutionProvider": "libnvinfer.so",
    "CUDAExecutionProvider": "libcuda.so.1",
}


def _loadable(lib: str) -> bool:
    """A CUDA build of onnxruntime lists GPU providers even where no GPU driver exists."""
    for name in (lib, lib + ".10", lib + ".8"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def usable_providers(requested: str = "auto") -> list[str]:
    """TensorRT, then CUDA, then CPU, keeping only what can really run here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested != "auto":
        wanted = [p.strip() for p in requested.split(",") if p.strip()]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ArtifactError(
                f"TUNESERVE_PROVIDERS names {', '.join(missing)}, not available "
                f"in this onnxruntime ({', '.join(available)})"
            )
        return wanted
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    gpu = [p for p in order if p in available and _loadable(GPU_PROVIDERS[p])]
    return gpu + ["CPUExecutionProvider"]


def listed_precisions(card: dict, wanted: str, folder: Path) -> set[str]:
    """The precisions the card offers; ArtifactError when `wanted` is neither one nor auto."""
    listed = {"fp32"} | {v["precision"] for v in card["variants"]}
    if wanted != "auto" and wanted not in listed:
        raise ArtifactError(
            f"TUNESERVE_PRECISION={wanted}, but the card of '{folder}' "
            f"lists only {', '.join(sorted(listed))}"
        )
    return listed


@dataclass(frozen=True)
class RuntimeOptions:
    """How a Runtime loads its artifact and what requests it takes (service settings)."""

    precision: str = "auto"  # auto (int8 on CPU, fp16 on GPU when written), fp32, int8, fp16
    providers: str = "auto"  # auto (TensorRT, CUDA, CPU as usable) or a comma-separated list
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per core
    max_image_pixels: int = 40_000_000  # larger images are a 413
    max_text_chars: int = 0  # longer texts are a 413; 0: the model's own limit (card)
    max_audio_seconds: float = 60.0  # longer clips are a 413
    max_output_pixels: int = 4_194_304  # masks and drawings in answers are scaled to fit
    max_batch_size: int = 32  # items per batch (and per ONNX Runtime call until measured)
    load_model: bool = True  # False: only the card-driven pre-processing (validation tests)
    verify: bool = True  # False: skip the sha256 check when the caller has just made it
    warm: bool = True  # False: the caller runs warm_up() (the service, on its inference thread)


class Runtime:
    def __init__(self, folder: str | Path, options: RuntimeOptions | None = None, **overrides):
        """`options` (or its fields as keywords): how the model is loaded and what requests
        it takes; see RuntimeOptions."""
        opts = dataclasses.replace(options or RuntimeOptions(), **overrides)
        self.options = opts
        self.folder = Path(folder)
        try:
            self.card = load_card(self.folder)
            if opts.verify:
                verify_files(self.folder, self.card)
        except CardError as e:
            raise ArtifactError(str(e)) from e
        self.task, self.labels = self.card["task"], list(self.card["labels"])
        self.name, self.version = self.card["name"], self.card["version"]
        self.pre = self.card["preprocessing"]
        self.max_batch_size = opts.max_batch_size
        # Items per ONNX Runtime call (chunks of a larger batch): measured in warm_up for
        # decoded inputs on CPUs, where CNNs run fewer items/s in large batches (EfficientNet-
        # Lite0, one thread: 189/s at 2 to 4 images, 144/s at 32; bench/RESULTS.md).
        self.chunk = opts.max_batch_size
        self.pad_to_pow2 = False  # set on GPUs for images, see run()
        self.tokenizer = None
        try:
            if tasks.uses_tokenizer(self.task) or tasks.generates(self.task):
                folder = self.folder / self.pre.get("tokenizer", "tokenizer")
                self.tokenizer = tasks.load_tokenizer(folder, self.card)
            limits = tasks.Limits(
                opts.max_image_pixels,
                opts.max_text_chars,
                opts.max_audio_seconds,
                opts.max_output_pixels,
            )
            self.contract = tasks.create(self.card, self.tokenizer, limits)
        except (FileNotFoundError, UnknownTask) as e:
            raise ArtifactError(str(e)) from e
        # Inputs whose preparation is CPU-heavy (image decoding): the service runs it off the
        # event loop. Text preparation is a type check; tokenizing runs with the batch.
        self.heavy_inputs = self.contract.heavy_inputs
        self.session, self.provider, self.precision = None, None, None
        self.graphs = None  # generative tasks: encoder and decoder (tasks/decoding.py)
        if opts.load_model:
            self._load(opts.precision, opts.providers, opts.threads, opts.warm)

    def _load(self, precision: str, providers: str, threads: int, warm: bool) -> None:
        import onnxruntime as ort

        chain = usable_providers(providers)
        on_gpu = chain[0] != "CPUExecutionProvider"
        self.precision = self._precision(precision, on_gpu)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        path = self.folder / variant_file(self.card, self.precision)
        try:
            if self.contract.generative:  # the encoder and decoder graphs (DESIGN §0)
                decoder = self.folder / decoder_file(self.card, self.precision)
                self.graphs = OrtGraphs(path, decoder, chain, so.intra_op_num_threads)
                self.session = self.graphs.encoder
            else:
                self.session = ort.InferenceSession(str(path), so, providers=chain)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"cannot load '{path}' in onnxruntime: {e}") from e
        self.provider = self.session.get_providers()[0]
        if self.provider != chain[0]:  # a silent fallback is a bug: say it
            log.warning("asked for %s, onnxruntime runs %s", chain[0], self.provider)
        # cuDNN searches convolution algorithms for every new input shape, which stalled a
        # batch for seconds on an H100 (bench/RESULTS.md): image batches run padded to a power
        # of two, and each of those few shapes is searched once in warm_up.
        self.pad_to_pow2 = self.provider != "CPUExecutionProvider" and self.heavy_inputs
        if warm:
            self.warm_up()
        log.info(
            "serving %s:%s (%s) with %s, precision %s",
            self.name,
            self.version,
            self.task,
            self.provider,
            self.precision,
        )

    def _precision(self, wanted: str, on_gpu: bool) -> str:
        listed = listed_precisions(self.card, wanted, self.folder)
        if wanted == "auto":
            preferred = "fp16" if on_gpu else "int8"
            return preferred if preferred in listed else "fp32"
        return wanted

    def warm_up(self) -> list[tuple[int, float]]:
        """Calls across the batch range, up to the largest batch of the longest inputs, so the
        first requests are not slow and ONNX Runtime's memory arena is at its peak size from
        the start (it otherwise grew RSS by a fifth in the first minute of load). Returns
        (cost, seconds) of each call after a first untimed one (`Prepared.cost`: windowed
        texts count their tokens, so the long inputs' call prices long requests)."""
        short, long = self.contract.warm_items()
        if self.contract.generative:  # the decoding loop: its own batching (generation.py)
            t0 = time.perf_counter()
            self.predict([short, long])
            return [(short.cost + long.cost, time.perf_counter() - t0)]
        sizes = [1, 8]
        if self.pad_to_pow2:
            sizes = sorted({self.padded(k) for k in range(1, self.max_batch_size + 1)})
        self.predict([short])
        if self.heavy_inputs and self.provider == "CPUExecutionProvider":
            self.chunk = self.fastest_chunk(short)
        timings = []
        batches = [[short] * n for n in sizes]
        if long.cost != short.cost:  # priced apart (windowed texts' tokens): time it too, else
            batches.append([long] * self.max_batch_size)  # it would price every item as long
        else:
            self.predict([long] * self.max_batch_size)
        for batch in batches:
            t0 = time.perf_counter()
            self.predict(batch)
            timings.append((sum(item.cost for item in batch), time.perf_counter() - t0))
        return timings

    def fastest_chunk(
        self, item: Prepared, items_per_try: int = 32, tries: int = 2, max_call_s: float = 0.25
    ) -> int:
        """The batch size (a power of two up to max_batch_size) with the most items/s, the
        smallest of those within 3% of the best (less latency for the same throughput).
        Sizes stop doubling once one call takes `max_call_s` (Whisper on a 30-s window: about
        0.1 s per clip), so that start-up stays within seconds."""
        feeds = self.feeds([item] * self.max_batch_size)
        per_item = {}
        size = 1
        while size <= self.max_batch_size:
            part = {k: v[:size] for k, v in feeds.items()}
            calls = -(-items_per_try // size)
            best = float("inf")
            for _ in range(tries):
                t0 = time.perf_counter()
                for _ in range(calls):
                    self.session.run(None, part)
                best = min(best, (time.perf_counter() - t0) / (calls * size))
            per_item[size] = best
            if best * size > max_call_s:
                break
            size *= 2
        fastest = min(per_item.values())
        chunk = min(s for s, t in per_item.items() if t <= fastest * 1.03)
        log.info(
            "batch size measured: %d items per call (%s ms per item)",
            chunk,
            ", ".join(f"{s}: {t * 1000:.2f}" for s, t in per_item.items()),
        )
        return chunk

    # ------------------------------------------------------------------ inputs

    def prepare(self, value) -> Prepared:
        """Validate and pre-process one input (InputError naming the problem)."""
        return self.contract.decode(value)

    def feeds(self, items: list[Prepared], stats: dict | None = None) -> dict[str, np.ndarray]:
        """Model inputs of a classification batch; `stats`, when given, receives the cheap
        input statistics of DESIGN §4 (brightness and size; tokens, truncation, unknown)."""
        return self.contract.feeds(items, stats)

    # ------------------------------------------------------------------ model

    def padded(self, n: int) -> int:
        """The batch size `n` inputs run at: the next power of two on GPUs for images."""
        if not self.pad_to_pow2 or n >= self.max_batch_size:
            return n
        return min(1 << (n - 1).bit_length(), self.max_batch_size)

    def session_run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """ONNX Runtime on a batch, in calls of at most `chunk` items; outputs joined."""
        n = len(next(iter(feeds.values())))
        if n <= self.chunk:
            return self._session_run(feeds)
        parts = [
            self._session_run({k: v[s : s + self.chunk] for k, v in feeds.items()})
            for s in range(0, n, self.chunk)
        ]
        # Every task's outputs are batch-first (Task.onnx_outputs); the last part may be short.
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def _session_run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One ONNX Runtime call; image batches padded with copies of their first row."""
        n = len(next(iter(feeds.values())))
        if self.padded(n) > n:
            extra = self.padded(n) - n
            feeds = {
                k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in feeds.items()
            }
            return [o[:n] for o in self.session.run(None, feeds)]
        return self.session.run(None, feeds)

    def run(self, items: list[Prepared], stats: dict | None = None):
        """The task's per-item outputs (classification: logits [N, classes]) and the pooled
        embeddings [N, dim] of a batch (`stats`: the input statistics)."""
        if self.contract.generative:
            return self.contract.run(self.graphs, items, stats, max_batch=self.max_batch_size)
        return self.contract.run(self.session_run, items, stats)

    def predict(self, items: list[Prepared], top_k: int | None = None, **params) -> list[dict]:
        params = self.contract.check_params({"top_k": top_k, **params})
        outputs, _ = self.run(items)
        return [self.contract.postprocess(outputs[i], params) for i in range(len(items))]
