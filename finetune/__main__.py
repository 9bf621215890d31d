"""python -m finetune DATA --backbone NAME --strategy STRATEGY --out runs/NAME [...]"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from finetune.config import TrainConfig
from finetune.errors import FinetuneError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune a pre-trained backbone on a labelled data set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "data",
        help="class folders, a table file, a folder of train/val tables, CoNLL or SQuAD files, "
        "VOC/COCO detection data, or images/ + masks/ for segmentation",
    )
    p.add_argument("--out", default=None, help="run folder; None: runs/<data folder name>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    defaults = TrainConfig()
    helps = TrainConfig.field_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = helps.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool) or "bool" in str(f.type):
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if default is None:  # optional fields: the type named in the annotation
            kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
        p.add_argument(flag, type=kind, default=default, help=help_text)
    return p


def main(args: argparse.Namespace) -> int:
    from finetune.progress import quiet_libraries
    from finetune.train import fine_tune

    quiet_libraries()

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    out = Path(args.out) if args.out else Path("runs") / Path(args.data).resolve().name
    try:
        result = fine_tune(args.data, out, cfg, overwrite=args.overwrite, resume=args.resume)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with: python -m finetune {args.data} --out {out} --resume",
            file=sys.stderr,
        )
        return 130
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: the first process reports
        return 0

    def shown(prefix: str) -> str:
        return "  ".join(
            f"{k} {v:.4f}"
            for k, v in result.items()
            if k.startswith(prefix) and isinstance(v, float)
        )

    print(f"best epoch {result['epoch']} ({result['strategy']}): {shown('val_')}")
    print(f"test split (never used for selection): {shown('test_')}")
    pictures = ", ".join(p.name for p in sorted((Path(out) / "report").glob("*.png")))
    print(f"checkpoint: {out}/  (report: {out}/report/: {pictures})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(get_args_parser().parse_args()))
