"""Detectors (the torch half of DESIGN.md §0's object detection).

    model = build("fcos_mobilenet_v2", num_classes=1, size=320, weights="pretrained")
    losses = model(pixels, targets)            # training: a dict of losses
    boxes, scores, labels, pooled = model.export_outputs(pixels)   # the ONNX graph

Both wrap torchvision's own parts and expose `backbone` (the ImageNet encoder, split into
groups for gradual unfreezing) and `head` (everything the task adds: FPN and detection head,
or the segmentation head), as the shared loop expects.

Every detector's whole post-processing runs batched inside the graph (box decoding, top-k,
class-aware NMS, a fixed number of rows per image), so one ONNX call serves a batch: FCOS,
RetinaNet and SSDlite decode their anchors; Faster R-CNN (`TwoStageDetector`) selects its
proposals and pools them with RoIAlign for the whole batch at once. NMS in the graph is
"fast NMS" (YOLACT, Bolya et al. 2019): a box is dropped when any higher-scoring box of its
class overlaps it above the threshold, a matrix operation instead of greedy NMS's loop;
tests/test_vision_tasks.py measures it against torchvision's greedy NMS.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from finetune.models.registry import ModelSpec
from finetune.models.trunks import encoder_fpn
from finetune.models.weights import torchvision_model


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of two batches of boxes [N, k, 4] → [N, k, k]."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-6)


class Detector(nn.Module):
    """A torchvision single-stage detector on letterboxed square inputs of `size` pixels."""

    def __init__(self, tv_model: nn.Module, kind: str, size: int, post: dict):
        super().__init__()
        self.kind, self.size = kind, size
        if kind == "ssd":  # the MobileNet trunk, then SSDlite's extra layers: no FPN
            self.backbone = tv_model.backbone.features
            self.head = nn.ModuleDict({"extra": tv_model.backbone.extra, "det": tv_model.head})
        else:
            self.backbone = tv_model.backbone.body
            self.head = nn.ModuleDict({"fpn": tv_model.backbone.fpn, "det": tv_model.head})
        self._tv = [tv_model]  # a list: its modules are registered above, not twice
        self.pre_nms = 300  # candidates per image before NMS
        self.score_thresh = 0.05
        self.max_det = int(post["max_detections"])
        self.iou = float(post["iou_threshold"])
        self.eval()  # one dummy forward for the level sizes; BatchNorm needs eval at batch 1
        with torch.no_grad():
            feats = self.features(torch.zeros(1, 3, size, size))[1]
        self.train()
        from torchvision.models.detection.image_list import ImageList

        anchors = tv_model.anchor_generator(
            ImageList(torch.zeros(1, 3, size, size), [(size, size)]), feats
        )[0]
        self.register_buffer("anchors", anchors, persistent=False)
        self.per_level = [f.shape[2] * f.shape[3] for f in feats]

    def features(self, x):
        """(the encoder's top feature map, the levels the detection head reads)."""
        if self.kind == "ssd":
            levels = []
            for block in [*self.backbone, *self.head["extra"]]:
                x = block(x)
                levels.append(x)
            return levels[len(self.backbone) - 1], levels
        body = self.backbone(x)
        return list(body.values())[-1], list(self.head["fpn"](body).values())

    def forward(self, x, targets: list[dict]) -> dict:
        """Training losses (torchvision's own) for a batch with its targets."""
        tv = self._tv[0]
        out = self.head["det"](self.features(x)[1])
        anchors = [self.anchors] * len(x)
        if self.kind == "fcos":
            return tv.compute_loss(targets, out, anchors, self.per_level)
        if self.kind == "ssd":  # class 0 is SSD's background: the user's classes from 1
            from torchvision.ops import box_iou

            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
            matched = [
                tv.proposal_matcher(box_iou(t["boxes"], self.anchors))
                if t["boxes"].numel()
                else torch.full((len(self.anchors),), -1, dtype=torch.int64, device=x.device)
                for t in targets
            ]
            return tv.compute_loss(targets, out, anchors, matched)
        return tv.compute_loss(targets, out, anchors)

    def _decode(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.anchors
        reg = out["bbox_regression"]
        if self.kind == "fcos":  # BoxLinearCoder, normalised by the anchor's size
            cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
            w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
            boxes = torch.stack(
                [
                    cx - reg[..., 0] * w,
                    cy - reg[..., 1] * h,
                    cx + reg[..., 2] * w,
                    cy + reg[..., 3] * h,
                ],
                dim=-1,
            )
            scores = torch.sqrt(
                torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"])
            )
            return boxes, scores
        # RetinaNet and SSD: torchvision's BoxCoder, weights (1, 1, 1, 1) and (10, 10, 5, 5)
        weights = (10.0, 10.0, 5.0, 5.0) if self.kind == "ssd" else (1.0, 1.0, 1.0, 1.0)
        boxes = _decode_deltas(reg, a, weights)
        if self.kind == "ssd":  # softmax over background and classes; background dropped
            return boxes, torch.softmax(out["cls_logits"], dim=-1)[..., 1:]
        return boxes, torch.sigmoid(out["cls_logits"])

    def export_outputs(self, x):
        """boxes [N, max_det, 4], scores [N, max_det], labels [N, max_det] (int64),
        pooled_embedding [N, dim]: decoding, top-k and class-aware fast NMS, batched."""
        top_map, levels = self.features(x)
        boxes, scores = self._decode(self.head["det"](levels))
        return (*self.select(boxes, scores, self.pre_nms, self.iou), top_map.mean(dim=(2, 3)))

    def select(self, boxes, scores, candidates: int, iou_threshold: float):
        """Per image: the `candidates` best (box, class) pairs of boxes [N, A, 4] and scores
        [N, A, C] (or [N, A, C, 4] boxes per class), class-aware fast NMS, then `max_det`
        rows: boxes [N, max_det, 4], scores (0: empty row) and labels."""
        n, a, c = scores.shape
        k = min(candidates, a * c)
        top, idx = scores.reshape(n, a * c).topk(k, dim=1)
        labels = idx % c
        if boxes.dim() == 4:  # one box per class (Faster R-CNN)
            flat = boxes.reshape(n, a * c, 4)
            picked = torch.gather(flat, 1, idx.unsqueeze(-1).expand(n, k, 4))
        else:
            picked = torch.gather(boxes, 1, (idx // c).unsqueeze(-1).expand(n, k, 4))
        picked = picked.clamp(0, self.size)
        kept = top * (fast_nms(picked, labels, iou_threshold) & (top > self.score_thresh))
        final, order = kept.topk(min(self.max_det, k), dim=1)
        if self.max_det > k:  # fewer candidates than rows: pad with empty rows
            pad = self.max_det - k
            final = F.pad(final, (0, pad))
            order = F.pad(order, (0, pad))
        out_boxes = torch.gather(picked, 1, order.unsqueeze(-1).expand(n, self.max_det, 4))
        return out_boxes, final, torch.gather(labels, 1, order)


def fast_nms(boxes: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Which of boxes [N, k, 4], sorted by score, survive: a box is dropped when a
    higher-scoring box of its label overlaps it above the threshold."""
    k = boxes.shape[1]
    iou = _box_iou(boxes, boxes)
    same = labels.unsqueeze(2) == labels.unsqueeze(1)
    higher = torch.ones(k, k, device=boxes.device).triu(1).bool()  # row i outranks column j
    return (iou * (same & higher)).amax(dim=1) <= iou_threshold


class TwoStageDetector(Detector):
    """Faster R-CNN, batched for export: the region proposals (the top 1,000 anchors by
    objectness, class-agnostic fast NMS at IoU 0.7, the best 300 kept, as torchvision's test
    settings), RoIAlign on the FPN level each proposal's size maps to (torchvision's
    LevelMapper), the box head, then per-class boxes through the same selection as the
    single-stage detectors. Training is torchvision's own: its RPN and RoI heads with their
    samplers and losses."""

    proposals_before_nms, proposals = 1000, 300

    def __init__(self, tv_model: nn.Module, size: int, post: dict):
        tv_model.head = tv_model.rpn  # Detector keeps `head`; the RoI heads are added below
        tv_model.anchor_generator = tv_model.rpn.anchor_generator
        super().__init__(tv_model, "faster_rcnn", size, post)
        self.head["roi"] = tv_model.roi_heads

    def _det_head(self, levels):
        return self.head["det"].head(levels)

    def forward(self, x, targets: list[dict]) -> dict:
        from collections import OrderedDict

        from torchvision.models.detection.image_list import ImageList

        body = self.backbone(x)
        feats = self.head["fpn"](body)
        images = ImageList(x, [(self.size, self.size)] * len(x))
        targets = [{**t, "labels": t["labels"] + 1} for t in targets]  # 0: background
        rpn, roi = self.head["det"], self.head["roi"]
        was = rpn.training
        rpn.train(), roi.train()  # their losses exist in training mode only (also for val)
        proposals, rpn_losses = rpn(images, OrderedDict(feats), targets)
        _, roi_losses = roi(feats, proposals, images.image_sizes, targets)
        rpn.train(was), roi.train(was)
        return {**rpn_losses, **roi_losses}

    def export_outputs(self, x):
        from torchvision.models.detection.rpn import concat_box_prediction_layers
        from torchvision.ops import roi_align

        n = x.shape[0]
        body = self.backbone(x)
        feats = self.head["fpn"](body)
        levels = list(feats.values())
        objectness, deltas = self.head["det"].head(levels)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        objectness, deltas = objectness.reshape(n, -1), deltas.reshape(n, -1, 4)
        boxes = _decode_deltas(deltas, self.anchors, (1.0, 1.0, 1.0, 1.0)).clamp(0, self.size)
        k = min(self.proposals_before_nms, objectness.shape[1])
        top, idx = objectness.topk(k, dim=1)
        cand = torch.gather(boxes, 1, idx.unsqueeze(-1).expand(n, k, 4))
        keep = fast_nms(cand, torch.zeros_like(idx), 0.7)
        m = min(self.proposals, k)
        order = torch.where(keep, top, torch.full_like(top, -1e9)).topk(m, dim=1)[1]
        proposals = torch.gather(cand, 1, order.unsqueeze(-1).expand(n, m, 4))

        # RoIAlign on each proposal's FPN level (torchvision's LevelMapper: level 4 at 224
        # pixels, one level per doubling, within the levels the RoI pool reads)
        names = [k for k in feats if k in self.head["roi"].box_roi_pool.featmap_names]
        scales = [2.0 ** round(math.log2(feats[k].shape[-1] / self.size)) for k in names]
        lowest, highest = -math.log2(scales[0]), -math.log2(scales[-1])
        rois = torch.cat(
            [
                torch.arange(n, device=x.device).repeat_interleave(m).unsqueeze(1).to(x.dtype),
                proposals.reshape(-1, 4),
            ],
            dim=1,
        )
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        level = torch.floor(4 + torch.log2(torch.sqrt(area.clamp(min=1e-6)) / 224 + 1e-6))
        level = level.clamp(lowest, highest) - lowest
        pooled = 0
        for i, (name, scale) in enumerate(zip(names, scales, strict=True)):
            aligned = roi_align(feats[name], rois, (7, 7), spatial_scale=scale, sampling_ratio=2)
            pooled = pooled + aligned * (level == i).to(x.dtype)[:, None, None, None]
        roi = self.head["roi"]
        logits, reg = roi.box_predictor(roi.box_head(pooled))
        c = logits.shape[1] - 1
        scores = torch.softmax(logits, dim=-1)[:, 1:].reshape(n, m, c)
        reg = reg.reshape(n, m, c + 1, 4)[:, :, 1:]
        per_class = _decode_deltas(reg, proposals.unsqueeze(2), (10.0, 10.0, 5.0, 5.0))
        out = self.select(per_class, scores, self.pre_nms, self.iou)
        return (*out, list(body.values())[-1].mean(dim=(2, 3)))


def _decode_deltas(deltas, anchors, weights) -> torch.Tensor:
    """torchvision's BoxCoder.decode (dx, dy, dw, dh against anchors, dw and dh clamped),
    broadcast over any leading axes."""
    wx, wy, ww, wh = weights
    w, h = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    cx, cy = anchors[..., 0] + 0.5 * w, anchors[..., 1] + 0.5 * h
    clamp = math.log(1000.0 / 16)
    pcx, pcy = deltas[..., 0] / wx * w + cx, deltas[..., 1] / wy * h + cy
    pw = torch.exp((deltas[..., 2] / ww).clamp(max=clamp)) * w
    ph = torch.exp((deltas[..., 3] / wh).clamp(max=clamp)) * h
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], -1)


def build_detector(spec: ModelSpec, num_classes: int, size: int, weights: str, post: dict):
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if spec.encoder == "mobilenet_v2" or spec.encoder.startswith("efficientnet_lite"):
        backbone = encoder_fpn(spec.encoder, weights)
        if spec.kind == "fcos":
            sizes = ((8,), (16,), (32,), (64,), (128,))
            gen = AnchorGenerator(sizes, ((1.0,),) * 5)
            tv = FCOS(backbone, num_classes, anchor_generator=gen)
        else:
            sizes = tuple(
                (x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512)
            )
            gen = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
            tv = RetinaNet(backbone, num_classes, anchor_generator=gen)
    else:
        tv = torchvision_model(spec.encoder, weights)
        _new_classes(tv, spec.kind, num_classes)
    if spec.kind == "faster_rcnn":
        return TwoStageDetector(tv, size, post)
    return Detector(tv, spec.kind, size, post)


def _new_ssd_classes(tv: nn.Module, num_classes: int) -> None:
    """SSDlite's classification head for background + the user's classes."""
    from functools import partial

    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

    channels = det_utils.retrieve_out_channels(tv.backbone, (320, 320))
    anchors = tv.anchor_generator.num_anchors_per_location()
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    tv.head.classification_head = SSDLiteClassificationHead(
        channels, anchors, num_classes + 1, norm
    )


def _new_classes(tv: nn.Module, kind: str, num_classes: int) -> None:
    """A fresh classification layer for the user's classes (the COCO one has 91)."""
    if kind == "ssd":
        _new_ssd_classes(tv, num_classes)
        return
    if kind == "faster_rcnn":  # background + the user's classes
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        old = tv.roi_heads.box_predictor.cls_score
        tv.roi_heads.box_predictor = FastRCNNPredictor(old.in_features, num_classes + 1)
        return
    cls = tv.head.classification_head
    old = cls.cls_logits
    anchors = old.out_channels // cls.num_classes
    new = nn.Conv2d(old.in_channels, anchors * num_classes, 3, padding=1)
    nn.init.normal_(new.weight, std=0.01)
    nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))
    cls.cls_logits, cls.num_classes = new, num_classes
