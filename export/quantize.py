"""Precision variants: int8 for CPUs and fp16 for GPUs, each scored on the holdout.

int8: the methods of a task are tried in order, the fastest first, until one passes the paired
gate (export/gate.py): for transformer encoders, whose cost is in their weight MatMuls, dynamic
quantization (weights int8, activations quantized at run time), then narrower forms of it; for
CNNs on images, static QDQ calibrated on holdout images (activations need fixed scales).
fp16: float16 weights and compute with float32 inputs and outputs, validated on CUDA only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import gate
from export.errors import VariantError
from export.preprocess import Feeder

CALIBRATION_SAMPLES = 128  # holdout images used to fix activation ranges


def cuda_providers() -> list[str]:
    """GPU providers that can really run here (a CUDA build on a machine without a GPU lists
    them but cannot create a session)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return []
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    return ["CUDAExecutionProvider"]


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over the first holdout items."""

    def __init__(self, feeder: Feeder, n: int, batch_size: int = 16):
        self.batches = [
            feeder.feeds(np.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size)
        ]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


def calibration_size(feeder: Feeder) -> int:
    """Holdout items a calibrated method fixes its ranges on; the gate judges the rest, so at
    least half the holdout stays unseen."""
    return min(CALIBRATION_SAMPLES, len(feeder) // 2)


@dataclass(frozen=True)
class Method:
    """One way to write an int8 variant: `write(prepared fp32, out, feeder)`; `calibrated`:
    it looks at the first calibration_size() holdout items, which its gate then leaves out."""

    name: str  # as the card lists it
    write: Callable[[Path, Path, Feeder], None]
    calibrated: bool = False


def weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a weight (the projections of a transformer); the
    attention products (activations x activations) are left out."""
    weights = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def outlier_matmuls(model, feeder: Feeder, share: float) -> list[str]:
    """The `share` of weight MatMuls whose input activations have the largest outliers (peak
    over root mean square, on calibration items): run-time int8 scales each activation tensor by
    its peak, so those lose the most precision (Dettmers et al. 2022, LLM.int8()). `model`
    (the prepared fp32 graph) gains the MatMuls' inputs as outputs."""
    import onnx
    import onnxruntime as ort

    nodes = weight_matmuls(model)
    known = {o.name for o in model.graph.output}
    for name in dict.fromkeys(n.input[0] for n in nodes):
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    peak: dict[str, float] = {}
    square: dict[str, list[float]] = {}
    for feeds in _Calibration(feeder, calibration_size(feeder)).batches:
        for name, value in zip(names, session.run(None, feeds), strict=True):
            value = np.asarray(value, dtype=np.float64)
            peak[name] = max(peak.get(name, 0.0), float(np.abs(value).max(initial=0.0)))
            square.setdefault(name, []).append(float(np.mean(value**2)) if value.size else 0.0)
    ratio = {
        n.name: peak[n.input[0]] / max(np.sqrt(np.mean(square[n.input[0]])), 1e-12) for n in nodes
    }
    keep = max(1, round(share * len(nodes)))
    return sorted(ratio, key=ratio.get, reverse=True)[:keep]


def _dynamic(per_channel: bool, only_weights: bool, outlier_share: float = 0.0):
    def write(prepared: Path, out: Path, feeder: Feeder) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        options = {}
        if only_weights:
            model = onnx.load(str(prepared))
            nodes = [n.name for n in weight_matmuls(model)]
            if not nodes:  # ONNX Runtime reads an empty list as "every node"
                raise ValueError("the graph has no MatMul with a weight to quantize")
            skip = set(outlier_matmuls(model, feeder, outlier_share)) if outlier_share else set()
            options = {"nodes_to_quantize": [n for n in nodes if n not in skip]}
        quantize_dynamic(
            str(prepared),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            **options,
        )

    return write


