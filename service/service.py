"""BentoML service: `bentoml serve` from the project root (bentofile.yaml), TUNESERVE_MODEL
names the artifact (`digits:latest` or a folder).

One service process per worker: validation and pre-processing per request, then every
prediction route (JSON, multipart, Open Inference Protocol) awaits the one adaptive-batching
path (`service.batching.Batcher`), which runs the ONNX Runtime session once per batch.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.responses import JSONResponse

from service import metrics
from service.accept import accept_one_per_turn
from service.apidocs import ApiDocs
from service.batching import Batcher
from service.drift import Monitor
from service.errors import ArtifactError, InputError
from service.fastpath import FastPredict
from service.generation import Generator
from service.guard import RequestGuard
from service.memory import Trimmer
from service.oip import oip_app
from service.runtime import Runtime, listed_precisions, usable_providers
from service.settings import Settings
from service.threads import name_os_thread
from service.timeouts import install as cancel_request_timers

log = logging.getLogger("tuneserve")
# Imported by BentoML's arbiter before it starts the workers, which inherit it: glibc gives
# each thread that allocates its own arena, and the decode threads' peaks (a request of 64
# texts of 20,000 characters tokenized, 24-MP JPEGs) stayed resident per arena: workers grew
# 110 MB over bench/hostile.py's entity probes with the default; fewer arenas hold less, and
# service/memory.py hands the free pages back after heavy requests.
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
try:
    settings = Settings.from_env()
except SystemExit as e:  # a bad setting: one line, before BentoML starts any worker
    print(e.code, file=sys.stderr)
    raise SystemExit(2) from None


def bento_model(spec: str) -> Path | None:
    """The folder of model `name[:version]` packed in the bento this module runs from (a built
    bento: <bento>/src/service/service.py beside <bento>/models/), or None."""
    root = Path(__file__).resolve().parents[2]
    name, _, version = spec.partition(":")
    folder = root / "models" / name
    if not (root / "bento.yaml").is_file() or not folder.is_dir():
        return None
    if version in ("", "latest") and (folder / "latest").is_file():
        version = (folder / "latest").read_text().strip()
    return folder / version if (folder / version / "card.json").is_file() else None


def artifact_folder(spec: str) -> Path:
    """An artifact directory, a model packed in the running bento, or the path of a
    model-store tag."""
    if Path(spec).is_dir():
        return Path(spec)
    packed = bento_model(spec)
    if packed is not None:  # `bentoml serve <bento folder>` does not switch the store first
        return packed
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
# before uvicorn starts serving in this worker (BentoML sets the index before importing us)
accept_one_per_turn(bentoml.server_context.worker_index, settings.worker_count(ON_GPU))
cancel_request_timers()


def _runtime() -> Runtime:
    try:
        return Runtime(
            ARTIFACT,
            precision=settings.precision,
            providers=settings.providers,
            threads=settings.thread_count(ON_GPU),
            max_image_pixels=settings.max_image_pixels,
            max_text_chars=settings.max_text_chars,
            max_audio_seconds=settings.max_audio_seconds,
            max_output_pixels=settings.max_output_pixels,
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


class Entity(BaseModel):
    text: str  # the original text from start to end
    label: str  # entity type
    start: int  # character offsets into the input text
    end: int
    score: float  # mean of the words' probabilities


class Entities(BaseModel):
    entities: list[Entity]


class Answer(BaseModel):
    answer: str  # the span of the context ("" for no answer)
    score: float
    start: int  # character offsets into the context
    end: int


class Detection(BaseModel):
    label: str
    score: float
    box: list[float]  # x1, y1, x2, y2 in the original image's pixels


class Detections(BaseModel):
    model_config = ConfigDict(extra="allow")  # "image": the boxes drawn, when asked (render)
    detections: list[Detection]


class Segmentation(BaseModel):
    model_config = ConfigDict(extra="allow")  # "image": the colour overlay (render)
    mask: str  # base64 PNG, one class index per pixel, at the image's size (or fit to the cap)
    mask_size: list[int]  # its width and height: the image's, or scaled to fit
    class_shares: dict[str, float]


class Chunk(BaseModel):
    text: str
    start: float  # seconds of the clip this window's text covers
    end: float


class Transcript(BaseModel):
    text: str
    chunks: list[Chunk]


class PredictResponse(BaseModel):
    """A typed response: BentoML otherwise derives a JSON schema per response to pick its
    media type (8% of a worker's request-handling CPU under load, bench/RESULTS.md)."""

    model: str
    version: str
    # One list per task (classification, token classification, question answering,
    # detection, segmentation, speech recognition).
    predictions: (
        list[Prediction]
        | list[Entities]
        | list[Answer]
        | list[Detections]
        | list[Segmentation]
        | list[Transcript]
    ) = Field(union_mode="left_to_right")


@bentoml.asgi_app(oip_app, path="/")
@bentoml.service(
    name="tuneserve",
    workers=settings.worker_count(ON_GPU),
    # BentoML's own timeout stays above ours, so that a request past ours gets our 503 with
    # Retry-After rather than BentoML's bare 504.
    traffic={"timeout": settings.request_timeout_s + 30, "max_concurrency": 4096},
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
        self.monitor = drift_monitor(self.rt, reference.get("drift", {}), settings)
        # Warms the session up: /readyz answers once __init__ returns.
        # Generative tasks decode in one continuous batch (generation.py), the others in
        # adaptive batches (batching.py).
        engine = Generator if self.rt.contract.generative else Batcher
        self.batch = engine(
            self.rt,
            settings.max_batch_size,
            settings.request_timeout_s,
            self.monitor,
            settings.max_queue_items,
            settings.max_queue_mb << 20,
        )
        # What one decoded input of this task holds (its long warm-up input), so that a
        # request's memory is admitted before any of it is decoded; 0: nothing to decode.
        self.item_bytes = self.rt.contract.warm_items()[1].nbytes if self.rt.heavy_inputs else 0
        # Image decoding and resizing (tens of ms for a large photo) runs here, off the event
        # loop, so that probes and /metrics answer while it works; PIL releases the GIL.
        self.decoders = ThreadPoolExecutor(
            settings.decode_thread_count(ON_GPU),
            thread_name_prefix="decode",
            initializer=name_os_thread,
        )
        self.trimmer = Trimmer(self.decoders)
        metrics.model_info(self.rt)
        metrics.reference(self.rt, reference.get("class_prior", {}))
        # Everything loaded so far lives as long as the worker: keep it out of the collector's
        # full passes, which otherwise scanned its ~130,000 objects about once a second under
        # load, 75-100 ms each (the tables service's p99; bench/RESULTS.md).
        gc.freeze()

    async def outputs(self, raw: list, params: dict | None = None):
        """Validate every input, then one call into the batching path (InputError on misuse);
        the task's per-input outputs. `params`: the checked request fields (generative tasks
        decode by them)."""
        if not isinstance(raw, list) or not raw:
            raise InputError("no_inputs", "'inputs' must be a non-empty list")
        held = sum(len(v) for v in raw if isinstance(v, str | bytes))
        with self.trimmer.request(held):
            return await self._outputs(raw, params)

    async def _outputs(self, raw: list, params: dict | None):
        if not isinstance(raw, list) or not raw:
            raise InputError("no_inputs", "'inputs' must be a non-empty list")
        if len(raw) > settings.max_items:
            raise InputError(
                "too_many_inputs",
                f"{len(raw)} inputs; the limit per request is {settings.max_items}",
                status=413,
            )
        floor = getattr(self.rt.contract, "cost_floor", None)
        try:
            if self.item_bytes:
                self.batch.admit_bytes(len(raw) * self.item_bytes)
            if floor is not None:  # span tasks: refused before tokenizing when surely too much
                self.batch.admit_alone(len(raw), sum(floor(v) for v in raw))
        except InputError as e:
            metrics.shed(self.rt, e.shed_reason)
            raise
        t0 = time.perf_counter()
        if self.rt.contract.decode_in_threads:
            loop = asyncio.get_running_loop()
            jobs = [loop.run_in_executor(self.decoders, self.rt.prepare, v) for v in raw]
            results = await asyncio.gather(*jobs, return_exceptions=True)
        else:
            results = []
            for value in raw:
                try:
                    results.append(self.rt.prepare(value))
                except InputError as e:
                    results.append(e)
        for i, result in enumerate(results):
            if isinstance(result, InputError):
                raise InputError(result.reason, f"inputs[{i}]: {result.detail}", result.status)
            if isinstance(result, BaseException):
                raise result
        metrics.preprocess(self.rt, time.perf_counter() - t0)
        if self.rt.contract.generative:
            return await self.batch(results, params)
        return await self.batch(results)

    async def answer(self, raw: list, params: dict) -> list[dict]:
        """The API's answers: request fields checked, inputs run, the task's post-processing."""
        params = self.rt.contract.check_params(params)
        return await self.postprocessed(await self.outputs(raw, params), params)

    async def postprocessed(self, outputs, params: dict) -> list[dict]:
        """`postprocess`, on the decode threads where the task draws or resizes images."""
        if not self.rt.contract.heavy_outputs:
            return self.postprocess(outputs, params)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decoders, self.postprocess, outputs, params)

    def postprocess(self, outputs, params: dict) -> list[dict]:
        """The task's answer for each output, timed and counted (every prediction route)."""
        t0 = time.perf_counter()
        out = [self.rt.contract.postprocess(outputs[i], params) for i in range(len(outputs))]
        metrics.predictions(self.rt, out, time.perf_counter() - t0)
        return out

    def response(self, predictions: list[dict]) -> PredictResponse:
        return PredictResponse.model_validate(
            {"model": self.rt.name, "version": self.rt.version, "predictions": predictions}
        )

    # Errors leave as a JSONResponse (`reject`), which BentoML passes through unchanged.
    @bentoml.api(route="/predict")
    async def predict(
        self,
        inputs: list,
        # Strict: JSON's own types only. pydantic's lax mode read "yes" as true and "3" as 3,
        # where the short path (and OIP) refuse them.
        top_k: StrictInt | None = None,
        min_score: StrictFloat | None = None,
        render: StrictBool | None = None,
        max_new_tokens: StrictInt | None = None,
        num_beams: StrictInt | None = None,
        language: StrictStr | None = None,
        task: StrictStr | None = None,
        ctx: bentoml.Context = None,
    ) -> PredictResponse:
        """Predict for texts, base64-encoded images or audio, table rows or {"question",
        "context"} objects:
        {"inputs": [...]}, with "top_k": k for classification, "min_score" for detection,
        "render": true for an annotated PNG (detection, segmentation), and "max_new_tokens",
        "num_beams", "language", "task" (transcribe, translate) for speech recognition."""
        try:
            params = {"top_k": top_k, "min_score": min_score, "render": render}
            params |= _generation(max_new_tokens, num_beams, language, task)
            return self.response(await self.answer(inputs, params))
        except InputError as e:
            return reject(self.rt, e, ctx)

    @bentoml.api(route="/predict_file")
    async def predict_file(
        self,
        files: list[Path],
        top_k: int | None = None,
        min_score: float | None = None,
        render: bool | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        language: str | None = None,
        task: str | None = None,
        ctx: bentoml.Context = None,
    ) -> PredictResponse:
        """Predict for uploaded image or audio files (multipart/form-data, field `files`)."""
        try:
            if not self.rt.heavy_inputs:
                raise InputError(
                    "wrong_route",
                    f"/predict_file takes image or audio files; this {self.rt.task} model "
                    "takes JSON: use /predict",
                )
            raw = [Path(f).read_bytes() for f in files]
            params = {"top_k": top_k, "min_score": min_score, "render": render}
            params |= _generation(max_new_tokens, num_beams, language, task)
            return self.response(await self.answer(raw, params))
        except InputError as e:
            return reject(self.rt, e, ctx)


def _generation(max_new_tokens, num_beams, language, task) -> dict:
    """The generative tasks' request fields that were sent (the others reject them)."""
    given = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "language": language}
    given["task"] = task
    return {k: v for k, v in given.items() if v is not None}


