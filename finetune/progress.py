"""Progress of long work: a tqdm bar on a terminal; in logs (CI, `kubectl logs`, a pipe) plain
lines, at most one per `LOG_EVERY` seconds, and no third-party bars.

    for batch in progress(loader, "train epoch 1/10"):
        ...
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

LOG_EVERY = 10.0  # seconds between two progress lines in a log (work under 10 s prints none)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable, desc: str, total: int | None = None, unit: str = "batches"):
    """Yield `items`, showing how far the loop got."""
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    if on_terminal():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False)
        return
    t0 = last = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= LOG_EVERY and i < total:
            last = now
            print(f"{desc}: {i}/{total} {unit}, {now - t0:.0f}s", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Turn off the bars of Hugging Face libraries when the output is not a terminal (their
    carriage-return redraws would land in the log); on a terminal they stay."""
    if on_terminal():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency; only a broken install lacks it
        return
    hf_logging.disable_progress_bar()
