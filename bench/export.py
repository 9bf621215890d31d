"""Export benchmark: `python bench/export.py --image-run RUN --text-run RUN [--seconds S]`.

Exports each checkpoint (fp32 + int8, into a temporary folder), then measures on the same
holdout inputs, in this one process and interleaved round by round: PyTorch eager, ONNX
Runtime fp32 and ONNX Runtime int8, at batch 1 and 32. Prints throughput and the ratios,
with the parity and variant accuracy from each card.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCHES = (1, 32)


def _time(fn, seconds: float) -> float:
    """Median seconds per call over repeated calls filling about `seconds`."""
    # PyTorch's OpenMP and ONNX Runtime's pools spin-wait after work; let the previous
    # engine's threads go idle so they do not steal this engine's cores (2 here).
    time.sleep(0.5)
    fn()
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(samples) < 3:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench_run(run: Path, tmp: Path, seconds: float, rounds: int) -> list[dict]:
    import onnxruntime as ort
    import torch

    import tasks
    from export import card as card_mod
    from export.convert import graph_for
    from export.pipeline import export_checkpoint
    from export.preprocess import Feeder
    from finetune import checkpoint

    folder = export_checkpoint(run, tmp, int8=True, register=False, log=lambda _s: None)
    card = card_mod.load_card(folder)
    ckpt = checkpoint.load_checkpoint(run)
    tok = checkpoint.load_tokenizer(ckpt) if tasks.uses_tokenizer(ckpt.task) else None
    feeder = Feeder(ckpt, tok)
    graph = graph_for(checkpoint.build_model(ckpt), ckpt.task)
    sessions = {
        "onnxruntime fp32": ort.InferenceSession(
            str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
        )
    }
    int8 = card_mod.variant_file(card, "int8")
    if int8:
        sessions["onnxruntime int8"] = ort.InferenceSession(
            str(folder / int8), providers=["CPUExecutionProvider"]
        )
    print(
        f"\n{card['name']} ({card['task']}, {card['backbone']['name']}): parity max abs diff "
        f"{card['parity']['max_abs_diff']:.2e}, holdout accuracy fp32 "
        f"{card['holdout']['fp32_accuracy']:.4f}"
        + "".join(
            f", {v['precision']} {v['holdout_accuracy']:.4f} (agreement "
            f"{v['agreement_with_fp32']:.4f})"
            for v in card["variants"]
        )
        + "".join(f"; {r['precision']} rejected: {r['reason']}" for r in card["rejected_variants"])
    )
    rows = []
    for bs in BATCHES:
        feeds = feeder.feeds(feeder.take(bs))
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

        def eager(tensors=tensors):
            with torch.inference_mode():
                graph(**tensors)

        engines = {"pytorch eager": eager}
        for label, sess in sessions.items():
            engines[label] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
        per_round = {k: [] for k in engines}
        for _ in range(rounds):  # interleaved so that machine noise hits every engine alike
            for label, fn in engines.items():
                per_round[label].append(_time(fn, seconds / rounds))
        for label, times in per_round.items():
            t = statistics.median(times)
            rows.append(
                {
                    "model": card["name"],
                    "batch": bs,
                    "engine": label,
                    "ms": t * 1000,
                    "items_s": bs / t,
                }
            )
    return rows


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image-run", default="runs/flowers12", help="image checkpoint folder")
    p.add_argument("--text-run", default="runs/sms_spam", help="text checkpoint folder")
    p.add_argument("--seconds", type=float, default=6.0, help="timing budget per engine/batch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = p.parse_args()
    import torch

    runs = [Path(r) for r in (args.image_run, args.text_run) if Path(r).is_dir()]
    if not runs:
        print("no checkpoint found; fine-tune first (see README) or pass --image-run/--text-run")
        return 0
    print(
        f"CPU: {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} "
        f"threads {torch.get_num_threads()}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = [r for run in runs for r in bench_run(run, tmp, args.seconds, args.rounds)]
    print(f"\n{'model':<12} {'batch':>5} {'engine':<18} {'ms/batch':>9} {'items/s':>9}")
    for r in rows:
        print(
            f"{r['model']:<12} {r['batch']:>5} {r['engine']:<18} {r['ms']:>9.2f} "
            f"{r['items_s']:>9.1f}"
        )
    print("\nratios (throughput, same inputs, this run):")
    for model in dict.fromkeys(r["model"] for r in rows):
        for bs in BATCHES:
            got = {
                r["engine"]: r["items_s"] for r in rows if r["model"] == model and r["batch"] == bs
            }
            eager, fp32 = got["pytorch eager"], got["onnxruntime fp32"]
            line = f"  {model:<12} batch {bs:>2}: ORT fp32 / PyTorch {fp32 / eager:5.2f}x"
            if "onnxruntime int8" in got:
                i8 = got["onnxruntime int8"]
                line += f"   int8 / fp32 {i8 / fp32:5.2f}x   int8 / PyTorch {i8 / eager:5.2f}x"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
