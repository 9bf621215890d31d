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

import base64
import binascii
import ctypes
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.card import load_card, variant_file, verify_files
from export.errors import CardError
from service.errors import ArtifactError, InputError

log = logging.getLogger("tuneserve")
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values
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


@dataclass
class Prepared:
    """One validated, pre-processed input: a uint8 HWC crop or a text."""

    value: np.ndarray | str
    pixels: int = 0  # images: width x height as sent, for the input-size statistics


class Runtime:
    def __init__(
        self,
        folder: str | Path,
        *,
        precision: str = "auto",
        providers: str = "auto",
        threads: int = 0,
        max_image_pixels: int = 40_000_000,
        max_text_chars: int = 20_000,
        max_batch_size: int = 32,
        load_model: bool = True,
        verify: bool = True,
        warm: bool = True,
    ):
        """`load_model=False` gives only the card-driven pre-processing (validation tests);
        `verify=False` skips the sha256 check when the caller has just made it; `warm=False`
        leaves `warm_up()` to the caller (the service runs it on its inference thread)."""
        self.folder = Path(folder)
        try:
            self.card = load_card(self.folder)
            if verify:
                verify_files(self.folder, self.card)
        except CardError as e:
            raise ArtifactError(str(e)) from e
        self.task, self.labels = self.card["task"], list(self.card["labels"])
        self.name, self.version = self.card["name"], self.card["version"]
        self.pre = self.card["preprocessing"]
        self.max_image_pixels, self.max_text_chars = max_image_pixels, max_text_chars
        self.max_batch_size = max_batch_size
        self.pad_to_pow2 = False  # set on GPUs for images, see run()
        # Inputs whose preparation is CPU-heavy (image decoding): the service runs it off the
        # event loop. Text preparation is a type check; tokenizing runs with the batch.
        self.heavy_inputs = self.task == "image-classification"
        self.tokenizer = self._tokenizer() if self.task == "text-classification" else None
        if self.task == "image-classification":
            self.mean = np.asarray(self.pre["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
            self.std = np.asarray(self.pre["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.session, self.provider, self.precision = None, None, None
        if load_model:
            self._load(precision, providers, threads, warm)

    def _load(self, precision: str, providers: str, threads: int, warm: bool) -> None:
        import onnxruntime as ort

        chain = usable_providers(providers)
        on_gpu = chain[0] != "CPUExecutionProvider"
        self.precision = self._precision(precision, on_gpu)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        path = self.folder / variant_file(self.card, self.precision)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=chain)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"cannot load '{path}' in onnxruntime: {e}") from e
        self.provider = self.session.get_providers()[0]
        if self.provider != chain[0]:  # a silent fallback is a bug: say it
            log.warning("asked for %s, onnxruntime runs %s", chain[0], self.provider)
        # cuDNN searches convolution algorithms for every new input shape, which stalled a
        # batch for seconds on an H100 (bench/RESULTS.md): image batches run padded to a power
        # of two, and each of those few shapes is searched once in warm_up.
        self.pad_to_pow2 = self.provider != "CPUExecutionProvider" and self.task.startswith("image")
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

    def _tokenizer(self):
        from tokenizers import Tokenizer

        path = self.folder / self.pre.get("tokenizer", "tokenizer") / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"tokenizer file '{path}' is missing")
        tok = Tokenizer.from_file(str(path))
        tok.enable_truncation(int(self.pre["max_length"]))
        pad = tok.padding or {}
        pad_id = pad.get("pad_id", tok.token_to_id("[PAD]") or 0)
        tok.enable_padding(pad_id=pad_id, pad_token=pad.get("pad_token", "[PAD]"))
        unk = getattr(tok.model, "unk_token", None)
        self.unk_id = tok.token_to_id(unk) if unk else None
        return tok

    def warm_up(self) -> list[tuple[int, float]]:
        """Calls across the batch range, up to the largest batch of the longest inputs, so the
        first requests are not slow and ONNX Runtime's memory arena is at its peak size from
        the start (it otherwise grew RSS by a fifth in the first minute of load). Returns
        (batch size, seconds) of the short-input calls, timed after a first untimed one."""
        import time

        if self.task == "image-classification":
            c = int(self.pre["crop_size"])
            short = long = Prepared(np.full((c, c, 3), 127, dtype=np.uint8))
        else:
            short, long = Prepared("warm up"), Prepared(" ".join(["warm up"] * 512))
        sizes = [1, 8]
        if self.pad_to_pow2:
            sizes = sorted({self.padded(k) for k in range(1, self.max_batch_size + 1)})
        self.predict([short])
        timings = []
        for n in sizes:
            t0 = time.perf_counter()
            self.predict([short] * n)
            timings.append((n, time.perf_counter() - t0))
        self.predict([long] * self.max_batch_size)
        return timings

    # ------------------------------------------------------------------ inputs

    def prepare(self, value) -> Prepared:
        """Validate and pre-process one input (base64 image or raw bytes; text)."""
        if self.task == "image-classification":
            if isinstance(value, str):
                try:
                    value = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise InputError("invalid_base64", "image input is not valid base64") from None
            if not isinstance(value, bytes | bytearray):
                raise InputError(
                    "wrong_type", f"image inputs are base64 strings, got {type(value).__name__}"
                )
            return self.decode_image(bytes(value))
        if not isinstance(value, str):
            raise InputError("wrong_type", f"text inputs are strings, got {type(value).__name__}")
        if not value.strip():
            raise InputError("empty_text", "text input is empty")
        if len(value) > self.max_text_chars:
            raise InputError(
                "text_too_long",
                f"text has {len(value)} characters; the limit is {self.max_text_chars}",
                status=413,
            )
        return Prepared(value)

    def decode_image(self, data: bytes) -> Prepared:
        """Header first (size checked before any pixel is decoded), then pixels; every decoder
        failure is an InputError, never an exception of PIL's own."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                # PIL warns above its own limit and raises above twice that: ours applies.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise InputError("image_too_large", f"image refused: {e}", status=413) from None
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, struct.error
            raise InputError("undecodable_image", f"cannot decode the image: {e}") from None
        with im:
            w, h = im.size
            if w * h > self.max_image_pixels:
                raise InputError(
                    "image_too_large",
                    f"image is {w}x{h} = {w * h} pixels; the limit is {self.max_image_pixels}",
                    status=413,
                )
            if min(w, h) < 1:
                raise InputError("undecodable_image", f"image has no pixels ({w}x{h})")
            try:
                crop_px = self._resize_crop(im)
            except Exception as e:  # truncated or corrupt pixel data, any decoder's error
                raise InputError("undecodable_image", f"cannot decode the image: {e}") from None
            return Prepared(crop_px, pixels=w * h)

    def _resize_crop(self, im) -> np.ndarray:
        """Shorter side to `resize`, then the centre `crop_size` square, as in training."""
        w, h = im.size
        im = im.convert("RGB")
        resize, crop = int(self.pre["resize"]), int(self.pre["crop_size"])
        scale = resize / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = im.resize(size, _RESAMPLE[self.pre["interpolation"]])
        left = int(round((size[0] - crop) / 2.0))
        top = int(round((size[1] - crop) / 2.0))
        return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8)

    def feeds(self, items: list[Prepared], stats: dict | None = None) -> dict[str, np.ndarray]:
        """Model inputs for a batch; `stats`, when given, receives the cheap input statistics
        of DESIGN §4 (brightness on every 4th pixel and size; tokens, truncation, unknown)."""
        if self.task == "image-classification":
            crops = np.stack([i.value for i in items])
            if stats is not None:
                stats["brightness"] = brightness(crops).tolist()
                stats["pixels"] = [i.pixels for i in items]
            x = crops.transpose(0, 3, 1, 2).astype(np.float32)
            return {"pixel_values": ((x / 255.0 - self.mean) / self.std).astype(np.float32)}
        encs = self.tokenizer.encode_batch([i.value for i in items])
        if stats is not None:
            lengths = [sum(e.attention_mask) for e in encs]
            stats["tokens"] = lengths
            stats["truncated"] = sum(1 for e in encs if e.overflowing)
            stats["unknown_ratio"] = [
                e.ids.count(self.unk_id) / max(1, n) for e, n in zip(encs, lengths, strict=True)
            ]
        columns = {
            "input_ids": [e.ids for e in encs],
            "attention_mask": [e.attention_mask for e in encs],
            "token_type_ids": [e.type_ids for e in encs],
        }
        names = [i["name"] for i in self.card["inputs"]]
        return {n: np.asarray(columns[n], dtype=np.int64) for n in names}

    # ------------------------------------------------------------------ model

    def padded(self, n: int) -> int:
        """The batch size `n` inputs run at: the next power of two on GPUs for images."""
        if not self.pad_to_pow2 or n >= self.max_batch_size:
            return n
        return min(1 << (n - 1).bit_length(), self.max_batch_size)

    def run(
        self, items: list[Prepared], stats: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits [N, classes] and pooled embeddings [N, dim] for a batch (`stats`: feeds)."""
        feeds = self.feeds(items, stats)
        if self.task == "image-classification":
            n, x = len(items), feeds["pixel_values"]
            if self.padded(n) > n:  # copies of the first row, dropped from the outputs
                x = np.concatenate([x, np.repeat(x[:1], self.padded(n) - n, axis=0)])
            logits, embedding = self.session.run(None, {"pixel_values": x})
            return logits[:n], embedding[:n]
        # Texts of very different lengths padded together waste most of the compute (SMS:
        # 5 to 100+ tokens). Sorted by length, they run in chunks padded to their own longest.
        lengths = feeds["attention_mask"].sum(1)
        logits = embedding = None
        for idx in length_buckets(lengths):
            width = int(lengths[idx].max())
            lo, emb = self.session.run(None, {k: v[idx, :width] for k, v in feeds.items()})
            if logits is None:
                logits = np.empty((len(items), lo.shape[1]), lo.dtype)
                embedding = np.empty((len(items), emb.shape[1]), emb.dtype)
            logits[idx], embedding[idx] = lo, emb
        return logits, embedding

    def predict(self, items: list[Prepared], top_k: int = 1) -> list[dict]:
        logits, _ = self.run(items)
        return [self.describe(p, top_k) for p in softmax(logits)]

    def describe(self, p: np.ndarray, top_k: int = 1) -> dict:
        """Top-1 label and score and the top k, from one row of probabilities."""
        order = np.argsort(-p)[: max(1, min(top_k, len(self.labels)))]
        return {
            "label": self.labels[order[0]],
            "score": float(p[order[0]]),
            "top_k": [{"label": self.labels[i], "score": float(p[i])} for i in order],
        }


def brightness(crops: np.ndarray) -> np.ndarray:
    """Mean value of every 4th pixel of each uint8 crop [N, H, W, C], 0 to 1: the drift input
    statistic of images, computed the same way at export (export/reference.py)."""
    return crops[:, ::4, ::4].reshape(len(crops), -1).mean(1) / 255.0


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def length_buckets(lengths: np.ndarray, waste: float = 0.25) -> list[np.ndarray]:
    """Indices sorted by length, cut into chunks whose padding stays under `waste` of the
    chunk's real tokens."""
    order = np.argsort(lengths, kind="stable")
    chunks, current, tokens = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and (len(current) + 1) * n > (1 + waste) * (tokens + n):
            chunks.append(np.asarray(current))
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        chunks.append(np.asarray(current))
    return chunks
