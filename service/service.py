"""BentoML service: `bentoml serve` from the project root (bentofile.yaml), TUNESERVE_MODEL
names the artifact (`digits:latest` or a folder).

One service process per worker: validation and pre-processing per request, then every
prediction route (JSON, multipart, Open Inference Protocol) awaits the one adaptive-batching
path (`service.batching.Batcher`), which runs the ONNX Runtime session once per batch.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from service import metrics
from service.accept import accept_one_per_turn
from service.batching import Batcher
from service.drift import Monitor
from service.errors import ArtifactError, InputError
from service.guard import RequestGuard
from service.oip import oip_app
from service.runtime import Runtime, listed_precisions, softmax, usable_providers
from service.settings import Settings

log = logging.getLogger("tuneserve")
settings = Settings.from_env()
accept_one_per_turn()  # before uvicorn starts serving in this worker


def artifact_folder(spec: str) -> Path:
    """An artifact directory, or the path of a model-store tag."""
    if Path(spec).is_dir():
        return Path(spec)
    from bentoml.exceptions import BentoMLException

    try:
        return Path(bentoml.models.get(spec).path)
    except (BentoMLException, ValueError) as e:  # ValueError: not even a valid tag
        raise ArtifactError(
            f"TUNESERVE_MODEL={spec!r} is neither an artifact folder nor a model "
            f"in the BentoML store ({e}); export one with python -m export"
        ) from e


def _check_artifact() -> tuple[Path, bool]:
    """Refuse to start, with one line, on a missing or corrupt artifact: at import time, before
    BentoML starts any worker (a worker that dies in __init__ would only be restarted).
    Returns the artifact folder and whether a GPU provider is usable (it sets the workers)."""
    from export.card import load_card, verify_files
    from export.errors import CardError

    try:
        folder = artifact_folder(settings.model)
        card = load_card(folder)
        verify_files(folder, card)
        listed_precisions(card, settings.precision, folder)
        on_gpu = usable_providers(settings.providers)[0] != "CPUExecutionProvider"
    except (ArtifactError, CardError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return folder, on_gpu


ARTIFACT, ON_GPU = _check_artifact()


def _runtime() -> Runtime:
    try:
        return Runtime(
            ARTIFACT,
            precision=settings.precision,
            providers=settings.providers,
            threads=settings.thread_count(ON_GPU),
            max_image_pixels=settings.max_image_pixels,
            max_text_chars=settings.max_text_chars,
            max_batch_size=settings.max_batch_size,
            verify=False,  # _check_artifact verified the files when this process imported us
            warm=False,  # Batcher warms the session up on the thread that runs every batch
        )
    except ArtifactError as e:  # one clear line, then the worker stops
        log.error("error: %s", e)
        raise SystemExit(f"error: {e}") from None


class Score(BaseModel):
    label: str
    score: float


class Prediction(Score):
    top_k: list[Score]  # the k most probable labels, best first (k = the request's top_k)


class PredictResponse(BaseModel):
    """A typed response: BentoML otherwise derives a JSON schema per response to pick its
    media type (8% of a worker's request-handling CPU under load, bench/RESULTS.md)."""

    model: str
    version: str
    predictions: list[Prediction]


@bentoml.asgi_app(oip_app, path="/")
@bentoml.service(
    name="tuneserve",
    workers=settings.worker_count(ON_GPU),
    traffic={"timeout": 60, "max_concurrency": 1024},
    logging={"access": {"enabled": settings.access_log}},
    # No spans unless asked for: BentoML's tracing middleware otherwise runs on every request.
    tracing={} if settings.tracing else {"excluded_urls": [".*"]},
)
class Tuneserve:
    if not Path(settings.model).is_dir():  # a store tag: `bentoml build` packs that model
        model_ref = bentoml.models.BentoModel(settings.model)

    def __init__(self) -> None:
        self.rt = _runtime()
        path = self.rt.folder / "reference.json"
        reference = json.loads(path.read_text()) if path.is_file() else {}
        self.monitor = drift_monitor(self.rt, reference.get("drift", {}), settings.drift_interval_s)
        # Warms the session up: /readyz answers once __init__ returns.
        self.batch = Batcher(
            self.rt, settings.max_batch_size, settings.max_latency_ms, self.monitor
        )
        metrics.model_info(self.rt)
        metrics.reference(self.rt, reference.get("class_prior", {}))

    async def logits(self, raw: list) -> np.ndarray:
        """Validate every input, then one call into the batching path (InputError on misuse)."""
        if not isinstance(raw, list) or not raw:
            raise InputError("no_inputs", "'inputs' must be a non-empty list")
        if len(raw) > settings.max_items:
            raise InputError(
                "too_many_inputs",
                f"{len(raw)} inputs; the limit per request is {settings.max_items}",
                status=413,
            )
        t0 = time.perf_counter()
        prepared = []
        for i, value in enumerate(raw):
            try:
                prepared.append(self.rt.prepare(value))
            except InputError as e:
                raise InputError(e.reason, f"inputs[{i}]: {e.detail}", e.status) from None
        metrics.preprocess(self.rt, time.perf_counter() - t0)
        return await self.batch(prepared)

    async def classify(self, raw: list, top_k: int, request: Request | None) -> list[dict]:
        check_request(request)
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError("bad_top_k", f"top_k must be a positive integer, got {top_k!r}")
        logits = await self.logits(raw)
        t1 = time.perf_counter()
        out = [self.rt.describe(p, top_k) for p in softmax(logits)]
        metrics.predictions(self.rt, out, time.perf_counter() - t1)
        return out

    def response(self, predictions: list[dict]) -> PredictResponse:
        return PredictResponse.model_validate(
            {"model": self.rt.name, "version": self.rt.version, "predictions": predictions}
        )

    # Errors leave as a JSONResponse (`reject`), which BentoML passes through unchanged.
    @bentoml.api(route="/predict")
    async def predict(
        self, inputs: list, top_k: int = 1, ctx: bentoml.Context = None
    ) -> PredictResponse:
        """Classify texts or base64-encoded images: {"inputs": [...], "top_k": k}."""
        try:
            return self.response(await self.classify(inputs, top_k, ctx.request))
        except InputError as e:
            return reject(self.rt, e, ctx)

    @bentoml.api(route="/predict_file")
    async def predict_file(
        self, files: list[Path], top_k: int = 1, ctx: bentoml.Context = None
    ) -> PredictResponse:
        """Classify uploaded image files (multipart/form-data, field `files`)."""
        try:
            check_request(ctx.request)
            if self.rt.task != "image-classification":
                raise InputError(
                    "wrong_route",
                    "/predict_file takes images; this model classifies text: use /predict",
                )
            raw = [Path(f).read_bytes() for f in files]
            return self.response(await self.classify(raw, top_k, ctx.request))
        except InputError as e:
            return reject(self.rt, e, ctx)


Tuneserve.add_asgi_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)


