"""Whisper as a sequence-to-sequence model (speech recognition): the whole model from the
CTranslate2 files (encoder and decoder) or a Hugging Face folder / hub id, and the two
graphs the decoding loop (tasks/decoding.py) runs, in PyTorch for fine-tuning's validation
and as what export/seq2seq.py writes to ONNX.

    model, config = load_whisper(location)             # WhisperForConditionalGeneration
    encoder = EncoderGraph(model)   # input_features -> cross_key_i, cross_value_i, pooled_embedding
    decoder = DecoderGraph(model)   # input_ids, position_ids, attention_mask, past_*, cross_*
                                    # -> logits, present_*

The encoder graph computes each decoder layer's cross-attention keys and values once per
input (what the decoder reads of the encoder's hidden states), so a decoding step costs
the decoder alone. The decoder graph is one graph for the prompt and for every next token:
positions and the key mask are inputs, so sequences of different lengths share a call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.errors import UnsupportedBackbone
from finetune.models.whisper import WhisperAudioEncoder, _weight, ct2_state_dict, read_ct2


def ct2_decoder_state(v: dict[str, np.ndarray], config) -> dict[str, torch.Tensor]:
    """CTranslate2 decoder variables → `WhisperDecoder` names (fused projections split)."""
    t: dict[str, torch.Tensor] = {}

    def put(name: str, array: np.ndarray) -> None:
        t[name] = torch.from_numpy(np.array(array, dtype=np.float32))

    put("embed_tokens.weight", _weight(v, "decoder/embeddings/weight"))
    put("embed_positions.weight", v["decoder/position_encodings/encodings"])
    put("layer_norm.weight", v["decoder/layer_norm/gamma"])
    put("layer_norm.bias", v["decoder/layer_norm/beta"])
    for i in range(config.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"layers.{i}"
        q, k, val = np.split(_weight(v, f"{src}/self_attention/linear_0/weight"), 3)
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
        put(f"{dst}.encoder_attn.q_proj.weight", _weight(v, f"{src}/attention/linear_0/weight"))
        put(f"{dst}.encoder_attn.q_proj.bias", v[f"{src}/attention/linear_0/bias"])
        k, val = np.split(_weight(v, f"{src}/attention/linear_1/weight"), 2)
        _, vb = np.split(v[f"{src}/attention/linear_1/bias"], 2)
        put(f"{dst}.encoder_attn.k_proj.weight", k)
        put(f"{dst}.encoder_attn.v_proj.weight", val)
        put(f"{dst}.encoder_attn.v_proj.bias", vb)
        put(f"{dst}.encoder_attn.out_proj.weight", _weight(v, f"{src}/attention/linear_2/weight"))
        put(f"{dst}.encoder_attn.out_proj.bias", v[f"{src}/attention/linear_2/bias"])
        put(f"{dst}.encoder_attn_layer_norm.weight", v[f"{src}/attention/layer_norm/gamma"])
        put(f"{dst}.encoder_attn_layer_norm.bias", v[f"{src}/attention/layer_norm/beta"])
        put(f"{dst}.fc1.weight", _weight(v, f"{src}/ffn/linear_0/weight"))
        put(f"{dst}.fc1.bias", v[f"{src}/ffn/linear_0/bias"])
        put(f"{dst}.fc2.weight", _weight(v, f"{src}/ffn/linear_1/weight"))
        put(f"{dst}.fc2.bias", v[f"{src}/ffn/linear_1/bias"])
        put(f"{dst}.final_layer_norm.weight", v[f"{src}/ffn/layer_norm/gamma"])
        put(f"{dst}.final_layer_norm.bias", v[f"{src}/ffn/layer_norm/beta"])
    return t


def whisper_from_config(config) -> nn.Module:
    from transformers import WhisperForConditionalGeneration

    config._attn_implementation = "eager"  # exportable attention, same numbers
    return WhisperForConditionalGeneration(config)


def load_whisper(location: str | Path) -> nn.Module:
    """WhisperForConditionalGeneration from a CTranslate2 folder (`model.bin`), a Hugging
    Face folder or a hub id."""
    folder = Path(location)
    if (folder / "model.bin").is_file():
        v = read_ct2(folder / "model.bin")
        config, encoder = ct2_state_dict(v)
        config.decoder_layers = len(
            {m[1] for k in v if (m := re.match(r"decoder/layer_(\d+)/", k))}
        )
        config.decoder_attention_heads = int(v["decoder/num_heads"])
        config.decoder_ffn_dim = v["decoder/layer_0/ffn/linear_0/weight"].shape[0]
        config.vocab_size = v["decoder/embeddings/weight"].shape[0]
        config.max_target_positions = v["decoder/position_encodings/encodings"].shape[0]
        model = whisper_from_config(config)
        state = {f"model.encoder.{k}": w for k, w in encoder.items()}
        state |= {f"model.decoder.{k}": w for k, w in ct2_decoder_state(v, config).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "proj_out.weight"]  # tied to embed_tokens
        if missing or unexpected:
            raise UnsupportedBackbone(
                f"'{folder / 'model.bin'}' does not fit Whisper: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}"
            )
        model.tie_weights()
        return model.eval()
    from transformers import WhisperForConditionalGeneration

    try:
        model = WhisperForConditionalGeneration.from_pretrained(
            str(location), attn_implementation="eager"
        )
    except (OSError, ValueError) as e:
        raise UnsupportedBackbone(
            f"cannot load a Whisper model from '{location}': {str(e).splitlines()[0][:200]}"
        ) from e
    return model.eval()


@lru_cache(maxsize=4)
def special_ids(tokenizer_file: str | Path) -> dict[str, int]:
    """A tokenizer.json's added tokens (`<|endoftext|>`, `<|notimestamps|>`, ...) by text."""
    import json

    vocab = json.loads(Path(tokenizer_file).read_text())
    return {t["content"]: t["id"] for t in vocab["added_tokens"]}


