"""What several tasks compute identically, numpy only: probabilities, length buckets, the
image crop and its brightness, the text tokenizer as every stage configures it."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import InputError

RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values
# Positional order of a model's inputs (the encoders' forward() signatures): ONNX export
# and the PyTorch models called through a task contract both follow it.
INPUT_ORDER = (
    "pixel_values",
    "input_features",
    "features",
    "input_ids",
    "attention_mask",
    "token_type_ids",
)


@dataclass
class Prepared:
    """One validated request input: a uint8 HWC crop, a text, or a task's structured value."""

    value: object
    pixels: int = 0  # images: width x height as sent, for the input-size statistics
    size: tuple[int, int] | None = None  # detection, segmentation: (width, height) as sent
    windows: list | None = None  # windowed texts: the tokenizer's windows, made at decode
    cost: int = 1  # the model's work in the batcher's unit: 1 per item, windowed texts' tokens

    @property
    def nbytes(self) -> int:
        """About the memory this input holds while it waits for its batch (admission)."""
        value = self.value
        if isinstance(value, np.ndarray) or hasattr(value, "nbytes"):  # arrays, audio clips
            held = int(value.nbytes)
        elif isinstance(value, tuple | list):
            held = sum(4 * len(v) if isinstance(v, str) else 64 for v in value)
        else:
            held = 4 * len(value) if isinstance(value, str) else 64
        # a `tokenizers` encoding keeps ids, type ids, masks, offsets and the token strings
        return held + (100 * self.cost if self.windows is not None else 0)


def encoded_bytes(value, what: str) -> bytes:
    """A request value holding a file (base64 string, or raw bytes from an upload or OIP's
    binary extension) as bytes; InputError otherwise. `what`: image, audio."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("invalid_base64", f"{what} input is not valid base64") from None
    if not isinstance(value, bytes | bytearray):
        raise InputError(
            "wrong_type", f"{what} inputs are base64 strings, got {type(value).__name__}"
        )
    return bytes(value)


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


def quantile_hist(values: np.ndarray, bins: int = 10) -> dict:
    """Quantile bins: equal mass on the reference, so every bin is informative."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant statistic: one bin around it
        edges = np.array([values.min() - 0.5, values.max() + 0.5])
    inner = edges[1:-1]
    counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(edges) - 1)
    return {
        "edges": edges.tolist(),
        "probs": (counts / counts.sum()).tolist(),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


# --------------------------------------------------------------------------- images


def resize_crop(im, resize: int, crop: int, interpolation: str) -> np.ndarray:
    """Shorter side to `resize`, then the centre `crop` square: uint8 HWC RGB. Training,
    export and serving all cut images here.

    Only the crop is resampled: one resize of the crop's box in the source straight to
    crop x crop pixels, on the sampling grid of resizing the whole image and cutting it
    (within one grey level of it). A JPEG much larger than needed is decoded at 1/2, 1/4 or
    1/8 scale first (`Image.draft`: the decoder skips the detail the resize would drop).
    """
    w, h = im.size
    scale = resize / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    if crop > min(size):  # the crop is larger than the resized image: cut with a black border
        im = im.convert("RGB").resize(size, RESAMPLE[interpolation])
        return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
    if im.format == "JPEG":
        im.draft("RGB", size)
        w, h = im.size  # the decoded scale, still at least `size`
    im = im.convert("RGB")
    sx, sy = w / size[0], h / size[1]
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return np.asarray(im.resize((crop, crop), RESAMPLE[interpolation], box=box), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int, resize: int, crop: int, interp: str) -> Prepared:
    """An image request as the classifier's centre crop."""
    crop_px, (w, h) = read_image(data, max_pixels, lambda im: resize_crop(im, resize, crop, interp))
    return Prepared(crop_px, pixels=w * h)


def read_image(data: bytes, max_pixels: int, convert):
    """(convert(PIL image), (width, height)): the header first (the size checked before any
    pixel is decoded), then the pixels; every decoder failure is an InputError, never an
    exception of PIL's own."""
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
        if w * h > max_pixels:
            raise InputError(
                "image_too_large",
                f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}",
                status=413,
            )
        if min(w, h) < 1:
            raise InputError("undecodable_image", f"image has no pixels ({w}x{h})")
        try:
            return convert(im), (w, h)
        except Exception as e:  # truncated or corrupt pixel data, any decoder's error
            raise InputError("undecodable_image", f"cannot decode the image: {e}") from None


def brightness(crops: np.ndarray) -> np.ndarray:
    """Mean value of every 4th pixel of each uint8 crop [N, H, W, C], 0 to 1: the drift input
    statistic of images, the same at export and in the service."""
    return crops[:, ::4, ::4].reshape(len(crops), -1).mean(1) / 255.0


def normalize(crops: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC crops → float32 NCHW, `(x / 255 - mean) / std`, as the backbone was trained."""
    s = np.asarray(std, dtype=np.float32)
    n, h, w, c = crops.shape
    # Cast while reordering to NCHW, then scale and shift each channel's plane in place: per
    # channel over H x W contiguous floats, not over the 3 values of a pixel (NHWC's innermost
    # axis), which made numpy's inner loops 3 long: 0.06 ms per 224-px image instead of 0.34
    # with the copy ONNX Runtime made of the non-contiguous result (bench/RESULTS.md).
    x = np.empty((n, c, h, w), dtype=np.float32)
    x[...] = crops.transpose(0, 3, 1, 2)
    x *= (1.0 / (255.0 * s))[:, None, None]
    x += (-np.asarray(mean, dtype=np.float32) / s)[:, None, None]
    return x


# --------------------------------------------------------------------------- texts


def text_tokenizer(source: str | Path, pre: dict):
    """The `tokenizers` tokenizer of a run or artifact (a tokenizer.json path, or its JSON
    text), truncating at `max_length` and padding to the longest in a batch."""
    from tokenizers import Tokenizer

    src = str(source)
    tok = Tokenizer.from_str(src) if src.lstrip().startswith("{") else Tokenizer.from_file(src)
    tok.no_truncation()
    tok.enable_truncation(int(pre["max_length"]))
    pad = tok.padding or {}
    pad_token = pre.get("pad_token") or pad.get("pad_token") or "[PAD]"
    pad_id = pre.get("pad_id", pad.get("pad_id", tok.token_to_id(pad_token) or 0))
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tok


def unknown_id(tok) -> int | None:
    unk = getattr(tok.model, "unk_token", None)
    return tok.token_to_id(unk) if unk else None


def encoding_columns(encs, names: list[str]) -> dict[str, np.ndarray]:
    """`tokenizers` encodings (padded alike) → int64 model inputs by name."""
    columns = {
        "input_ids": lambda: [e.ids for e in encs],
        "attention_mask": lambda: [e.attention_mask for e in encs],
        "token_type_ids": lambda: [e.type_ids for e in encs],
    }
    return {n: np.asarray(columns[n](), dtype=np.int64) for n in names}


def check_text(value, max_chars: int, what: str = "text") -> str:
    if not isinstance(value, str):
        raise InputError("wrong_type", f"{what} inputs are strings, got {type(value).__name__}")
    if not value.strip():
        raise InputError("empty_text", f"{what} input is empty")
    if len(value) > max_chars:
        raise InputError(
            "text_too_long",
            f"{what} has {len(value)} characters; the limit is {max_chars}",
            status=413,
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800": valid JSON, not text any tokenizer reads
        raise InputError(
            "bad_text",
            f"{what} holds a lone surrogate {value[e.start]!r} at character {e.start}: "
            "not Unicode text (pair it or drop it)",
        ) from None
    return value
