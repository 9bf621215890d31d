"""ASGI middleware in front of the prediction routes: malformed multipart bodies get a 400
with {"error", "detail"} before BentoML's parser sees them (it answers them with 500), and
/predict_file accepts uploaded files only (BentoML would treat a text field as a URL to
fetch)."""

from __future__ import annotations

from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

GUARDED = ("/predict", "/predict_file")


class RequestGuard:
    def __init__(self, app, max_body_bytes: int = 20 * 1024 * 1024):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GUARDED:
            return await self.app(scope, receive, send)
        ctype = Headers(scope=scope).get("content-type", "")
        if not ctype.startswith("multipart/"):
            return await self.app(scope, receive, send)
        if "boundary=" not in ctype:
            return await self._reject(
                scope,
                receive,
                send,
                "bad_content_type",
                "multipart body without a boundary in Content-Type",
            )
        body, more = b"", True
        while more:  # buffer the body once, then replay it to the route
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._reject(
                    scope,
                    receive,
                    send,
                    "body_too_large",
                    f"request body exceeds {self.max_body_bytes} bytes",
                    413,
                )

        def replay():
            sent = False

            async def _receive():
                nonlocal sent
                if sent:
                    return {"type": "http.disconnect"}
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            return _receive

        try:
            form = await Request(scope, replay()).form()
        except Exception as e:  # starlette raises MultiPartException / HTTPException / KeyError
            return await self._reject(
                scope, receive, send, "bad_multipart", f"cannot parse the multipart body: {e}"
            )
        if scope["path"] == "/predict_file":
            files = form.getlist("files")
            if not files or not all(isinstance(f, UploadFile) for f in files):
                return await self._reject(
                    scope,
                    receive,
                    send,
                    "no_files",
                    "send one or more image files in the 'files' field",
                )
        await form.close()
        return await self.app(scope, replay(), send)

    @staticmethod
    async def _reject(scope, receive, send, reason: str, detail: str, status: int = 400):
        await JSONResponse({"error": reason, "detail": detail}, status_code=status)(
            scope, receive, send
        )
