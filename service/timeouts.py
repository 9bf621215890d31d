"""BentoML's request timeout (`traffic.timeout`) without a live timer left behind per request.

BentoML 1.4's TimeoutMiddleware schedules `loop.call_later(timeout, ...)` for every request
and never cancels it, so each worker's timer heap holds every request of the last `timeout`
seconds (tuneserve's: the request timeout + 30 s, 60 s by default): 270,000 handles at 4,500
requests/s. Each keep-alive response also schedules uvicorn's idle timer and cancels it at
the next request; asyncio drops cancelled handles by rebuilding the heap once they are half
of it, which at that size stalled the event loop for a few hundred milliseconds at a time
(p99 100 → 500 ms, growing with the heap, on the tables service; bench/RESULTS.md). Same
behaviour here: the request gets BentoML's 504 body when no response has started within the
timeout; the timer goes when the response starts.
"""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse


class TimeoutMiddleware(traffic.TimeoutMiddleware):
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, started)

        def release(_=None) -> None:
            """The response started, or the app ended without one (an exception)."""
            timer.cancel()
            if not started.done():
                started.set_result(None)

        async def _send(message) -> None:
            release()
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, _send))
        app.add_done_callback(release)
        try:
            await started
        except TimeoutError:
            if app.cancel():  # as BentoML words it
                error = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse({"error": error}, status_code=504)(scope, receive, send)
                return
        await app


def install() -> None:
    """BentoML builds its app's middleware from this module attribute (base_app.middlewares)."""
    traffic.TimeoutMiddleware = TimeoutMiddleware
