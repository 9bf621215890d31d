"""Every model tuneserve fine-tunes, in one table (`registry.py`), and how each is built:
backbones as encoders (`encoders.py`, offline weight files in `weights.py`), the span tasks'
heads (`heads.py`), detectors and segmenters (`detection.py`, `segmentation.py` on the trunks
of `trunks.py`), Whisper's encoder (`whisper.py`), the table MLP (`tabular.py`), and a model
rebuilt from a checkpoint's config.json (`build.py`, which `finetune.checkpoint` uses).
"""

from finetune.models.build import build_dense, is_dense, rebuild
from finetune.models.detection import Detector, fast_nms
from finetune.models.encoders import (
    Classifier,
    TextEncoder,
    build_encoder,
    hf_location,
    image_prep,
    is_decoder,
    load_tokenizer,
    parameter_groups,
    saved_architecture,
)
from finetune.models.heads import HEADS, SpanExtractor, TokenTagger, collate_windows
from finetune.models.registry import MODELS, ModelSpec, default_for, for_task, known, resolve
from finetune.models.segmentation import Segmenter
from finetune.models.seq2seq import GENERATORS, SpeechModel, load_whisper
from finetune.models.tabular import HIDDEN, MLP_FAMILY, TabularMLP, predict_proba
from finetune.models.weights import mobilenet_v2, mobilenet_v2_file

__all__ = [
    "GENERATORS",
    "HEADS",
    "HIDDEN",
    "MLP_FAMILY",
    "MODELS",
    "Classifier",
    "Detector",
    "ModelSpec",
    "Segmenter",
    "SpeechModel",
    "SpanExtractor",
    "TabularMLP",
    "TextEncoder",
    "TokenTagger",
    "build_dense",
    "load_whisper",
    "build_encoder",
    "collate_windows",
    "default_for",
    "fast_nms",
    "for_task",
    "hf_location",
    "image_prep",
    "is_decoder",
    "is_dense",
    "known",
    "load_tokenizer",
    "mobilenet_v2",
    "mobilenet_v2_file",
    "parameter_groups",
    "predict_proba",
    "rebuild",
    "resolve",
    "saved_architecture",
]
