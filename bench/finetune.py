"""Feature caching benchmark: `python bench/finetune.py [--data DIR] [--epochs N]`.

Fine-tunes the same backbone on the same data twice with the feature-extraction strategy,
once computing backbone features once and caching them, once running the frozen backbone in
every epoch, and prints the per-epoch times and their ratio from this one run. Uses
../shared/data/flowers12 (EfficientNet-Lite0, 224 px) when present, else generated images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"


def generated_images(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, rgb in enumerate([(200, 40, 40), (40, 180, 60), (40, 60, 200)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(80):
            px = np.clip(np.array(rgb) + rng.integers(-40, 40, (240, 320, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / f"class{c}" / f"{i}.jpg")
    return root


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None, help="image class folders (default: flowers12)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per variant (default 3)")
    args = parser.parse_args()

    import torch

    from finetune.config import TrainConfig
    from finetune.train import fine_tune

    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    data = Path(args.data) if args.data else FLOWERS if FLOWERS.is_dir() else None
    data = data or generated_images(tmp / "generated")
    base = TrainConfig(
        backbone="efficientnet_lite0",
        strategy="feature-extraction",
        epochs=args.epochs,
        patience=args.epochs + 1,
    )
    rows = {}
    for cached in (True, False):
        cfg = TrainConfig(**{**base.to_dict(), "cache_features": cached})
        out = tmp / f"run-{'cached' if cached else 'uncached'}"
        t0 = time.perf_counter()
        result = fine_tune(data, out, cfg, log=lambda _s: None)
        total = time.perf_counter() - t0
        metrics = json.loads((out / "metrics.json").read_text())
        epochs = [e["seconds"] for e in metrics["epochs"]]
        rows[cached] = {
            "epoch_s": sum(epochs) / len(epochs),
            "cache_s": metrics["feature_cache_seconds"] or 0.0,
            "total_s": total,
            "val_accuracy": result["val_accuracy"],
        }
    c, u = rows[True], rows[False]
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else (f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    )
    print(f"data: {data}  backbone: efficientnet_lite0  epochs: {args.epochs}  device: {device}")
    print(f"{'variant':<10} {'epoch s':>9} {'cache s':>9} {'run s':>8} {'val acc':>8}")
    for name, r in (("cached", c), ("uncached", u)):
        print(
            f"{name:<10} {r['epoch_s']:>9.3f} {r['cache_s']:>9.1f} {r['total_s']:>8.1f} "
            f"{r['val_accuracy']:>8.4f}"
        )
    print(f"epoch time ratio uncached/cached: {u['epoch_s'] / c['epoch_s']:.0f}x")
    print(
        f"whole-run ratio uncached/cached ({args.epochs} epochs, cache included): "
        f"{u['total_s'] / c['total_s']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
