"""Precision variants: int8 for CPUs and fp16 for GPUs, each scored on the holdout.

int8: dynamic quantization (weights int8, activations quantized at run time) for transformer
encoders, whose cost is in MatMul; static QDQ quantization calibrated on holdout images for
CNNs, whose activations need fixed scales. fp16: float16 weights and compute with float32
inputs and outputs, validated on a CUDA provider only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    """onnxruntime.quantization.CalibrationDataReader over holdout images."""

    def __init__(self, feeder: Feeder, batch_size: int = 16):
        n = min(CALIBRATION_SAMPLES, len(feeder))
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


def int8(fp32: Path, out: Path, feeder: Feeder, tmp: Path) -> str:
    """Write the int8 variant; returns the method used."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
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
        if feeder.contract.heavy_inputs:  # CNNs on images; text models are transformers
            n = min(CALIBRATION_SAMPLES, len(feeder))
            quantize_static(
                str(prepared),
                str(out),
                _Calibration(feeder),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            return f"static QDQ, per-channel weights, {n} calibration images"
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
        return "dynamic (int8 weights, activations quantized at run time)"
    finally:
        stripped.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)


def require_cuda() -> None:
    if not cuda_providers():
        raise VariantError(
            "--fp16 needs a usable CUDA GPU to validate the variant; none here "
            "(fp16 is slower than fp32 on CPUs): use --int8 for CPU serving"
        )


def fp16(fp32: Path, out: Path) -> str:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    require_cuda()
    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(model, str(out))
    return "float16 weights and compute, float32 inputs and outputs"


def predict(session, feeder: Feeder):
    """(per-item outputs, embeddings, input statistics) for the whole holdout."""
    return feeder.run(session)


def score(session, feeder: Feeder, reference_outputs) -> dict:
    """The task's metrics of a session on the holdout (`holdout_<metric>`) and the share of
    answers equal to the fp32 model's."""
    outputs = predict(session, feeder)[0]
    metrics = feeder.contract.score(outputs, feeder.targets)
    return {
        **{f"holdout_{k}": v for k, v in metrics.items()},
        "agreement_with_fp32": feeder.contract.agreement(outputs, reference_outputs),
    }
