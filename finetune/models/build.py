"""Building a model: a dense model from its registry row, and any model again from a
checkpoint's config.json alone (random weights: the checkpoint's file is loaded over them).

    model = rebuild(config)           # the architecture config.json describes
"""

from __future__ import annotations

from torch import nn

from finetune.data import ImagePrep
from finetune.models.detection import build_detector
from finetune.models.encoders import Classifier, build_encoder
from finetune.models.heads import HEADS
from finetune.models.registry import MODELS, ModelSpec
from finetune.models.segmentation import build_segmenter
from finetune.models.seq2seq import GENERATORS, whisper_from_config
from finetune.models.tabular import MLP_FAMILY, TabularMLP

DETECTOR_KINDS = ("fcos", "retinanet", "ssd", "faster_rcnn")


def build_dense(spec: ModelSpec, num_classes: int, size: int, weights: str, post: dict):
    """A detector or a segmenter, by the kind of its registry row."""
    if spec.kind in DETECTOR_KINDS:
        return build_detector(spec, num_classes, size, weights, post)
    return build_segmenter(spec, num_classes, weights)


def is_dense(backbone: dict) -> bool:
    """config.json's backbone names a dense model (family "torchvision-<kind>")."""
    spec = MODELS.get(backbone["name"])
    return spec is not None and spec.family == "dense"


def rebuild(config: dict) -> nn.Module:
    """The model config.json describes, with random weights (torch models only)."""
    b, head = config["backbone"], config["head"]
    if b["family"] == MLP_FAMILY:
        pre = config["preprocessing"]
        return TabularMLP(pre["features"], len(config["labels"]), head["hidden"], head["dropout"])
    if b["family"] == "whisper" and config["task"] in GENERATORS:
        from transformers import WhisperConfig

        whisper = whisper_from_config(WhisperConfig(**b["hf_config"]))
        return GENERATORS[config["task"]](whisper)
    if is_dense(b):
        size = int(config["preprocessing"]["image_size"])
        post = config["postprocessing"]
        return build_dense(MODELS[b["name"]], len(config["labels"]), size, "random", post)
    spec = ModelSpec(
        b["name"], (config["task"],), b["family"], tuple(b.get("groups", ())), b["source"]
    )
    pre = config["preprocessing"]
    prep = None
    if "crop_size" in pre:
        prep = ImagePrep(pre["resize"], pre["crop_size"], pre["interpolation"])
    encoder, dim = build_encoder(
        spec, "random", prep, hf_config=b.get("hf_config"), pooling=pre.get("pooling", "mean")
    )
    head_cls = HEADS.get(config["task"], Classifier)
    return head_cls(encoder, dim, head["out_features"], head["dropout"])
