"""Segmenters (the torch half of DESIGN.md §0's semantic segmentation): LR-ASPP or DeepLabV3
heads on MobileNetV2, EfficientNet-Lite or a torchvision segmentation model.

    model = build_segmenter(resolve("lraspp_mobilenet_v2"), num_classes=3, weights="pretrained")
    logits = model(pixels)                                   # training: [N, C, H, W]
    mask, logits, confidence, pooled = model.export_outputs(pixels)   # the ONNX graph
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from finetune.models.registry import ModelSpec
from finetune.models.trunks import LiteFeatures
from finetune.models.weights import lite_net, mobilenet_v2, torchvision_model


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


def build_segmenter(spec: ModelSpec, num_classes: int, weights: str) -> Segmenter:
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
    tv = torchvision_model(spec.encoder, weights)
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
