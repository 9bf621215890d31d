"""Fair sharing of new connections between BentoML's worker processes.

The workers share one listening socket, and every worker's event loop wakes when connections
arrive. asyncio then accepts in a loop until the queue is empty, so the first worker awake takes
a whole burst: 64 keep-alive clients connecting at once all landed on one of two workers, which
halved throughput for as long as the connections lived (bench/RESULTS.md). Two measures:

- one connection per event-loop turn, so that the other workers get their turn (nginx's default,
  `multi_accept off`). That alone still left splits of 47/17 for an idle server, and 64/0 now
  and then under wrk at 4,000+ requests/s (the tables service served half its rate then);
- a worker holding clearly more live connections than the least loaded worker stops accepting
  for a moment (nginx's `ngx_accept_disabled` does the same from a worker's own free
  connections), so that the others, woken by the same arrivals, take the next ones. Each
  worker writes its count into its slot of a small file all workers of the server map. A
  worker that is not accepting (stuck, or gone) cannot hold the others back for longer than
  `MAX_DEFER_S`.
"""

from __future__ import annotations

import asyncio.selector_events
import importlib.util
import logging
import mmap
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("tuneserve")

MAX_DEFER_S = 0.05  # longest a worker waits for the others before it accepts anyway
RETRY_S = 0.002  # how often a waiting worker looks again (a woken worker is scheduled in ~1 ms)
SLOTS = 256  # workers one file can count (settings cap TUNESERVE_WORKERS at 256)
PREFIX = "tuneserve-connections-"  # + the arbiter's pid, in the temporary folder


class Shares:
    """Live connection counts of the server's workers, in a file every worker maps (named by
    the workers' parent process, the BentoML arbiter). Each worker writes only its own slot."""

    def __init__(self, index: int, workers: int, path: Path):
        self.index, self.workers = index, workers
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * 8:
                os.ftruncate(fd, SLOTS * 8)
            self._map = mmap.mmap(fd, SLOTS * 8)
        finally:
            os.close(fd)
        self.counts = memoryview(self._map).cast("q")
        self.counts[index] = 0  # a restarted worker's connections went with its old process

    def add(self, n: int) -> None:
        self.counts[self.index] += n

    def ahead(self) -> bool:
        """True when this worker holds clearly more than the least loaded one: the slack lets
        a 64-connection burst settle anywhere from 32/32 to about 38/26 without waiting."""
        mine = self.counts[self.index]
        low = min(self.counts[: self.workers])
        return mine > 1.25 * low + 2


def accept_one_per_turn(index: int | None = None, workers: int = 1) -> None:
    """Patch asyncio's selector event loop (uvicorn's loop unless uvloop is installed). With
    `index` (BentoML's worker index, from 1) and more than one worker, also defer accepting
    while this worker is ahead of the others (`Shares`)."""
    if importlib.util.find_spec("uvloop") is not None:
        log.warning(
            "uvloop is installed, so uvicorn runs on it and the workers may share connections "
            "unevenly (service/accept.py patches asyncio only); uninstall uvloop to avoid it"
        )
    loop_class = asyncio.selector_events.BaseSelectorEventLoop
    original = getattr(loop_class._accept_connection, "original", loop_class._accept_connection)
    shares = _shares(index, workers) if index and workers > 1 else None
    waiting_since: float | None = None  # when this worker began deferring

    # asyncio calls it with positional arguments: (protocol_factory, sock, sslcontext, server,
    # backlog, ssl timeouts); `backlog` is how many connections one call accepts.
    def accept(self, protocol_factory, sock, sslcontext=None, server=None, backlog=100, *rest):
        nonlocal waiting_since
        if shares is not None:
            if shares.ahead():
                now = time.monotonic()
                waiting_since = waiting_since or now
                if now - waiting_since < MAX_DEFER_S:
                    # as asyncio does when accept() runs out of file descriptors: stop
                    # reading the socket, serve it again shortly
                    self._remove_reader(sock.fileno())
                    args = (protocol_factory, sock, sslcontext, server, backlog, *rest)
                    self.call_later(RETRY_S, _resume, self, args)
                    return None
            else:
                waiting_since = None
            protocol_factory = _counted(protocol_factory, shares)
        return original(self, protocol_factory, sock, sslcontext, server, 1, *rest)

    accept.original = original
    loop_class._accept_connection = accept


def _resume(loop, args) -> None:
    sock, server = args[1], args[3]
    if sock.fileno() >= 0 and (server is None or server.is_serving()):
        loop._start_serving(*args)


def _counted(protocol_factory, shares: Shares):
    """The factory, counting each connection from its start until the transport reports it
    lost. (A protocol switched on an upgrade, e.g. to a websocket, would not be uncounted;
    tuneserve serves none.)"""

    def factory():
        protocol = protocol_factory()
        lost = protocol.connection_lost

        def connection_lost(exc):
            shares.add(-1)
            lost(exc)

        protocol.connection_lost = connection_lost
        shares.add(1)
        return protocol

    return factory


def _shares(index: int, workers: int) -> Shares | None:
    folder = Path(tempfile.gettempdir())
    _sweep(folder)
    path = folder / f"{PREFIX}{os.getppid()}"
    try:
        return Shares(index - 1, min(workers, SLOTS), path)
    except (OSError, ValueError) as e:
        log.warning("workers share connections one per turn only: %s: %s", path, e)
        return None


def _sweep(folder: Path) -> None:
    """Remove the files of servers whose arbiter is gone: BentoML's workers end without running
    atexit handlers, so no worker can remove its server's file on the way out."""
    for path in folder.glob(f"{PREFIX}*"):
        try:
            os.kill(int(path.name.removeprefix(PREFIX)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, OSError):  # not ours, or another user's live process
            pass
