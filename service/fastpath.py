"""The short path for JSON `POST /predict`, the route production clients call most.

BentoML routes every request through its context middleware, Starlette's router and its API
handler, which builds a pydantic model of the request and a typed response: about a tenth of a
worker's CPU per small text request (bench/RESULTS.md, py-spy). This middleware answers a
well-formed JSON body itself with the service's own `answer` (the same validation, batching,
post-processing, metrics and error bodies as the route) and hands anything else (another route,
multipart, malformed JSON, fields of an unexpected type or name) to BentoML's route unchanged,
so every error a client can provoke keeps the route's answer. It sits inside RequestGuard:
API keys and body limits apply first.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from service import metrics
from service.errors import InputError
from service.guard import read_body, replay

PARAMS = {
    "top_k": (int,),
    "min_score": (int, float),
    "render": (bool,),
    # generative tasks
    "max_new_tokens": (int,),
    "num_beams": (int,),
    "language": (str,),
    "task": (str,),
}
JSON_TYPES = (b"application/json",)


def simple_request(payload) -> tuple[list, dict] | None:
    """(inputs, params) of a body the route would read the same way, or None: then the route
    reads it (and words any error). A field no route takes is a 400 here: BentoML's route
    would ignore it, and a client's misspelt `top-k` would be answered as if unsent."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        return None
    unknown = sorted(set(payload) - {"inputs", *PARAMS})
    if unknown:
        raise InputError(
            "bad_request",
            f"unknown field(s) {', '.join(map(repr, unknown))}; fields: inputs, "
            + ", ".join(PARAMS),
        )
    params = {name: None for name in PARAMS}
    for key, value in payload.items():
        if key == "inputs":
            continue
        kinds = PARAMS[key]
        # bool is an int in Python: the route's pydantic model reads True as top_k=1; leave
        # such values, and any coercion, to it.
        if value is not None and (type(value) not in kinds):
            return None
        params[key] = value
    return payload["inputs"], params


class FastPredict:
    def __init__(self, app, service: Callable[[], object | None]):
        self.app, self.service = app, service  # service(): this worker's Tuneserve, or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        svc = self.service()
        ctype = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        if svc is None or ctype not in JSON_TYPES:
            return await self.app(scope, receive, send)
        body = await read_body(receive)  # RequestGuard has bounded it
        if body is None:  # the client went away
            return
        try:
            request = simple_request(json.loads(body))
        except ValueError:  # not JSON (or not UTF-8): the route's own 400
            request = None
        except RecursionError:  # nested past Python's stack; pydantic's parser stops at 200
            request = None
        except InputError as e:
            request = e
        if request is None:
            return await self.app(scope, replay(body, receive), send)
        try:
            if isinstance(request, InputError):
                raise request
            answer = svc.response(await svc.answer(*request)).model_dump_json().encode()
            status, headers = 200, {}
        except InputError as e:
            metrics.error(svc.rt, e.reason)
            answer = json.dumps(e.body(), separators=(",", ":")).encode()  # as the route words it
            status, headers = e.status, e.headers()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})
