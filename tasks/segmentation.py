"""Semantic segmentation (DESIGN.md §0): a class per pixel.

ONNX outputs: `mask` [batch, size, size] (uint8 class index at the letterboxed input's size),
`logits` [batch, classes, h, w] (the head's own resolution), `confidence` [batch] (mean top
probability over the pixels) and `pooled_embedding` [batch, dim]. The API answers
{"mask": base64 PNG of class indices at the original image's size (scaled down to fit
TUNESERVE_MAX_OUTPUT_PIXELS beyond it), "mask_size": [width, height], "class_shares": {label:
share}} (request field `render`: a colour overlay PNG too, at the mask's size); OIP outputs
`mask` (UINT8, the model's resolution), `content_size` (the image's width and height inside
it) and `logits`.
"""

from __future__ import annotations

import numpy as np

from tasks.base import Output
from tasks.drift import Samples
from tasks.vision import PALETTE, DenseVision, png_base64, read_png_base64

IGNORE = 255  # void pixels in stored masks: not scored, not trained on


class SemanticSegmentation(DenseVision):
    name = "semantic-segmentation"
    metric = "miou"
    onnx_outputs = {
        "mask": {0: "batch"},
        "logits": {0: "batch"},
        "confidence": {0: "batch"},
        "pooled_embedding": {0: "batch"},
    }

    def run(self, session_run, items, stats=None):
        mask, logits, confidence, embedding = session_run(self.feeds(items, stats))
        outputs = [
            {
                "mask": mask[i],
                "logits": logits[i],
                "confidence": float(confidence[i]),
                "size": item.size,
                "crop": item.value,
            }
            for i, item in enumerate(items)
        ]
        return outputs, embedding

    def in_original(self, output: dict) -> np.ndarray:
        """The mask cut to the image's content and resized (nearest) to the image's size, or
        to that scaled down to fit `max_output_pixels` (`output_size`)."""
        from PIL import Image

        w, h = self.output_size(output["size"])
        content = self.content(output["size"], output["mask"])
        if content.shape == (h, w):
            return content
        return np.asarray(Image.fromarray(content).resize((w, h), Image.Resampling.NEAREST))

    def postprocess(self, output: dict, params: dict) -> dict:
        mask = self.in_original(output)
        counts = np.bincount(mask.ravel(), minlength=len(self.labels))
        shares = counts / max(1, mask.size)
        answer = {
            "mask": png_base64(mask),
            "mask_size": [mask.shape[1], mask.shape[0]],
            "class_shares": {
                self.labels[c]: round(float(shares[c]), 6) for c in np.flatnonzero(counts)
            },
        }
        if params.get("render"):
            answer["image"] = self.render(output, mask)
        return answer

    def render(self, output: dict, mask: np.ndarray) -> str:
        """The image with each class's colour laid over it at 50%, as a base64 PNG (uint8
        throughout: a float overlay of a large image took gigabytes)."""
        from PIL import Image

        im = self.original(output["size"], output["crop"])
        colours = Image.fromarray(PALETTE[mask % len(PALETTE)])
        return png_base64(np.asarray(Image.blend(im, colours, 0.5)))

    def example_answer(self) -> dict:
        return {
            "mask": "<base64 PNG, one class index per pixel>",
            "class_shares": {self.labels[0]: 0.7, self.labels[-1]: 0.3},
        }

    def scored(self, response: dict) -> list[tuple[str, float]]:
        """The class covering most of the image, with its share."""
        label, share = max(response["class_shares"].items(), key=lambda kv: kv[1])
        return [(label, share)]

    def answer_key(self, output):
        return np.bincount(output["mask"].ravel(), minlength=len(self.labels)).argmax()

    # ------------------------------------------------------------------ drift

    def drift_samples(self, outputs, embedding, stats) -> Samples:
        """Per image: the class covering most of it, the mean top probability of its pixels."""
        pred = [self.answer_key(o) for o in outputs]
        return Samples(
            np.asarray(pred),
            np.asarray([o["confidence"] for o in outputs]),
            embedding,
            np.asarray(stats["brightness"], dtype=np.float64),
        )

    # ------------------------------------------------------------------ metrics

    @staticmethod
    def stored_target(target: dict) -> dict:
        """A data set's target as the holdout stores it (JSON: the mask as a base64 PNG)."""
        return {"mask": png_base64(np.asarray(target["mask"], dtype=np.uint8))}

    def gold(self, target: dict) -> np.ndarray:
        return read_png_base64(target["mask"])

    def score(self, outputs, targets) -> dict:
        """Mean IoU and pixel accuracy over the classes present, void pixels excluded."""
        from tasks.metrics import segmentation_scores

        return segmentation_scores(
            [o["mask"] for o in outputs], list(targets), len(self.labels), IGNORE
        )

    # ------------------------------------------------------------------ parity

    def compare(self, expected: list, got: list, tolerance: float) -> tuple[list[str], float]:
        """Logits within `tolerance` x 10, masks equal on 99.9% of the pixels (a pixel whose
        two best classes tie within rounding may flip)."""
        failures = []
        diff = float(np.abs(expected[1] - got[1]).max()) if expected[1].size else 0.0
        if diff > tolerance * 10:
            failures.append(f"logits max abs diff {diff:.3g} > {tolerance * 10:g}")
        same = float((expected[0] == got[0]).mean())
        if same < 0.999:
            failures.append(f"masks agree on {same:.4f} of the pixels (< 0.999)")
        return failures, diff

    # ------------------------------------------------------------------ OIP

    def oip_outputs(self) -> list[Output]:
        s, n = self.size, len(self.labels)
        return [
            Output("mask", "UINT8", (s, s)),
            Output("content_size", "INT64", (2,)),
            Output("logits", "FP32", (n, -1, -1)),
        ]

    def oip_tensors(self, outputs, responses) -> dict:
        return {
            "mask": np.stack([o["mask"] for o in outputs]).astype(np.uint8),
            "content_size": np.asarray(
                [
                    [
                        round(o["size"][0] * self.scale_of(o["size"])),
                        round(o["size"][1] * self.scale_of(o["size"])),
                    ]
                    for o in outputs
                ],
                dtype=np.int64,
            ),
            "logits": np.stack([o["logits"] for o in outputs]).astype(np.float32),
        }