def served_service() -> Tuneserve | None:
    """This worker's service instance, once instantiated (its runtime loaded)."""
    from bentoml.exceptions import BentoMLException

    try:
        svc = bentoml.get_current_service()
    except BentoMLException:
        return None
    return svc if hasattr(svc, "rt") else None


def served_runtime() -> Runtime | None:
    """This worker's runtime, once the service is instantiated."""
    svc = served_service()
    return None if svc is None else svc.rt


def count_rejection(reason: str) -> None:
    """tuneserve_request_errors_total for a request the middleware refused."""
    rt = served_runtime()
    if rt is not None:
        metrics.error(rt, reason)


# The first added is the outermost: the guard sees every request first.
Tuneserve.add_asgi_middleware(
    RequestGuard,
    max_body_bytes=settings.max_body_bytes,
    api_keys=settings.api_keys,
    on_reject=count_rejection,
    max_inflight_bytes=settings.max_queue_mb << 20,
)
if settings.fast_predict:
    Tuneserve.add_asgi_middleware(FastPredict, service=served_service)
Tuneserve.add_asgi_middleware(ApiDocs, runtime=served_runtime)


def drift_monitor(rt: Runtime, drift: dict, settings: Settings) -> Monitor | None:
    """The drift window of this worker (`drift`: reference.json's calibration), evaluated by a
    background thread every `drift_interval_s` seconds, off the request path; None when off or
    when the artifact has no calibration."""
    import threading

    interval_s = settings.drift_interval_s
    if interval_s <= 0 or "thresholds" not in drift:
        if interval_s > 0:
            why = drift.get("disabled", "no drift calibration; re-export the artifact")
            log.warning("drift monitoring off for %s: %s", rt.folder, why)
        return None
    monitor = Monitor(drift, settings.drift_max_age_s)
    metrics.drift_capacity(rt, monitor.window)

    def evaluate() -> None:
        name_os_thread()
        while True:
            time.sleep(interval_s)
            try:
                metrics.drift(rt, monitor.samples(), monitor.scores(), time.time())
            except Exception:  # a monitoring bug must not stop the monitoring thread
                log.exception("drift evaluation failed")

    threading.Thread(target=evaluate, name="drift", daemon=True).start()
    return monitor


def reject(rt: Runtime, e: InputError, ctx: bentoml.Context) -> JSONResponse:
    """The error response of a BentoML route; BentoML sets the status from the context."""
    metrics.error(rt, e.reason)
    ctx.response.status_code = e.status
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