def generation_spec(model: nn.Module, tokenizer_file: Path, suppress=(), suppress_first=()) -> dict:
    """The card's `preprocessing.generation` of a Whisper model: the decoder graph's shape,
    the special token ids and the generation limits (tasks/decoding.py reads it)."""
    c = model.config
    ids = special_ids(tokenizer_file)
    multilingual = c.vocab_size >= 51865  # Whisper's multilingual vocabulary (HF's rule)
    languages = {}
    if multilingual:
        languages = {
            t[2:-2]: i
            for t, i in ids.items()
            if re.fullmatch(r"<\|[a-z]{2,3}\|>", t) and t[2:-2] not in ("nocaptions",)
        }
    return {
        "layers": c.decoder_layers,
        "heads": c.decoder_attention_heads,
        "head_dim": c.d_model // c.decoder_attention_heads,
        "max_positions": c.max_target_positions,
        "eos_id": ids["<|endoftext|>"],
        "start_id": ids["<|startoftranscript|>"],
        "no_timestamps_id": ids["<|notimestamps|>"],
        "transcribe_id": ids.get("<|transcribe|>"),
        "translate_id": ids.get("<|translate|>"),
        "no_speech_id": ids.get("<|nospeech|>", ids.get("<|nocaptions|>")),
        "languages": languages,
        "language": "en" if multilingual else None,
        "max_new_tokens": min(224, c.max_target_positions // 2),  # Whisper: 448 / 2
        "suppress": [int(i) for i in suppress],
        "suppress_first": [int(i) for i in suppress_first],
        "cross": True,
    }


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, D] → [B, heads, T, D / heads]."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


class EncoderGraph(nn.Module):
    """input_features [B, mels, frames] → per decoder layer its cross keys and values
    [B, heads, S, d], then the mean of the encoder's hidden states [B, D] (drift)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = WhisperAudioEncoder(model.model.encoder)
        self.layers = model.model.decoder.layers
        self.heads = model.config.decoder_attention_heads

    def forward(self, input_features: torch.Tensor):
        h = self.encoder.hidden(input_features)
        out = []
        for layer in self.layers:
            out.append(_heads(layer.encoder_attn.k_proj(h), self.heads))
            out.append(_heads(layer.encoder_attn.v_proj(h), self.heads))
        return (*out, h.mean(dim=1))


class DecoderGraph(nn.Module):
    """One decoder call: T new tokens of B sequences against their caches (DESIGN §0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        d = model.model.decoder
        self.embed, self.positions, self.layers, self.norm = (
            d.embed_tokens,
            d.embed_positions,
            d.layers,
            d.layer_norm,
        )
        self.heads = model.config.decoder_attention_heads

    @staticmethod
    def _attend(q, k, v, bias) -> torch.Tensor:
        w = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        b, h, t, d = (w @ v).shape
        return (w @ v).transpose(1, 2).reshape(b, t, h * d)

    def forward(self, input_ids, position_ids, attention_mask, *caches):
        n = len(self.layers)
        past, cross = caches[: 2 * n], caches[2 * n :]
        t = input_ids.shape[1]
        length = past[0].shape[2]  # L: slots already cached
        # One [D, vocab] matrix for the token embeddings and the tied output projection: the
        # exporter folds `weight.T` into a second initializer otherwise (tiny.en's decoder
        # graph: 193 MB with both copies of the 51,864 x 384 table).
        wt = self.embed.weight.t()
        x = wt.index_select(1, input_ids.reshape(-1)).t().reshape(*input_ids.shape, -1)
        x = x + self.positions.weight[position_ids]  # the positions' forward ignores ids
        # key j of L + T is visible to new token i when it is held (mask) and not later
        keys = torch.arange(length + t, device=x.device)
        causal = keys[None, :] <= (length + torch.arange(t, device=x.device))[:, None]
        visible = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~visible, torch.finfo(x.dtype).min)
        presents = []
        for i, layer in enumerate(self.layers):
            sa, ca = layer.self_attn, layer.encoder_attn
            h = layer.self_attn_layer_norm(x)
            q = _heads(sa.q_proj(h) * sa.scaling, self.heads)
            k = torch.cat([past[2 * i], _heads(sa.k_proj(h), self.heads)], dim=2)
            v = torch.cat([past[2 * i + 1], _heads(sa.v_proj(h), self.heads)], dim=2)
            presents += [k, v]
            x = x + sa.out_proj(self._attend(q, k, v, bias))
            h = layer.encoder_attn_layer_norm(x)
            q = _heads(ca.q_proj(h) * ca.scaling, self.heads)
            x = x + ca.out_proj(self._attend(q, cross[2 * i], cross[2 * i + 1], 0.0))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        logits = self.norm(x) @ wt
        return (logits, *presents)


