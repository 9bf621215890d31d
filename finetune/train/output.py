"""The run folder `--out`: refused before any work when it cannot be used as asked, never
deleted when it is not a tuneserve run. `--overwrite` trains into a folder beside it
(`staging`) and replaces the old run only once the new one has finished (`replace_out`): a
failed or interrupted retrain leaves the old run as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune import checkpoint
from finetune.errors import CheckpointError, OutputExists
from finetune.train.loop import STATE


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse early, before any work, when `out` cannot be used as asked."""
    if resume:
        if (out / checkpoint.RESUME / STATE).is_file():
            return
        if (out / checkpoint.CONFIG).is_file() and (out / checkpoint.WEIGHTS).is_file():
            raise OutputExists(f"'{out}' holds a completed run; nothing to resume")
        raise CheckpointError(f"cannot resume: '{out / checkpoint.RESUME / STATE}' not found")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputExists(
                f"output folder '{out}' already exists; pass --overwrite to replace it "
                f"or --resume to continue it"
            )
        if not (out / checkpoint.CONFIG).is_file():
            raise OutputExists(
                f"'{out}' is not a tuneserve run (no config.json); refusing to delete it even "
                f"with --overwrite: choose another --out"
            )


def claim_out(out: Path) -> None:
    """Make `out` an empty folder for the new run (a leftover of an interrupted one goes)."""
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def staging(out: Path) -> Path:
    """Where a run that replaces the run in `out` trains (the same name in every process)."""
    return out.with_name(f".{out.name}.overwrite")


def holds_run(out: Path) -> bool:
    return (out / checkpoint.CONFIG).is_file()


def replace_out(new: Path, out: Path) -> None:
    """The finished run in `new` takes the place of the old run in `out`: renames on one file
    system, the old run removed last (after a crash in between it is in `.<name>.old`)."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)