def drift_monitor(rt: Runtime, drift: dict, interval_s: int) -> Monitor | None:
    """The drift window of this worker (`drift`: reference.json's calibration), evaluated by a
    background thread every `interval_s` seconds, off the request path; None when off or when
    the artifact has no calibration."""
    import threading

    if interval_s <= 0 or "thresholds" not in drift:
        if interval_s > 0:
            why = drift.get("disabled", "no drift calibration; re-export the artifact")
            log.warning("drift monitoring off for %s: %s", rt.folder, why)
        return None
    monitor = Monitor(drift)

    def evaluate() -> None:
        while True:
            time.sleep(interval_s)
            try:
                metrics.drift(rt, monitor.samples(), monitor.scores(), time.time())
            except Exception:  # a monitoring bug must not stop the monitoring thread
                log.exception("drift evaluation failed")

    threading.Thread(target=evaluate, name="drift", daemon=True).start()
    return monitor


def check_request(request: Request | None) -> None:
    """API key and body-size checks shared by every prediction route."""
    if request is None:
        return
    if settings.api_keys:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        if token not in settings.api_keys:
            raise InputError(
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                status=401,
            )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_body_bytes:
        raise InputError(
            "body_too_large",
            f"request body is {length} bytes; the limit is {settings.max_body_bytes}",
            status=413,
        )


def reject(rt: Runtime, e: InputError, ctx: bentoml.Context) -> JSONResponse:
    """The error response of a BentoML route; BentoML sets the status from the context."""
    metrics.error(rt, e.reason)
    ctx.response.status_code = e.status
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def error_response(rt: Runtime, e: InputError) -> JSONResponse:
    """The error response for the mounted Open Inference Protocol routes, whose clients show
    only the "error" field: it carries the reason and the detail."""
    metrics.error(rt, e.reason)
    body = {"error": f"{e.reason}: {e.detail}", "detail": e.detail}
    return JSONResponse(body, status_code=e.status, headers=e.headers())
