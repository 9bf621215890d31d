"""PyTorch → ONNX: the current `torch.onnx.export` (dynamo), falling back to the TorchScript
exporter only where it fails, then ONNX Runtime's graph optimisation saved to the file.

Outputs: the task's (DESIGN.md §0), e.g. `logits` [batch, classes] and `pooled_embedding`
[batch, dim] (drift monitoring; "embedding" clashes with a dynamo node name in BERT).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.preprocess import IMAGE_INPUT
from tasks.common import INPUT_ORDER

AUDIO_INPUT = "input_features"
TABLE_INPUT = "features"

OUTPUTS = ("logits", "pooled_embedding")  # classification; each task names its own (tasks/)
DEFAULT_OPSET = 18


class ImageGraph(nn.Module):
    """The model's export outputs (the task's ONNX outputs, in order) from pixels. Named
    arguments, so that the dynamo exporter matches `dynamic_shapes` to them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.export_outputs(pixel_values)


class TextGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if token_type_ids is None:
            return self.model.export_outputs(input_ids, attention_mask)
        return self.model.export_outputs(input_ids, attention_mask, token_type_ids)


class TableGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features):
        return self.model.export_outputs(features)


class AudioGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_features, attention_mask):
        return self.model.export_outputs(input_features, attention_mask)


def positional(feeds: dict) -> tuple:
    """Feeds (numpy) as the graph's positional torch arguments."""
    return tuple(torch.from_numpy(feeds[n]) for n in INPUT_ORDER if n in feeds)


def graph_for(model: nn.Module, task: str) -> nn.Module:
    import tasks

    if tasks.uses_tokenizer(task):
        return TextGraph(model).eval()
    if tasks.uses_tables(task):
        return TableGraph(model).eval()
    return (AudioGraph(model) if tasks.uses_audio(task) else ImageGraph(model)).eval()


def _axes(names: list[str]) -> dict[int, str]:
    """Texts vary in length; images, audio windows and table rows have a fixed size."""
    fixed = bool({IMAGE_INPUT, AUDIO_INPUT, TABLE_INPUT} & set(names))
    return {0: "batch"} if fixed else {0: "batch", 1: "sequence"}


def to_onnx(
    graph: nn.Module,
    example: dict[str, np.ndarray],
    task: str,
    path: Path,
    opset: int = DEFAULT_OPSET,
) -> dict:
    """Export to one self-contained file with the task's outputs (`tasks` registry, their
    dynamic axes included); returns the exporter path used and why."""
    import tasks

    outputs = tasks.get(task).onnx_outputs
    # Positional order must follow the graph's forward() signature, not the tokenizer's.
    names = [n for n in INPUT_ORDER if n in example]
    args = positional(example)
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        dims = {0: batch}
        if _axes(names) != {0: "batch"}:
            dims = {0: batch, 1: torch.export.Dim("sequence", min=1, max=8192)}
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=names,
            output_names=list(outputs),
            dynamic_shapes={n: dims for n in names},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        return {"exporter": "torch.onnx.export (dynamo)", "opset": opset}
    except Exception as e:  # the dynamo exporter raises many types; record why and fall back
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    torch.onnx.export(
        graph,
        args,
        str(path),
        input_names=names,
        output_names=list(outputs),
        dynamic_axes={n: _axes(names) for n in names} | outputs,
        opset_version=opset,
        dynamo=False,
    )
    return {
        "exporter": "torch.onnx.export (torchscript)",
        "opset": opset,
        "fallback_reason": reason,
    }


def optimize(src: Path, dst: Path) -> str:
    """Save ONNX Runtime's provider-independent (basic) graph optimisations; the serving
    session applies the hardware-specific levels itself when it loads the file."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return "basic"


def weights_sha256(path: Path) -> str:
    """sha256 over the initializers (names and bytes): identifies the weights whatever the
    metadata, so the card and the ONNX metadata can both carry it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(init.name.encode())
        h.update(numpy_helper.to_array(init).tobytes())
    return h.hexdigest()


def set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def io_signature(path: Path) -> tuple[list[dict], list[dict]]:
    """Names, element types and shapes (symbolic axes by name) of the model's inputs/outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append(
                {
                    "name": v.name,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape,
                }
            )
        return out

    return describe(model.graph.input), describe(model.graph.output)


__all__ = [
    "IMAGE_INPUT",
    "OUTPUTS",
    "graph_for",
    "to_onnx",
    "optimize",
    "weights_sha256",
    "set_metadata",
    "io_signature",
]
