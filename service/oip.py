"""Open Inference Protocol v2 (KServe / Triton HTTP) routes under /v2, so that existing
clients such as `tritonclient.http` work unchanged, including its binary tensor extension.
Mounted at the root: BentoML's passive mount only takes requests one of these routes matches.

Inputs and outputs are the task's (`tasks/`): classification takes one BYTES tensor of texts
or encoded images and answers `logits`, `probabilities` (FP32, [n, classes]) and `label`
(BYTES, [n]); question answering takes BYTES `question` and `context`; and so on.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.errors import InputError

HEADER = "Inference-Header-Content-Length"
oip_app = FastAPI(title="Open Inference Protocol v2", openapi_url=None, docs_url=None)


def _service():
    import bentoml

    return bentoml.get_current_service()


def error_response(rt, e: InputError) -> JSONResponse:
    """The error response of the OIP routes, whose clients (tritonclient) show only the
    "error" field: it carries the reason and the detail."""
    metrics.error(rt, e.reason)
    body = {"error": f"{e.reason}: {e.detail}", "detail": e.detail}
    return JSONResponse(body, status_code=e.status, headers=e.headers())


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
    from service import __version__

    return {
        "name": "tuneserve",
        "version": __version__,
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
    task = rt.contract
    return {
        "name": rt.name,
        "versions": [rt.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in task.oip_input_names]
        + [
            {"name": n, "datatype": "FP32", "shape": [-1, int(k)]}
            for n, k in task.oip_numeric_inputs.items()
        ],
        "outputs": [
            {"name": o.name, "datatype": o.datatype, "shape": [-1, *o.shape]}
            for o in task.oip_outputs()
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


def _field(obj: dict, key: str, kind: type, where: str, required: bool = False):
    """obj[key] when it has the right JSON type; InputError naming the field otherwise."""
    if key not in obj or obj[key] is None:
        if required:
            raise InputError("bad_request", f"{where}: '{key}' is required")
        return None
    value = obj[key]
    if not isinstance(value, kind):
        want = {dict: "an object", list: "a list", str: "a string"}[kind]
        raise InputError(
            "bad_request", f"{where}: '{key}' must be {want}, got {type(value).__name__}"
        )
    return value


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError("bad_request", f"{where} must be a non-negative integer, got {value!r}")
    return value


def parse_request(body: bytes, header_len: str | None) -> tuple[dict, list]:
    """The JSON head and the input values of an inference request, every field checked."""
    try:
        if header_len is not None:
            if not header_len.strip().isdigit() or int(header_len) > len(body):
                raise InputError(
                    "bad_request",
                    f"{HEADER} {header_len!r} must be a byte count within the body "
                    f"({len(body)} bytes)",
                )
            n = int(header_len)
            head, binary = json.loads(body[:n]), body[n:]
        else:
            head, binary = json.loads(body), b""
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(
            "bad_json", f"request body is not a valid inference request: {e}"
        ) from None
    if not isinstance(head, dict):
        raise InputError("bad_request", "the inference request must be a JSON object")
    _field(head, "id", str, "request")
    params = _field(head, "parameters", dict, "request") or {}
    if "binary_data_output" in params and not isinstance(params["binary_data_output"], bool):
        raise InputError("bad_request", "parameters.binary_data_output must be true or false")
    outputs = _field(head, "outputs", list, "request") or []
    for i, o in enumerate(outputs):
        where = f"outputs[{i}]"
        if not isinstance(o, dict):
            raise InputError("bad_request", f"{where} must be an object with a 'name'")
        _field(o, "name", str, where, required=True)
        p = _field(o, "parameters", dict, where) or {}
        if "binary_data" in p and not isinstance(p["binary_data"], bool):
            raise InputError("bad_request", f"{where}.parameters.binary_data must be a boolean")
    inputs = _field(head, "inputs", list, "request", required=True)
    if not inputs:
        raise InputError("bad_request", "'inputs' holds no tensor")
    tensors: dict[str, list] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise InputError("bad_request", f"{where} must be a tensor object")
        name = _field(tensor, "name", str, where) or "INPUT"
        if name in tensors:
            raise InputError("bad_request", f"{where}: input '{name}' sent twice")
        values, offset = _tensor_values(tensor, where, binary, offset)
        tensors[name] = values
    return head, tensors


def _binary_part(tensor: dict, where: str, binary: bytes, offset: int):
    """(this tensor's bytes of the binary extension or None when it came as JSON, the offset
    of the next tensor's)."""
    size = (_field(tensor, "parameters", dict, where) or {}).get("binary_data_size")
    if size is None:
        return None, offset
    size = _count(size, f"{where}.parameters.binary_data_size")
    if offset + size > len(binary):
        raise InputError(
            "bad_tensor", f"binary_data_size {size} exceeds the {len(binary) - offset} bytes sent"
        )
    return binary[offset : offset + size], offset + size


NUMERIC_INPUTS = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8"}


def _numeric_values(tensor: dict, where: str, binary: bytes, offset: int):
    """A numeric input tensor as a float64 array of its shape (tables: FP32 [n, features])."""
    datatype = tensor["datatype"]
    shape = _field(tensor, "shape", list, where, required=True)
    dims = [_count(d, f"{where}.shape dimension") for d in shape]
    n = int(np.prod(dims)) if dims else 1
    raw, offset = _binary_part(tensor, where, binary, offset)
    if raw is not None:
        dtype = np.dtype(NUMERIC_INPUTS[datatype])
        if len(raw) % dtype.itemsize:
            raise InputError(
                "bad_tensor", f"{where}: {len(raw)} bytes are not whole {datatype} elements"
            )
        values = np.frombuffer(raw, dtype)
    elif isinstance(tensor.get("data"), list):
        flat = _flatten(tensor["data"])
        if any(isinstance(v, bool) or not isinstance(v, int | float | None) for v in flat):
            raise InputError("wrong_type", f"{where}: {datatype} data elements are numbers")
        values = np.array([np.nan if v is None else v for v in flat], dtype=np.float64)
    else:
        raise InputError("bad_tensor", f"{where} has neither 'data' nor binary data")
    if values.size != n:
        raise InputError(
            "bad_tensor", f"shape {dims} does not hold the {values.size} elements sent"
        )
    return values.astype(np.float64).reshape(dims), offset


def _tensor_values(tensor: dict, where: str, binary: bytes, offset: int) -> tuple[list, int]:
    """The elements of one BYTES input tensor, from JSON data or the binary extension (tensors
    sent as binary follow one another in the body, in the order of 'inputs'); a numeric
    tensor comes back as a numpy array of its shape."""
    if tensor.get("datatype") in NUMERIC_INPUTS:
        return _numeric_values(tensor, where, binary, offset)
    if tensor.get("datatype") != "BYTES":
        raise InputError(
            "wrong_type",
            f"{where} must have datatype BYTES (texts, encoded images or audio, table values) "
            f"or, for tables, FP32 [n, features]",
        )
    shape = _field(tensor, "shape", list, where)
    raw, offset = _binary_part(tensor, where, binary, offset)
    if raw is not None:
        values: list = _bytes_elements(raw)
    elif isinstance(tensor.get("data"), list):
        values = _flatten(tensor["data"])
        for v in values:
            if not isinstance(v, str):
                raise InputError(
                    "wrong_type",
                    f"BYTES data elements are strings (texts or base64), got {type(v).__name__}",
                )
    else:
        raise InputError("bad_tensor", f"{where} has neither 'data' nor binary data")
    if shape is not None:
        dims = [_count(d, f"{where}.shape dimension") for d in shape]
        if int(np.prod(dims)) != len(values):
            raise InputError(
                "bad_tensor", f"shape {dims} does not hold the {len(values)} elements sent"
            )
    return values, offset


def _flatten(data: list, depth: int = 0) -> list:
    """Row-major elements of a nested JSON list (at most 8 levels deep)."""
    if depth > 8:
        raise InputError("bad_tensor", "tensor data is nested more than 8 levels deep")
    out = []
    for v in data:
        out.extend(_flatten(v, depth + 1) if isinstance(v, list) else [v])
    return out


def _binary_response(head: dict, chunks: list[bytes]) -> Response:
    header = json.dumps(head).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER: str(len(header))},
    )


