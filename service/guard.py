"""ASGI middleware in front of every route, before BentoML or FastAPI read a byte of the body:

1. API key (when configured) on every POST route, before the body is read, compared in
   constant time: an unauthenticated client cannot make the server read or parse anything.
2. Body size: a Content-Length above the limit is refused at once; a body without one
   (chunked) is counted while it streams and refused as soon as it passes the limit, so no
   route ever holds more than `max_body_bytes` of a request.
3. Memory: the bodies this worker holds (read, and not yet answered) stay within
   `max_inflight_bytes`; a request whose body would pass it is a 503 with Retry-After, before
   its body is read when it declares its length (4,096 requests x 20 MiB could otherwise be
   held at once).
4. Multipart bodies of the prediction routes are parsed once here: malformed ones get a 400
   (BentoML's parser answers them with 500), and /predict_file takes uploaded files only
   (BentoML would treat a text field as a URL to fetch).

Refusals are JSON `{"error", "detail"}`; `on_reject(reason)` counts them.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

MULTIPART_ROUTES = ("/predict", "/predict_file")


def key_matches(token: str | None, keys: tuple[str, ...]) -> bool:
    """Constant time in the token: every key is compared, whatever matched."""
    given = (token or "").encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found and token is not None


class Rejected(Exception):
    def __init__(self, reason: str, detail: str, status: int = 400, headers=None):
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status
        self.headers = headers or {}


class RequestGuard:
    def __init__(
        self,
        app,
        max_body_bytes: int = 20 * 1024 * 1024,
        api_keys: tuple[str, ...] = (),
        on_reject: Callable[[str], None] | None = None,
        max_inflight_bytes: int = 1 << 30,
    ):
        self.app, self.max_body_bytes, self.api_keys = app, max_body_bytes, api_keys
        self.on_reject = on_reject
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight = 0  # bytes of the bodies held by requests of this worker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            if self.api_keys and scope["method"] == "POST":
                self._check_key(headers)
            length = self._declared_length(headers)
            if length is None and "transfer-encoding" not in headers:
                return await self.app(scope, receive, send)  # no body (GET probes, /metrics)
            self._check_room(length or 0)
            body = await read_body(receive, self.max_body_bytes)
            if body is None:  # the client went away
                return
            self._check_room(len(body))
            if scope["method"] == "POST" and scope["path"] in MULTIPART_ROUTES:
                await self._check_multipart(scope, headers, body)
        except Rejected as e:
            return await self._reject(scope, receive, send, e)
        self.inflight += len(body)
        try:
            return await self.app(scope, replay(body, receive), send)
        finally:
            self.inflight -= len(body)

    def _check_room(self, size: int) -> None:
        if self.inflight + size > self.max_inflight_bytes:
            mib = 1 << 20
            raise Rejected(
                "overloaded",
                f"this worker holds {self.inflight / mib:.0f} MiB of request bodies; "
                f"{size / mib:.1f} MiB more would pass its {self.max_inflight_bytes / mib:.0f} "
                "MiB (TUNESERVE_MAX_QUEUE_MB): retry later",
                503,
                {"Retry-After": "1"},
            )

    def _check_key(self, headers: Headers) -> None:
        auth = headers.get("authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else None
        if not key_matches(token, self.api_keys):
            raise Rejected(
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                401,
                {"WWW-Authenticate": "Bearer"},
            )

    def _declared_length(self, headers: Headers) -> int | None:
        raw = headers.get("content-length")
        if raw is None:
            return None
        if not raw.strip().isdigit():
            raise Rejected("bad_content_length", f"Content-Length {raw!r} is not a byte count")
        if int(raw) > self.max_body_bytes:
            raise Rejected(
                "body_too_large",
                f"request body is {int(raw)} bytes; the limit is {self.max_body_bytes}",
                413,
            )
        return int(raw)

    async def _check_multipart(self, scope, headers: Headers, body: bytes) -> None:
        ctype = headers.get("content-type", "")
        if not ctype.startswith("multipart/"):
            return
        if "boundary=" not in ctype:
            raise Rejected("bad_content_type", "multipart body without a boundary in Content-Type")
        try:
            form = await Request(scope, replay(body, None)).form()
        except Exception as e:  # starlette raises MultiPartException / HTTPException / KeyError
            raise Rejected("bad_multipart", f"cannot parse the multipart body: {e}") from None
        try:
            if scope["path"] == "/predict_file":
                files = form.getlist("files")
                if not files or not all(isinstance(f, UploadFile) for f in files):
                    raise Rejected("no_files", "send one or more image files in the 'files' field")
        finally:
            await form.close()

    async def _reject(self, scope, receive, send, e: Rejected) -> None:
        if self.on_reject is not None:
            self.on_reject(e.reason)
        # The OIP clients (tritonclient) show only "error": it carries the detail there.
        error = f"{e.reason}: {e.detail}" if scope["path"].startswith("/v2") else e.reason
        response = JSONResponse(
            {"error": error, "detail": e.detail}, status_code=e.status, headers=e.headers
        )
        if e.status in (413, 503):  # the rest of the body may be unread: close the connection
            response.headers["Connection"] = "close"
        await response(scope, receive, send)


async def read_body(receive, max_bytes: int | None = None) -> bytes | None:
    """The whole request body, or None when the client went away; Rejected (413) as soon as
    it passes `max_bytes`."""
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise Rejected(
                "body_too_large", f"request body exceeds the limit of {max_bytes} bytes", 413
            )
        parts.append(chunk)
        more = message.get("more_body", False)
    return b"".join(parts)


def replay(body: bytes, receive):
    """A `receive` that hands the buffered body over once, then waits on the real one (for
    the disconnect), or reports a disconnect when there is none."""
    sent = False

    async def _receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return _receive
