"""What object detection and semantic segmentation share, numpy and PIL only: the letterbox
(an image scaled to fit the model's square input, padded right and bottom) and its inverse,
decoding, PNG helpers and drawing.

Training, export and serving all letterbox here, so a box or a mask maps back onto the pixels
of the image as sent: scale = size / max(width, height), content at the top left.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np

from tasks.base import Task
from tasks.common import RESAMPLE, Prepared, brightness, encoded_bytes, normalize, read_image
from tasks.errors import InputError

IMAGE_INPUT = "pixel_values"
# Distinct colours for classes and boxes (tab10), index = class index modulo 10.
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.uint8,
)


def fit_scale(width: int, height: int, size: int) -> float:
    return size / max(width, height)


def letterbox(im, size: int, fill: Sequence[int], interpolation: str = "bilinear"):
    """A PIL image scaled to fit `size` x `size` (aspect kept), padded right and bottom with
    `fill`: (uint8 HWC array, scale)."""
    from PIL import Image

    w, h = im.size
    scale = fit_scale(w, h, size)
    new = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
    if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that still covers `new`:
        im.draft("RGB", new)  # a 24-MP photo for a 512-px input decodes at 3 MP, 8x faster
    im = im.convert("RGB")
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in fill))
    canvas.paste(im.resize(new, RESAMPLE[interpolation]), (0, 0))
    return np.asarray(canvas, dtype=np.uint8), scale


def pad_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The padding colour: the normalisation mean, so padded pixels enter the model as 0."""
    return tuple(int(round(m * 255)) for m in mean)


def png_base64(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def read_png_base64(text: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im)


class ImageInput:
    """What every image task does with its prepared uint8 HWC inputs (a mixin of Task)."""

    heavy_inputs = decode_in_threads = True  # decoding: the service's decode threads

    @property
    def example_input(self) -> str:
        """A small grey PNG, base64 (the API docs' example request)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (120, 120, 120)).save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode()

    @staticmethod
    def holdout_request(value) -> str:
        """A holdout image as a client sends it: a base64 PNG."""
        return png_base64(np.asarray(value, dtype=np.uint8))

    def feeds(self, items: Sequence[Prepared], stats: dict | None = None) -> dict:
        """Normalised NCHW pixels; `stats` gets brightness and size (drift, DESIGN §4)."""
        crops = np.stack([i.value for i in items])
        if stats is not None:
            stats["brightness"] = brightness(crops).tolist()
            stats["pixels"] = [i.pixels for i in items]
        return {IMAGE_INPUT: normalize(crops, self.pre["mean"], self.pre["std"])}

    def parity_feeds(self, items, length=None) -> dict:
        return self.feeds(items)


class DenseVision(ImageInput, Task):
    """Image in, a structured answer about its pixels out (boxes, a mask): decoding to the
    letterboxed model input, the input statistics, holdout images and drawing."""

    params = {"render": bool}
    heavy_outputs = True  # masks and drawings are resized on the service's threads

    @property
    def size(self) -> int:
        return int(self.pre["image_size"])

    def decode(self, value) -> Prepared:
        fill, interp = pad_fill(self.pre["mean"]), self.pre["interpolation"]
        crop, (w, h) = read_image(
            encoded_bytes(value, "image"),
            self.limits.max_image_pixels,
            lambda im: letterbox(im, self.size, fill, interp)[0],
        )
        return Prepared(crop, pixels=w * h, size=(w, h))

    def from_holdout(self, value) -> Prepared:
        """Holdout images are stored letterboxed already: the input is the whole square."""
        crop = np.asarray(value, dtype=np.uint8)
        return Prepared(crop, size=(crop.shape[1], crop.shape[0]))

    def warm_items(self):
        item = Prepared(np.full((self.size, self.size, 3), 127, np.uint8), size=(self.size,) * 2)
        return item, item

    def check_params(self, params: dict) -> dict:
        given = super().check_params(params)
        for name, kind in self.params.items():
            value = given.get(name)
            if value is None:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if kind is float and number:
                given[name] = float(value)
            elif not isinstance(value, kind) or (kind is not bool and not number):
                raise InputError(f"bad_{name}", f"{name} must be a {kind.__name__}, got {value!r}")
        return given

    def scale_of(self, size: tuple[int, int]) -> float:
        return fit_scale(size[0], size[1], self.size)

    def output_size(self, item_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of a mask or drawing in the answer: the image's own, scaled down
        (aspect kept) to fit `max_output_pixels`."""
        w, h = item_size
        cap = self.limits.max_output_pixels
        if w * h <= cap:
            return w, h
        s = (cap / (w * h)) ** 0.5
        return max(1, int(w * s)), max(1, int(h * s))

    def content(self, item_size: tuple[int, int], plane: np.ndarray) -> np.ndarray:
        """The image's part of a letterboxed plane (the padding right and bottom cut off)."""
        w, h = item_size
        s = self.scale_of(item_size)
        return plane[: max(1, round(h * s)), : max(1, round(w * s))]

    def original(self, item_size: tuple[int, int], crop: np.ndarray):
        """The letterboxed input's content as a PIL image at the output size (drawing)."""
        from PIL import Image

        content = Image.fromarray(self.content(item_size, crop))
        return content.resize(self.output_size(item_size), RESAMPLE["bilinear"])