@dataclass
class TorchGraphs:
    """The decoding loop's `encode` and `step` (dict of arrays in, dict out) on PyTorch, as
    export/seq2seq.py's OrtGraphs are on ONNX Runtime."""

    encode: Callable[[dict], dict]
    step: Callable[[dict], dict]


def torch_steps(model: nn.Module, layout, device: torch.device) -> TorchGraphs:
    """The decoding loop's graphs in PyTorch (fine-tuning's validation decodes exactly as
    the exported graphs do)."""
    enc, dec = EncoderGraph(model).to(device).eval(), DecoderGraph(model).to(device).eval()
    past, cross = layout.names("past"), layout.names("cross")

    @torch.no_grad()
    def encode(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = enc(torch.from_numpy(feeds["input_features"]).to(device))
        names = [*cross, "pooled_embedding"]
        return {n: o.float().cpu().numpy() for n, o in zip(names, outs, strict=True)}

    @torch.no_grad()
    def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [feeds["input_ids"], feeds["position_ids"], feeds["attention_mask"]]
        args += [feeds[n] for n in past] + [feeds[n] for n in cross]
        outs = dec(*[torch.from_numpy(a).to(device) for a in args])
        names = ["logits", *(n.replace("past", "present") for n in past)]
        return {n: o.float().cpu().numpy() for n, o in zip(names, outs, strict=True)}

    return TorchGraphs(encode, step)


class SpeechModel(nn.Module):
    """Whisper for fine-tuning and export: teacher-forced logits, its parameter groups, and
    the two graphs. `backbone` is the encoder and `head` the decoder (with the output
    projection tied to its token embeddings), so feature extraction trains the decoder."""

    def __init__(self, whisper: nn.Module):
        super().__init__()
        self.whisper = whisper

    @property
    def backbone(self) -> nn.Module:
        return self.whisper.model.encoder

    @property
    def head(self) -> nn.Module:
        return self.whisper.model.decoder

    @property
    def config(self):
        return self.whisper.config

    def groups(self) -> list[list[nn.Parameter]]:
        """The encoder bottom → top: its stem (convolutions, positions), then each layer
        (the last with the final norm)."""
        e = self.backbone
        stem = [*e.conv1.parameters(), *e.conv2.parameters(), *e.embed_positions.parameters()]
        layers = [list(layer.parameters()) for layer in e.layers]
        layers[-1] += list(e.layer_norm.parameters())
        return [stem, *layers]

    def forward(
        self,
        input_features,
        decoder_input_ids,
        decoder_attention_mask=None,
        encoder_hidden_states=None,
    ):
        """Teacher-forced logits [B, T, vocab]; `encoder_hidden_states`: the encoder's output
        computed already (a frozen encoder's cache), instead of `input_features`."""
        h = encoder_hidden_states
        if h is None:
            h = WhisperAudioEncoder(self.backbone).hidden(input_features)
        out = self.head(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=h,
        )
        return self.whisper.proj_out(out.last_hidden_state)

    def graphs(self) -> tuple[nn.Module, nn.Module]:
        """The encoder and decoder graphs (what export writes to ONNX)."""
        return EncoderGraph(self.whisper), DecoderGraph(self.whisper)

    def steps(self, layout, device: torch.device) -> TorchGraphs:
        return torch_steps(self.whisper, layout, device)


GENERATORS: dict[str, type[nn.Module]] = {"speech-recognition": SpeechModel}  # generative tasks
