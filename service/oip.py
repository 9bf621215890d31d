"""Open Inference Protocol v2 (KServe / Triton HTTP) routes under /v2, so that existing
clients such as `tritonclient.http` work unchanged, including its binary tensor extension.
Mounted at the root: BentoML's passive mount only takes requests one of these routes matches.

Input: one BYTES tensor of texts or encoded images. Outputs: `logits` and `probabilities`
(FP32, [n, classes]) and `label` (BYTES, [n]).
"""

from __future__ import annotations

import json
import struct

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service.errors import InputError

HEADER = "Inference-Header-Content-Length"
oip_app = FastAPI(title="Open Inference Protocol v2", openapi_url=None, docs_url=None)


def _service():
    import bentoml

    return bentoml.get_current_service()


def _fail(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


def _model_or_404(name: str, version: str | None = None):
    svc = _service()
    rt = svc.rt
    if name != rt.name or (version is not None and version != rt.version):
        wanted = f"{name}:{version}" if version else name
        return svc, _fail(
            404,
            "model_not_found",
            f"model '{wanted}' is not served here; this server serves "
            f"'{rt.name}' version '{rt.version}'",
        )
    return svc, None


@oip_app.get("/v2")
@oip_app.get("/v2/")
async def server_metadata():
    from importlib.metadata import version

    return {
        "name": "tuneserve",
        "version": version("tuneserve"),
        "extensions": ["binary_tensor_data"],
    }


@oip_app.get("/v2/health/live")
async def live():
    return {"live": True}


@oip_app.get("/v2/health/ready")
async def ready():
    return {"ready": True}


@oip_app.get("/v2/models/{name}")
@oip_app.get("/v2/models/{name}/versions/{version}")
async def model_metadata(name: str, version: str | None = None):
    svc, missing = _model_or_404(name, version)
    if missing:
        return missing
    rt = svc.rt
    n = len(rt.labels)
    return {
        "name": rt.name,
        "versions": [rt.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, n]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"task": rt.task, "labels": rt.labels},
    }


@oip_app.get("/v2/models/{name}/ready")
@oip_app.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, version: str | None = None):
    _, missing = _model_or_404(name, version)
    return missing or {"name": name, "ready": True}


def _bytes_elements(raw: bytes) -> list[bytes]:
    """The binary form of a BYTES tensor: each element a little-endian uint32 length + data."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InputError("bad_tensor", "truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise InputError("bad_tensor", "BYTES element longer than the data sent")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


async def _parse(request: Request) -> tuple[dict, list]:
    body = await request.body()
    header_len = request.headers.get(HEADER)
    try:
        if header_len is not None:
            n = int(header_len)
            head, binary = json.loads(body[:n]), body[n:]
        else:
            head, binary = json.loads(body), b""
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(
            "bad_json", f"request body is not a valid inference request: {e}"
        ) from None
    if (
        not isinstance(head, dict)
        or not isinstance(head.get("inputs"), list)
        or len(head["inputs"]) != 1
    ):
        raise InputError("bad_request", "send exactly one input tensor in 'inputs'")
    tensor = head["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("datatype") != "BYTES":
        raise InputError(
            "wrong_type", "the input tensor must have datatype BYTES (texts or encoded images)"
        )
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        values: list = _bytes_elements(binary[: int(size)])
    elif isinstance(tensor.get("data"), list):
        values = list(np.asarray(tensor["data"], dtype=object).reshape(-1))
    else:
        raise InputError("bad_tensor", "the input tensor has neither 'data' nor binary data")
    return head, values


def _as_inputs(values: list, task: str) -> list:
    if task == "image-classification":
        return values  # raw bytes (binary) or base64 strings (JSON): Runtime.prepare takes both
    out = []
    for v in values:
        if isinstance(v, bytes | bytearray):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("bad_text", "a BYTES text element is not UTF-8") from None
        out.append(v)
    return out


def _binary_response(head: dict, chunks: list[bytes]) -> Response:
    header = json.dumps(head).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER: str(len(header))},
    )


@oip_app.post("/v2/models/{name}/infer")
@oip_app.post("/v2/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str | None = None):
    from service.runtime import softmax
    from service.service import check_request, error_response

    svc, missing = _model_or_404(name, version)
    if missing:
        return missing
    rt = svc.rt
    try:
        check_request(request)
        head, values = await _parse(request)
        logits = await svc.logits(_as_inputs(values, rt.task))
    except InputError as e:
        return error_response(rt, e)
    probs = softmax(logits).astype(np.float32)
    labels = [rt.labels[i] for i in probs.argmax(1)]
    tensors = {"logits": logits.astype(np.float32), "probabilities": probs, "label": labels}
    wanted = head.get("outputs") or [{"name": k} for k in tensors]
    unknown = [o.get("name") for o in wanted if o.get("name") not in tensors]
    if unknown:
        return error_response(
            rt,
            InputError(
                "unknown_output", f"unknown output(s) {unknown}; outputs are {', '.join(tensors)}"
            ),
        )
    all_binary = bool((head.get("parameters") or {}).get("binary_data_output"))
    outputs, chunks = [], []
    for o in wanted:
        value = tensors[o["name"]]
        is_bytes = o["name"] == "label"
        entry = {
            "name": o["name"],
            "datatype": "BYTES" if is_bytes else "FP32",
            "shape": [len(value)] if is_bytes else list(value.shape),
        }
        if (o.get("parameters") or {}).get("binary_data", all_binary):
            data = (
                b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in value)
                if is_bytes
                else value.astype("<f4").tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = value if is_bytes else value.reshape(-1).tolist()
        outputs.append(entry)
    result = {"model_name": rt.name, "model_version": rt.version, "outputs": outputs}
    if "id" in head:
        result["id"] = head["id"]
    return _binary_response(result, chunks) if chunks else result