# The request body of `infer` as the OpenAPI document describes it (the route reads the raw
# body itself, for the binary extension), so that clients and fuzzers see its fields.
INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {
                        "type": "object",
                        "properties": {"binary_data_output": {"type": "boolean"}},
                    },
                    "inputs": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "datatype", "shape", "data"],
                            "properties": {
                                "name": {"type": "string", "example": "INPUT"},
                                "datatype": {"type": "string", "enum": ["BYTES"]},
                                "shape": {"type": "array", "items": {"type": "integer"}},
                                "data": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "texts, or base64-encoded images",
                                },
                                "parameters": {
                                    "type": "object",
                                    "properties": {"binary_data_size": {"type": "integer"}},
                                },
                            },
                        },
                    },
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {
                                    "type": "object",
                                    "properties": {"binary_data": {"type": "boolean"}},
                                },
                            },
                        },
                    },
                },
            }
        }
    },
}


@oip_app.post("/v2/models/{name}/infer", openapi_extra={"requestBody": INFER_BODY})
@oip_app.post(
    "/v2/models/{name}/versions/{version}/infer", openapi_extra={"requestBody": INFER_BODY}
)
async def infer(name: str, request: Request, version: str | None = None):
    svc, missing = _model_or_404(name, version)
    if missing:
        return missing
    rt = svc.rt
    task = rt.contract
    datatypes = {o.name: o.datatype for o in task.oip_outputs()}
    names = list(datatypes)
    try:
        head, tensors = parse_request(await request.body(), request.headers.get(HEADER))
        wanted = head.get("outputs") or [{"name": k} for k in names]
        unknown = [o["name"] for o in wanted if o["name"] not in names]
        if unknown:
            raise InputError(
                "unknown_output", f"unknown output(s) {unknown}; outputs are {', '.join(names)}"
            )
        params = task.check_params({})
        outputs = await svc.outputs(task.oip_items(tensors), params)
    except InputError as e:
        return error_response(rt, e)
    responses = await svc.postprocessed(outputs, params)
    tensors_out = task.oip_tensors(outputs, responses)
    all_binary = bool((head.get("parameters") or {}).get("binary_data_output"))
    outputs_json, chunks = [], []
    for o in wanted:
        value, datatype = tensors_out[o["name"]], datatypes[o["name"]]
        is_bytes = datatype == "BYTES"
        entry = {
            "name": o["name"],
            "datatype": datatype,
            "shape": [len(value)] if is_bytes else list(value.shape),
        }
        if (o.get("parameters") or {}).get("binary_data", all_binary):
            data = (
                b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in value)
                if is_bytes
                else value.astype(NUMPY_TYPES[datatype]).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = value if is_bytes else value.reshape(-1).tolist()
        outputs_json.append(entry)
    result = {"model_name": rt.name, "model_version": rt.version, "outputs": outputs_json}
    if "id" in head:
        result["id"] = head["id"]
    return _binary_response(result, chunks) if chunks else result


NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8", "UINT8": "<u1"}
