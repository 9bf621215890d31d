"""Thread names the operating system shows: `top -H -p PID`, `ps -L`, `/proc/PID/task/*/comm`.

Python names its threads for itself only, so every thread of a worker reads `python` to the
tools an operator reaches for when a pod burns CPU. The service's threads pass their Python
name on: `onnxruntime_0` (model calls), `decode_N` (image decoding), `drift`; the event loop
is the worker's main thread (thread id = process id). `bench/serve.py` reads them to split a
request's CPU by thread.
"""

from __future__ import annotations

import threading


def name_os_thread() -> None:
    """The calling thread's Python name, cut to Linux's 15 bytes, as its OS name; a no-op
    where /proc is missing (macOS) or read-only."""
    name = threading.current_thread().name.encode()[:15]
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as f:
            f.write(name)
    except OSError:
        pass
