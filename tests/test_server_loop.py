"""What tuneserve changes in each worker's event loop: BentoML's request timeout without a timer
left per request (service/timeouts.py), connection counts shared by the workers
(service/accept.py). The burst across real workers is in test_service.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from service.accept import PREFIX, Shares, _sweep
from service.timeouts import TimeoutMiddleware


async def _call_async(app, sent: list | None = None) -> None:
    """One POST /predict through `app`; the messages it sends go into `sent`."""

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if sent is not None:
            sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/predict", "headers": []}, receive, send)


def _call(app):
    """One request through `app`; returns (status, body, the middleware's timers still live)."""
    sent = []

    async def main():
        await _call_async(app, sent)
        loop = asyncio.get_running_loop()
        return [h for h in loop._scheduled if not h.cancelled() and "_set_timer_out" in repr(h)]

    live = asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, live


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_an_answered_request_leaves_no_timer_behind():
    status, body, live = _call(TimeoutMiddleware(_ok, timeout=60))
    assert (status, body) == (200, b"ok")
    assert live == [], "the 60-s timer outlived the request (BentoML's own middleware leaves it)"


def test_a_request_past_the_timeout_gets_bentomls_504():
    async def slow(scope, receive, send):
        await asyncio.sleep(5)
        await _ok(scope, receive, send)

    status, body, live = _call(TimeoutMiddleware(slow, timeout=0.05))
    assert status == 504
    assert json.loads(body) == {"error": "Not able to process the request in 0.05 seconds"}
    assert live == []


def test_an_app_that_fails_before_answering_raises_at_once():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(asyncio.wait_for(_call_async(TimeoutMiddleware(broken, timeout=60)), 5))


def test_workers_see_each_others_connection_counts(tmp_path):
    path = tmp_path / "connections"
    first, second = Shares(0, 2, path), Shares(1, 2, path)
    first.add(2)
    assert not first.ahead(), "2 against 0 is within the slack"
    first.add(1)
    assert first.ahead() and not second.ahead()
    second.add(3)
    assert not first.ahead()
    first.add(-3)
    assert list(second.counts[:2]) == [0, 3]
    assert Shares(0, 2, path).counts[0] == 0, "a restarted worker starts from zero"


def test_files_of_servers_that_are_gone_are_removed(tmp_path):
    """Workers end without atexit handlers; the next server start removes what they left."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    (tmp_path / f"{PREFIX}{gone}").write_bytes(b"")
    (tmp_path / f"{PREFIX}{os.getpid()}").write_bytes(b"")
    (tmp_path / f"{PREFIX}notapid").write_bytes(b"")
    _sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{PREFIX}{os.getpid()}",
        f"{PREFIX}notapid",
    ]
