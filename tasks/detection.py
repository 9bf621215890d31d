"""Object detection (DESIGN.md §0): boxes with a label and a score per image.

ONNX outputs, NMS inside the graph, a fixed number of rows per image (empty rows score 0):
`boxes` [batch, max_detections, 4] (x1, y1, x2, y2 in the letterboxed input's pixels),
`scores` [batch, max_detections], `labels` [batch, max_detections] (int64 class index),
`pooled_embedding` [batch, dim]. The API answers {"detections": [{"label", "score", "box"}]}
in the original image's pixels (request fields `min_score`, `render`); OIP outputs `boxes`,
`scores` and `labels` padded to max_detections (label -1: no detection).
"""

from __future__ import annotations

import numpy as np

from tasks.base import Output
from tasks.drift import CHECKS, Samples
from tasks.vision import PALETTE, DenseVision, png_base64


class ObjectDetection(DenseVision):
    name = "object-detection"
    metric = "map50"
    checks = CHECKS + ("detections",)
    onnx_outputs = {
        "boxes": {0: "batch"},
        "scores": {0: "batch"},
        "labels": {0: "batch"},
        "pooled_embedding": {0: "batch"},
    }
    params = {"min_score": float, "render": bool}

    @classmethod
    def default_postprocessing(cls) -> dict:
        return {"min_score": 0.3, "max_detections": 100, "iou_threshold": 0.5}

    # ------------------------------------------------------------------ model

    def run(self, session_run, items, stats=None):
        boxes, scores, labels, embedding = session_run(self.feeds(items, stats))
        outputs = []
        for i, item in enumerate(items):
            keep = scores[i] > 0
            outputs.append(
                {
                    "boxes": boxes[i][keep],
                    "scores": scores[i][keep],
                    "labels": labels[i][keep],
                    "size": item.size,
                    "crop": item.value,
                }
            )
        return outputs, embedding

    def in_original(self, output: dict, min_score: float) -> tuple:
        """(boxes in the original image's pixels, scores, labels) at or above `min_score`."""
        keep = output["scores"] >= min_score
        w, h = output["size"]
        boxes = output["boxes"][keep] / self.scale_of(output["size"])
        boxes = np.clip(boxes, 0, [w, h, w, h])
        return boxes, output["scores"][keep], output["labels"][keep]

    def check_params(self, params: dict) -> dict:
        given = super().check_params(params)
        score = given.get("min_score", self.post["min_score"])
        if not 0.0 <= score <= 1.0:
            from tasks.errors import InputError

            raise InputError("bad_min_score", f"min_score must be within [0, 1], got {score}")
        return {**given, "min_score": score}

    def postprocess(self, output: dict, params: dict) -> dict:
        boxes, scores, labels = self.in_original(
            output, params.get("min_score", self.post["min_score"])
        )
        answer = {
            "detections": [
                {
                    "label": self.labels[int(c)],
                    "score": float(s),
                    "box": [round(float(v), 2) for v in b],
                }
                for b, s, c in zip(boxes, scores, labels, strict=True)
            ]
        }
        if params.get("render"):
            answer["image"] = self.render(output, boxes, scores, labels)
        return answer

    def render(self, output, boxes, scores, labels) -> str:
        """The image with its boxes drawn, as a base64 PNG."""
        from PIL import ImageDraw

        im = self.original(output["size"], output["crop"])
        draw = ImageDraw.Draw(im)
        width = max(2, round(max(im.size) / 200))
        boxes = boxes * (im.size[0] / output["size"][0])  # the drawing fits max_output_pixels
        for b, s, c in zip(boxes, scores, labels, strict=True):
            colour = tuple(int(v) for v in PALETTE[int(c) % len(PALETTE)])
            draw.rectangle([float(v) for v in b], outline=colour, width=width)
            draw.text(
                (float(b[0]) + 3, float(b[1]) + 2), f"{self.labels[int(c)]} {s:.2f}", fill=colour
            )
        return png_base64(np.asarray(im))

    def example_params(self) -> dict:
        return {"min_score": 0.5}

    def example_answer(self) -> dict:
        return {"detections": [{"label": self.labels[0], "score": 0.91, "box": [12, 30, 140, 200]}]}

    def scored(self, response: dict) -> list[tuple[str, float]]:
        return [(d["label"], d["score"]) for d in response["detections"]]

    def answer_key(self, output):
        _, _, labels = self.in_original(output, self.post["min_score"])
        return tuple(sorted(int(c) for c in labels))

    # ------------------------------------------------------------------ drift

    def drift_samples(self, outputs, embedding, stats) -> Samples:
        """Per image: the label of its best detection (`len(labels)`: none), that score, and
        how many detections reach min_score (the `detections` check)."""
        none = len(self.labels)
        pred = [int(o["labels"][0]) if len(o["scores"]) else none for o in outputs]
        conf = [float(o["scores"][0]) if len(o["scores"]) else 0.0 for o in outputs]
        count = [int((o["scores"] >= self.post["min_score"]).sum()) for o in outputs]
        return Samples(
            np.asarray(pred),
            np.asarray(conf),
            embedding,
            np.asarray(stats["brightness"], dtype=np.float64),
            np.asarray(count, dtype=np.float64),
        )

    def drift_categories(self) -> int:
        return len(self.labels) + 1

    # ------------------------------------------------------------------ metrics

    @staticmethod
    def stored_target(target: dict) -> dict:
        """A data set's target as the holdout stores it (JSON)."""
        return {
            "boxes": np.asarray(target["boxes"]).reshape(-1, 4).tolist(),
            "labels": np.asarray(target["labels"]).tolist(),
        }

    def gold(self, target: dict) -> dict:
        return {
            "boxes": np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4),
            "labels": np.asarray(target["labels"], dtype=np.int64),
        }

    def score(self, outputs, targets) -> dict:
        """COCO mAP@[.5:.95] and mAP@.5 (pycocotools) over every detection the graph keeps."""
        from tasks.metrics import detection_map

        preds = [self.in_original(o, 0.0) for o in outputs]
        return detection_map(preds, targets, len(self.labels))

    # ------------------------------------------------------------------ parity

    def compare(self, expected: list, got: list, tolerance: float) -> tuple[list[str], float]:
        """Boxes matched by IoU (one to one, same label), scores within `tolerance` x 100:
        NMS may keep a different one of two near-equal boxes, so raw tensors are not compared."""
        from tasks.metrics import box_iou

        failures, worst = [], 0.0
        e_boxes, e_scores, e_labels = expected[:3]
        g_boxes, g_scores, g_labels = got[:3]
        for i in range(len(e_boxes)):
            ke, kg = e_scores[i] > 0.05, g_scores[i] > 0.05
            if abs(int(ke.sum()) - int(kg.sum())) > max(1, 0.05 * ke.sum()):
                failures.append(f"image {i}: {ke.sum()} boxes against {kg.sum()}")
                continue
            if not ke.any() or not kg.any():
                continue
            iou = box_iou(e_boxes[i][ke], g_boxes[i][kg])
            gap = np.abs(e_boxes[i][ke][:, None] - g_boxes[i][kg][None]).max(2)
            other = e_labels[i][ke][:, None] != g_labels[i][kg][None, :]
            iou[other], gap[other] = 0.0, np.inf
            ds = np.abs(e_scores[i][ke][:, None] - g_scores[i][kg][None])
            best = (gap + ds).argmin(1)  # the partner: the nearest box of the label and score
            rows = np.arange(len(best))
            matched = (gap[rows, best] < 0.5) | (iou[rows, best] >= 0.9)
            if matched.mean() < 0.95:
                failures.append(f"image {i}: {matched.mean():.2f} of the boxes matched at IoU 0.9")
            diff = np.abs(e_scores[i][ke][matched] - g_scores[i][kg][best[matched]])
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
        if worst > tolerance * 100:
            failures.append(f"matched scores differ by {worst:.3g} > {tolerance * 100:g}")
        return failures, worst

    # ------------------------------------------------------------------ OIP

    def oip_outputs(self) -> list[Output]:
        k = int(self.post["max_detections"])
        return [
            Output("boxes", "FP32", (k, 4)),
            Output("scores", "FP32", (k,)),
            Output("labels", "INT64", (k,)),
        ]

    def oip_tensors(self, outputs, responses) -> dict:
        k, n = int(self.post["max_detections"]), len(responses)
        boxes = np.zeros((n, k, 4), np.float32)
        scores = np.zeros((n, k), np.float32)
        labels = np.full((n, k), -1, np.int64)
        index = {c: i for i, c in enumerate(self.labels)}
        for i, r in enumerate(responses):
            for j, d in enumerate(r["detections"][:k]):
                boxes[i, j], scores[i, j], labels[i, j] = d["box"], d["score"], index[d["label"]]
        return {"boxes": boxes, "scores": scores, "labels": labels}
