"""tuneserve's Prometheus metrics (DESIGN.md §4), beside BentoML's own `bentoml_service_*`.

`bentoml.metrics` is prometheus_client set up for BentoML's multiprocess workers: counters
and histograms add up across workers; the info gauge keeps the live workers' values.
"""

from __future__ import annotations

import bentoml

LABELS = ["model", "version"]
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

_model_info = bentoml.metrics.Gauge(
    name="tuneserve_model_info",
    documentation="The served artifact, provider and precision",
    labelnames=LABELS + ["task", "precision", "provider"],
    multiprocess_mode="liveall",
)
_call_items = bentoml.metrics.Gauge(
    name="tuneserve_model_call_items",
    documentation="Items per ONNX Runtime call: the batch size measured fastest at start "
    "(image and audio models on CPUs), else the maximum batch size",
    labelnames=LABELS,
    multiprocess_mode="liveall",
)
_predictions = bentoml.metrics.Counter(
    name="tuneserve_predictions",
    documentation="Predictions by top-1 label",
    labelnames=LABELS + ["label"],
)
_confidence = bentoml.metrics.Histogram(
    name="tuneserve_prediction_confidence",
    documentation="Top-1 probability",
    labelnames=LABELS,
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
)
_duration = bentoml.metrics.Histogram(
    name="tuneserve_inference_duration_seconds",
    documentation="Time per stage: preprocess and postprocess per request, infer per batch",
    labelnames=LABELS + ["stage"],
    buckets=LATENCY_BUCKETS,
)
_batch = bentoml.metrics.Histogram(
    name="tuneserve_batch_size",
    documentation="Inputs per model call (adaptive batching)",
    labelnames=LABELS,
    buckets=BATCH_BUCKETS,
)
_reference_ratio = bentoml.metrics.Gauge(
    name="tuneserve_reference_class_ratio",
    documentation="Training class prior (reference.json), for live class shares in PromQL",
    labelnames=LABELS + ["label"],
    multiprocess_mode="max",  # the same value in every worker: one series per label
)
_brightness = bentoml.metrics.Histogram(
    name="tuneserve_input_brightness_ratio",
    documentation="Mean pixel value of an image crop, 0 (black) to 1 (white)",
    labelnames=LABELS,
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
)
_pixels = bentoml.metrics.Histogram(
    name="tuneserve_input_image_pixels",
    documentation="Width x height of an image as sent",
    labelnames=LABELS,
    buckets=(1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2e6, 4e6, 1e7),
)
_tokens = bentoml.metrics.Histogram(
    name="tuneserve_input_tokens",
    documentation="Tokens of a text after truncation",
    labelnames=LABELS,
    buckets=(4, 8, 16, 32, 64, 128, 256, 512),
)
_audio_seconds = bentoml.metrics.Histogram(
    name="tuneserve_input_audio_seconds",
    documentation="Duration of an audio clip as sent",
    labelnames=LABELS,
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60),
)
_loudness = bentoml.metrics.Histogram(
    name="tuneserve_input_audio_loudness_dbfs",
    documentation="RMS level of an audio clip, dB below full scale",
    labelnames=LABELS,
    buckets=(-60, -50, -40, -30, -20, -10, 0),
)
_truncated = bentoml.metrics.Counter(
    name="tuneserve_input_truncated",
    documentation="Texts cut at the model's maximum length, audio clips at its window",
    labelnames=LABELS,
)
_unknown = bentoml.metrics.Histogram(
    name="tuneserve_input_unknown_token_ratio",
    documentation="Share of a text's tokens that are the unknown token",
    labelnames=LABELS,
    buckets=(0.0, 0.01, 0.05, 0.1, 0.2, 0.5),
)
_drift_score = bentoml.metrics.Gauge(
    name="tuneserve_drift_score",
    documentation="Drift statistic / calibrated threshold per check (>= 1: the check fires)",
    labelnames=LABELS + ["check"],
    multiprocess_mode="liveall",
)
_drift_detected = bentoml.metrics.Gauge(
    name="tuneserve_drift_detected",
    documentation="1 when the check's score is at least 1 in the latest evaluation",
    labelnames=LABELS + ["check"],
    multiprocess_mode="liveall",
)
_drift_samples = bentoml.metrics.Gauge(
    name="tuneserve_drift_window_samples",
    documentation="Samples in the drift window of this worker",
    labelnames=LABELS,
    multiprocess_mode="liveall",
)
_drift_time = bentoml.metrics.Gauge(
    name="tuneserve_drift_last_evaluation_timestamp_seconds",
    documentation="Unix time of the latest drift evaluation",
    labelnames=LABELS,
    multiprocess_mode="liveall",
)
_drift_capacity = bentoml.metrics.Gauge(
    name="tuneserve_drift_window_capacity",
    documentation="Samples a drift evaluation needs (the calibrated window size)",
    labelnames=LABELS,
    multiprocess_mode="liveall",
)
_shed = bentoml.metrics.Counter(
    name="tuneserve_requests_shed",
    documentation="Requests answered 503 by admission control (queue_full, deadline, timeout)",
    labelnames=LABELS + ["reason"],
)
_queue = bentoml.metrics.Gauge(
    name="tuneserve_queue_items",
    documentation="Items admitted to this worker's model queue and not yet answered",
    labelnames=LABELS,
    multiprocess_mode="liveall",
)
_errors = bentoml.metrics.Counter(
    name="tuneserve_request_errors",
    documentation="Rejected requests by reason",
    labelnames=LABELS + ["reason"],
)

