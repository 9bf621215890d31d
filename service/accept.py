"""Fair sharing of new connections between BentoML's worker processes.

The workers share one listening socket, and every worker's event loop wakes when connections
arrive. asyncio then accepts in a loop until the queue is empty, so the first worker awake takes
a whole burst: 64 keep-alive clients connecting at once all landed on one of two workers, which
halved throughput for as long as the connections lived (bench/RESULTS.md). Accepting one
connection per event-loop turn lets the other workers take their share, and an idle worker,
whose loop turns faster, takes more: nginx's default (`multi_accept off`).
"""

from __future__ import annotations

import asyncio.selector_events
import importlib.util
import logging


def accept_one_per_turn() -> None:
    """Patch asyncio's selector event loop (uvicorn's loop unless uvloop is installed)."""
    if importlib.util.find_spec("uvloop") is not None:
        logging.getLogger("tuneserve").warning(
            "uvloop is installed, so uvicorn runs on it and the workers may share connections "
            "unevenly (service/accept.py patches asyncio only); uninstall uvloop to avoid it"
        )
    loop_class = asyncio.selector_events.BaseSelectorEventLoop
    original = loop_class._accept_connection
    if getattr(original, "one_per_turn", False):
        return

    # asyncio calls it with positional arguments: (protocol_factory, sock, sslcontext, server,
    # backlog, ssl timeouts); `backlog` is how many connections one call accepts.
    def accept(self, protocol_factory, sock, sslcontext=None, server=None, backlog=100, *rest):
        return original(self, protocol_factory, sock, sslcontext, server, 1, *rest)

    accept.one_per_turn = True
    loop_class._accept_connection = accept
