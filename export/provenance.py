"""Where an artifact came from, for its card: the library versions that exported it and the
training run's summary (strategy, best epoch's figures, split sizes, checkpoint hash)."""

from __future__ import annotations

import platform


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
