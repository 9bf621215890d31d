"""python -m export runs/NAME --out artifacts [--name NAME] [--version V] [--int8] [--fp16]"""

from __future__ import annotations

import argparse
import os
import sys


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description=(
            "Export a fine-tuned checkpoint to a validated ONNX artifact and register it in the "
            "BentoML model store."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", help="checkpoint folder written by python -m finetune")
    p.add_argument("--out", default="artifacts", help="artifacts root folder")
    p.add_argument("--name", default=None, help="model name; None: the run folder's name")
    p.add_argument("--version", default=None, help="version; None: the next v<N>")
    p.add_argument("--int8", action="store_true", help="also write the int8 (CPU) variant")
    p.add_argument("--fp16", action="store_true", help="also write the fp16 (GPU) variant")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--tolerance", type=float, default=1e-4, help="parity: max abs logit diff")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.01,
        help="a variant is written when the 95%% upper confidence bound of its loss in the task's "
        "holdout metric (accuracy, entity F1, SQuAD F1, mAP...), paired against fp32, is within "
        "this (export/gate.py)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing when the newest version came from this same checkpoint",
    )
    p.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="do not register in the BentoML model store",
    )
    return p


def main(args: argparse.Namespace) -> int:
    from export.errors import ExportError
    from export.pipeline import export_checkpoint

    try:
        folder = export_checkpoint(
            args.run,
            args.out,
            name=args.name,
            version=args.version,
            int8=args.int8,
            fp16=args.fp16,
            opset=args.opset,
            tolerance=args.tolerance,
            max_accuracy_drop=args.max_accuracy_drop,
            register=args.register,
            skip_existing=args.skip_existing,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"artifact: {folder}/")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(get_args_parser().parse_args()))
