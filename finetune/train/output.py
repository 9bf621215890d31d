"""The run folder `--out`: refused before any work when it cannot be used as asked, replaced
only once the new run is ready to train, never deleted when it is not a tuneserve run."""

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
    """Replace an old run (already allowed by check_out) once the new one is ready to train."""
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