def _static_qdq(prepared: Path, out: Path, feeder: Feeder) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared),
        str(out),
        _Calibration(feeder, calibration_size(feeder)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


# Tried in order until one passes the gate (export/gate.py); the card lists every rejection.
# Transformer encoders spend their time in weight MatMuls, quantized at run time; images' CNNs
# need fixed activation scales (static QDQ). Quantizing every MatMul and Gather (the
# attention products and the embeddings too, ONNX Runtime's default) is no faster at batch 32
# and flips 4x as many answers (bench/RESULTS.md): bench/int8.py shows it for reference only.
OUTLIER_SHARE = 0.15  # weight MatMuls kept fp32 by the second text method: 5 of MiniLM's 36
TEXT_METHODS = (
    Method(
        "dynamic, weight MatMuls only, per-channel", _dynamic(per_channel=True, only_weights=True)
    ),
    Method(
        f"dynamic, weight MatMuls only, per-channel, the {OUTLIER_SHARE:.0%} with the largest "
        "activation outliers kept fp32",
        _dynamic(per_channel=True, only_weights=True, outlier_share=OUTLIER_SHARE),
        calibrated=True,
    ),
)
EVERY_MATMUL = Method(
    "dynamic, every MatMul and Gather", _dynamic(per_channel=False, only_weights=False)
)
IMAGE_METHODS = (Method("static QDQ, per-channel weights", _static_qdq, calibrated=True),)


def methods(feeder: Feeder) -> tuple[Method, ...]:
    return IMAGE_METHODS if feeder.contract.heavy_inputs else TEXT_METHODS


def prepare(fp32: Path, tmp: Path) -> Path:
    """The fp32 graph as the quantizer takes it (value_info dropped, shapes inferred)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # The saved optimized graph carries value_info from tracing that ONNX shape inference
    # rejects inside the quantizer; the annotations are optional, so drop them first.
    stripped, prepared = tmp / "int8-input.onnx", tmp / "int8-prepared.onnx"
    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    onnx.save(model, str(stripped))
    try:
        # Shape inference and graph clean-up; the symbolic pass cannot resolve the dynamic
        # axes of dynamo-exported graphs and is not needed for these ops.
        quant_pre_process(str(stripped), str(prepared), skip_symbolic_shape=True)
    finally:
        stripped.unlink(missing_ok=True)
    return prepared


def require_cuda() -> None:
    if not cuda_providers():
        raise VariantError(
            "--fp16 needs a usable CUDA GPU to validate the variant; none here "
            "(fp16 is slower than fp32 on CPUs): use --int8 for CPU serving"
        )


def _fp16(fp32: Path, out: Path, feeder: Feeder) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    require_cuda()
    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(model, str(out))


FP16 = Method("float16 weights and compute, float32 inputs and outputs", _fp16)


def predict(session, feeder: Feeder):
    """(per-item outputs, embeddings, input statistics) for the whole holdout."""
    return feeder.run(session)


@dataclass(frozen=True)
class Baseline:
    """The fp32 graph and its holdout answers: what every variant is judged against."""

    path: Path
    work: Path  # the partial artifact folder the variant file is written into
    feeder: Feeder
    outputs: object  # fp32's raw outputs on the holdout (quantize.predict)
    value: float  # fp32's holdout value of the task's metric
    max_drop: float  # --max-accuracy-drop: bound on the 95% upper limit of the drop


def trial(
    method: Method, source: Path, out: Path, base: Baseline, providers: list[str]
) -> tuple[dict, gate.Verdict]:
    """Write `method`'s variant of `source` to `out`, score it on the holdout and judge it
    against the fp32 outputs of `base`, leaving out the items it calibrated on."""
    import onnxruntime as ort

    feeder, reference = base.feeder, base.outputs
    method.write(source, out, feeder)
    scores, answers = score(ort.InferenceSession(str(out), providers=providers), feeder, reference)
    skip = calibration_size(feeder) if method.calibrated else 0
    verdict = gate.judge(feeder.contract, reference, answers, feeder.targets, base.max_drop, skip)
    return scores, verdict


def score(session, feeder: Feeder, reference_outputs) -> tuple[dict, list]:
    """The task's metrics of a session on the holdout (`holdout_<metric>`) and the share of
    answers equal to the fp32 model's; and its outputs (for the paired gate)."""
    outputs = predict(session, feeder)[0]
    metrics = feeder.contract.score(outputs, feeder.targets)
    return {
        **{f"holdout_{k}": v for k, v in metrics.items()},
        "agreement_with_fp32": feeder.contract.agreement(outputs, reference_outputs),
    }, outputs
