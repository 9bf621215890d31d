"""Encoder-decoder models → two ONNX graphs, and the parity of the decoding loop around them
(speech recognition; DESIGN.md §0).

    paths = write_graphs(model, layout, out_dir, opset)    # encoder.onnx, decoder.onnx
    graphs = OrtGraphs(out_dir / "encoder.onnx", out_dir / "decoder.onnx")  # tasks/decoding.py
    report = parity(model.steps(layout, cpu), graphs, task, items)

Two graphs, not Optimum's three (`encoder_model`, `decoder_model`, `decoder_with_past_model`)
or its merged decoder with an `If` node: the encoder graph also computes the decoder's cross
keys and values, and the one decoder graph takes positions and a key mask as inputs, so the
prompt and every later step, and sequences of different lengths in one batch, go through the
same graph. Every cache starts with one masked slot (tasks/decoding.py), so no axis is ever
zero-long. Exported by the TorchScript exporter with declared dynamic axes (batch, frames,
tokens, cached slots): the graphs are plain tensor code with no data-dependent control flow.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from tasks.decoding import Layout


def _names(layout: Layout) -> tuple[list[str], list[str], list[str]]:
    return layout.names("past"), layout.names("cross"), layout.names("present")


def write_graphs(model, layout: Layout, out: Path, opset: int, n_mels: int, frames: int):
    """encoder.onnx and decoder.onnx of a sequence-to-sequence checkpoint's model (its
    `graphs()`: the PyTorch encoder and decoder graphs, finetune/models/seq2seq.py)."""
    past, cross, present = _names(layout)
    out.mkdir(parents=True, exist_ok=True)
    enc, dec = (g.eval() for g in model.graphs())
    features = torch.zeros(2, n_mels, frames)
    with torch.no_grad():
        enc_out = enc(features)
    kv_axes = {0: "batch", 2: "frames_out"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc,
            (features,),
            str(out / "encoder.onnx"),
            input_names=["input_features"],
            output_names=[*cross, "pooled_embedding"],
            dynamic_axes={"input_features": {0: "batch", 2: "frames"}}
            | {n: kv_axes for n in cross}
            | {"pooled_embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        b, t, cached = 2, 3, 2
        ids = torch.zeros(b, t, dtype=torch.long)
        positions = torch.arange(t).repeat(b, 1)
        mask = torch.ones(b, cached + t, dtype=torch.long)
        caches = [torch.zeros(b, layout.heads, cached, layout.head_dim) for _ in past]
        args = (ids, positions, mask, *caches, *enc_out[: len(cross)])
        torch.onnx.export(
            dec,
            args,
            str(out / "decoder.onnx"),
            input_names=["input_ids", "position_ids", "attention_mask", *past, *cross],
            output_names=["logits", *present],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "position_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "keys"},
                "logits": {0: "batch", 1: "tokens"},
            }
            | {n: {0: "batch", 2: "cached"} for n in past}
            | {n: kv_axes for n in cross}
            | {n: {0: "batch", 2: "keys"} for n in present},
            opset_version=opset,
            dynamo=False,
        )
    return out / "encoder.onnx", out / "decoder.onnx"


class _Recording:
    """Graphs that record every decoder call's feeds and logits (teacher-forced replay)."""

    def __init__(self, graphs):
        self.graphs, self.calls = graphs, []

    def encode(self, feeds):
        return self.graphs.encode(feeds)

    def step(self, feeds):
        out = self.graphs.step(feeds)
        self.calls.append((feeds, out["logits"]))
        return out


def parity(reference, graphs, task, items, batch_sizes=(1, 7)) -> dict:
    """Greedy transcripts of `items` by both (must be identical) and the largest logit
    difference of the exported decoder replayed on the reference's own steps (each step's
    feeds as the reference saw them, so one early difference does not compound)."""
    report = {"batch_sizes": list(batch_sizes), "max_abs_diff": 0.0, "max_abs_logit": 0.0}
    report["steps"] = 0
    mismatched = []
    for size in batch_sizes:
        part = list(items[:size]) if len(items) >= size else list(items) * (size // len(items) + 1)
        part = part[:size]
        rec = _Recording(reference)
        ref, _ = task.run(rec, part, max_batch=size)
        ours, _ = task.run(graphs, part, max_batch=size)
        for i, (a, b) in enumerate(zip(ref, ours, strict=True)):
            if task.answer_key(a) != task.answer_key(b):
                mismatched.append({"batch": size, "item": i})
        for feeds, logits in rec.calls:
            diff = np.abs(graphs.step(feeds)["logits"] - logits)
            report["max_abs_diff"] = max(report["max_abs_diff"], float(diff.max()))
            report["max_abs_logit"] = max(report["max_abs_logit"], float(np.abs(logits).max()))
            report["steps"] += 1
    report["transcripts_identical"] = not mismatched
    report["mismatched"] = mismatched[:10]
    return report
