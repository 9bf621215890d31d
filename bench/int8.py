"""int8 methods side by side: `python bench/int8.py --run RUN --artifact DIR [--seconds 3]`.

For every int8 method export tries for the checkpoint's task (export/quantize.py), and for text
ONNX Runtime's default (every MatMul and Gather, not tried by export), on the
artifact's fp32 file and the checkpoint's holdout (the test split): the paired gate's verdict
(export/gate.py: drop, its 95% upper bound, McNemar's discordant pairs and p-value) and ONNX
Runtime's items/s at batch 1 and 32 with one intra-op thread, as one serving worker runs it,
each timed alternately with fp32 over several rounds (these machines are noisy); the ratio to
fp32 is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def items_per_s(sess, batches: list[dict], seconds: float) -> float:
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for feeds in batches:
            sess.run(None, feeds)
            done += len(next(iter(feeds.values())))
    return done / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True, help="the fine-tuned checkpoint (its holdout)")
    p.add_argument("--artifact", required=True, help="its exported artifact (fp32 model.onnx)")
    p.add_argument("--max-drop", type=float, default=0.01, help="the gate's allowed drop")
    p.add_argument("--seconds", type=float, default=3.0, help="per timing round and session")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export import quantize
    from export.preprocess import Feeder
    from finetune import checkpoint

    feeder = Feeder(checkpoint.load_checkpoint(Path(args.run)))
    fp32_file = Path(args.artifact) / "model.onnx"
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    fp32 = session(fp32_file)
    reference = quantize.predict(fp32, feeder)[0]
    metric = feeder.contract.metric
    value = feeder.contract.score(reference, feeder.targets)[metric]
    print(
        f"{args.run}: holdout {len(feeder)} items, fp32 {metric} {value:.4f}; "
        f"calibrated methods use {quantize.calibration_size(feeder)} of them"
    )
    prepared = quantize.prepare(fp32_file, tmp)
    fp32_base = quantize.Baseline(fp32_file, tmp, feeder, reference, value, args.max_drop)
    rows = []
    tried = quantize.methods(feeder)
    extra = () if feeder.contract.heavy_inputs else (quantize.EVERY_MATMUL,)  # for reference
    for i, method in enumerate(tried + extra):
        out = tmp / f"int8-{i}.onnx"
        scores, verdict = quantize.trial(method, prepared, out, fp32_base, ["CPUExecutionProvider"])
        sess = session(out)  # one intra-op thread, as a serving worker
        speed = {}
        for bs in (1, 32):
            batches = [feeder.feeds(feeder.take(bs, k * bs)) for k in range(8)]
            ratios, rates = [], []
            for _ in range(args.rounds):
                base = items_per_s(fp32, batches, args.seconds)
                rate = items_per_s(sess, batches, args.seconds)
                ratios.append(rate / base)
                rates.append((base, rate))
            speed[bs] = (
                statistics.median(r for _, r in rates),
                statistics.median(b for b, _ in rates),
                statistics.median(ratios),
            )
        rows.append(
            (method.name, scores[f"holdout_{metric}"], verdict, speed, out.stat().st_size / 2**20)
        )
    print(
        f"\n| method | {metric} | drop | 95% upper bound | fp32-only right / int8-only right "
        "| McNemar p | gate | items/s b1 (fp32) | ×fp32 b1 | items/s b32 (fp32) | ×fp32 b32 | MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, value, v, speed, mb in rows:
        pairs = (
            f"{v.fp32_only_right} / {v.variant_only_right}"
            if v.fp32_only_right is not None
            else "n/a"
        )
        p_value = f"{v.mcnemar_p:.3f}" if v.mcnemar_p is not None else "n/a"
        print(
            f"| {name} | {value:.4f} | {v.drop:+.4f} | {v.drop_upper_95:.4f} | {pairs} | "
            f"{p_value} | {'pass' if v.passed else 'fail'} (on {v.items}) | "
            f"{speed[1][0]:.0f} ({speed[1][1]:.0f}) | {speed[1][2]:.2f} | "
            f"{speed[32][0]:.0f} ({speed[32][1]:.0f}) | {speed[32][2]:.2f} | {mb:.0f} |"
        )
    print(f"fp32 file: {fp32_file.stat().st_size / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
