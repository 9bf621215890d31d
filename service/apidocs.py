"""The API documentation of the model being served: `/` (Swagger UI from BentoML's local
static files, without its external tag manager and badges) and `/docs.json` (BentoML's
OpenAPI document with `info` describing the model: name, version, task, labels, and an
example request and response on /predict)."""

from __future__ import annotations

import html
import json
from collections.abc import Callable

from starlette.responses import HTMLResponse, Response


def examples(rt) -> tuple[dict, dict]:
    """An example /predict request and the shape of its answer (scores illustrative)."""
    request = {"inputs": [rt.contract.example_input], **rt.contract.example_params()}
    response = {
        "model": rt.name,
        "version": rt.version,
        "predictions": [rt.contract.example_answer()],
    }
    return request, response


def describe(rt, request: dict, response: dict) -> str:
    labels = ", ".join(rt.labels)
    return (
        f"**{rt.name}** version **{rt.version}**, task `{rt.task}`, served by tuneserve "
        f"({rt.precision} on {rt.provider}).\n\nLabels ({len(rt.labels)}): {labels}.\n\n"
        f"Example `POST /predict`:\n\n```json\n{json.dumps(request)}\n```\n\nAnswer (scores "
        f"illustrative):\n\n```json\n{json.dumps(response, indent=1)}\n```\n\nThe same model "
        f"answers the Open Inference Protocol at `/v2/models/{rt.name}/infer`. Errors are "
        '4xx with `{"error", "detail"}`; 503 with `Retry-After` when the queue is full.'
    )


def patch_spec(spec: dict, rt) -> dict:
    request, response = examples(rt)
    spec["info"] = {
        "title": f"{rt.name} ({rt.task})",
        "version": rt.version,
        "description": describe(rt, request, response),
    }
    predict = spec.get("paths", {}).get("/predict", {}).get("post", {})
    body = predict.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None:
        body["example"] = request
    ok = predict.get("responses", {}).get("200", {}).get("content", {}).get("application/json")
    if ok is not None:
        ok["example"] = response
    return spec


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="UTF-8"><title>{title}</title>
<link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
</head><body>
<div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
<script>
window.onload = function () {{
  window.ui = SwaggerUIBundle({{url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"}});
}};
</script>
</body></html>
"""


class ApiDocs:
    """ASGI middleware answering GET / and rewriting GET /docs.json; `runtime()` gives the
    worker's Runtime (None before the model is loaded: BentoML's pages pass through)."""

    def __init__(self, app, runtime: Callable[[], object]):
        self.app, self.runtime = app, runtime

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        rt = self.runtime() if scope["type"] == "http" and path in ("/", "/docs.json") else None
        if rt is None or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        if path == "/":
            title = html.escape(f"{rt.name} {rt.version} - tuneserve")
            return await HTMLResponse(PAGE.format(title=title))(scope, receive, send)
        status, chunks = 200, []

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if status == 200:
            body = json.dumps(patch_spec(json.loads(body), rt)).encode()
        await Response(body, status, media_type="application/json")(scope, receive, send)
