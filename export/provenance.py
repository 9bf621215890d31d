"""Where an artifact came from, for its card and its model files: the library versions that
exported it, the training run's summary (strategy, best epoch's figures, split sizes,
checkpoint hash), the card fields every artifact has and the files' metadata."""

from __future__ import annotations

import platform
import time

from export import card as card_mod
from export import convert


def stamp(path, source, target) -> str:
    """The model file's metadata (name, version, task, labels, its weights' sha256, the card
    schema), set in place; returns that weights sha256."""
    ckpt = source.ckpt
    weights = convert.weights_sha256(path)
    convert.set_metadata(
        path,
        {
            "tuneserve.name": target.name,
            "tuneserve.version": target.version,
            "tuneserve.task": ckpt.task,
            "tuneserve.labels": ckpt.labels,
            "tuneserve.weights_sha256": weights,
            "tuneserve.card_schema_version": str(card_mod.SCHEMA_VERSION),
        },
    )
    return weights


def card_head(source, target, details: dict) -> dict:
    """The card fields every artifact has, whatever its graphs: who it is, where it came from."""
    ckpt = source.ckpt
    return {
        "schema_version": card_mod.SCHEMA_VERSION,
        "name": target.name,
        "version": target.version,
        "task": ckpt.task,
        "labels": ckpt.labels,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "preprocessing": ckpt.config["preprocessing"],
        "backbone": {k: ckpt.config["backbone"][k] for k in ("name", "family", "source")},
        "training": training_summary(source),
        "export": {**details, "versions": versions()},
    }


def versions() -> dict:
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def training_summary(source) -> dict:
    """The card's training summary: the strategy, the best epoch's figures, split sizes."""
    ckpt = source.ckpt
    best = ckpt.metrics.get("best") or {}
    data = ckpt.config["data"]
    return {
        # `auto` resolves to the strategy it chose (older checkpoints: the one asked for)
        "strategy": best.get("strategy", ckpt.config["training"]["strategy"]),
        "best_epoch": best.get("epoch"),
        **{
            k: v
            for k, v in best.items()
            if k.startswith(("val_", "test_")) and isinstance(v, int | float)
        },
        **{
            f"{split}_size": data[f"{split}_size"]
            for split in ("train", "val", "test")
            if f"{split}_size" in data
        },
        "checkpoint": str(ckpt.path.resolve()),
        "weights_sha256": source.sha256,
    }