# Generative tasks (service/generation.py).
_transcribed = bentoml.metrics.Counter(
    name="tuneserve_audio_transcribed_seconds",
    documentation="Seconds of audio transcribed",
    labelnames=LABELS,
)
_rtf = bentoml.metrics.Histogram(
    name="tuneserve_real_time_factor",
    documentation="A request's time in the model (queue, encoder and decoding) per second "
    "of its audio; below 1 is faster than real time",
    labelnames=LABELS,
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
_step_sequences = bentoml.metrics.Histogram(
    name="tuneserve_decode_step_sequences",
    documentation="Sequences decoded per decoder call (tokens per step: continuous batching)",
    labelnames=LABELS,
    buckets=BATCH_BUCKETS,
)
_generated = bentoml.metrics.Counter(
    name="tuneserve_generated_tokens",
    documentation="Tokens generated",
    labelnames=LABELS,
)


def decode_step(rt, sequences: int, seconds: float) -> None:
    _step_sequences.labels(model=rt.name, version=rt.version).observe(sequences)
    _duration.labels(model=rt.name, version=rt.version, stage="decode_step").observe(seconds)


def generated(rt, audio_s: float, model_s: float, tokens: int) -> None:
    """One request answered: its audio, its time in the model and the tokens it generated."""
    _transcribed.labels(model=rt.name, version=rt.version).inc(audio_s)
    _rtf.labels(model=rt.name, version=rt.version).observe(model_s / max(audio_s, 1e-3))
    _generated.labels(model=rt.name, version=rt.version).inc(tokens)


def model_info(rt) -> None:
    _model_info.labels(
        model=rt.name,
        version=rt.version,
        task=rt.task,
        precision=rt.precision,
        provider=rt.provider,
    ).set(1)
    _call_items.labels(model=rt.name, version=rt.version).set(rt.chunk)


def reference(rt, prior: dict[str, float]) -> None:
    """The class prior of the artifact's reference.json."""
    for label, ratio in prior.items():
        _reference_ratio.labels(model=rt.name, version=rt.version, label=label).set(ratio)


def inputs(rt, stats: dict) -> None:
    """The input statistics of one batch (Runtime.feeds)."""
    series = {
        "brightness": _brightness,
        "pixels": _pixels,
        "tokens": _tokens,
        "unknown_ratio": _unknown,
        "duration": _audio_seconds,
        "loudness": _loudness,
    }
    for key, histogram in series.items():
        child = histogram.labels(model=rt.name, version=rt.version)
        for value in stats.get(key, ()):
            child.observe(value)
    if stats.get("truncated"):
        _truncated.labels(model=rt.name, version=rt.version).inc(stats["truncated"])


def batch(rt, size: int, infer_s: float) -> None:
    _batch.labels(model=rt.name, version=rt.version).observe(size)
    _duration.labels(model=rt.name, version=rt.version, stage="infer").observe(infer_s)


def preprocess(rt, seconds: float) -> None:
    _duration.labels(model=rt.name, version=rt.version, stage="preprocess").observe(seconds)


def predictions(rt, out: list[dict], postprocess_s: float) -> None:
    _duration.labels(model=rt.name, version=rt.version, stage="postprocess").observe(postprocess_s)
    for p in out:
        for label, score in rt.contract.scored(p):
            _predictions.labels(model=rt.name, version=rt.version, label=label).inc()
            _confidence.labels(model=rt.name, version=rt.version).observe(score)


def error(rt, reason: str) -> None:
    _errors.labels(model=rt.name, version=rt.version, reason=reason).inc()


def shed(rt, reason: str) -> None:
    _shed.labels(model=rt.name, version=rt.version, reason=reason).inc()


def queue(rt, items: int) -> None:
    _queue.labels(model=rt.name, version=rt.version).set(items)


def drift_capacity(rt, window: int) -> None:
    _drift_capacity.labels(model=rt.name, version=rt.version).set(window)


def drift(rt, samples: int, scores: dict[str, float] | None, when: float) -> None:
    """The window size always; scores and time only from a fresh evaluation of a full window
    (the alert rules ignore workers whose window is below capacity)."""
    _drift_samples.labels(model=rt.name, version=rt.version).set(samples)
    if scores is None:
        return
    for check, score in scores.items():
        _drift_score.labels(model=rt.name, version=rt.version, check=check).set(score)
        _drift_detected.labels(model=rt.name, version=rt.version, check=check).set(score >= 1)
    _drift_time.labels(model=rt.name, version=rt.version).set(when)
