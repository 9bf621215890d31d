"""scikit-learn trees → ONNX with skl2onnx (the maintained converter), checked against the
trained model's own probabilities on the holdout.

The graph takes `features` FP32 [batch, features] (the task contract's encoding) and returns
`probabilities` [batch, classes]; skl2onnx's `label` output is dropped (the service applies
the card's decision threshold itself).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from export import card as card_mod
from export.errors import ParityError
from export.parity import BATCH_SIZES, ParityReport
from tasks.tabular import FEATURES

MIN_AGREEMENT = 0.99  # predicted classes: float32 thresholds may flip a row on a tie


def convert_and_check(model, feeder, work: Path, opset: int, tolerance: float, stage):
    """(model file, export details, its session, parity report)."""
    import onnx
    import onnxruntime as ort
    import skl2onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    stage()
    t0 = time.perf_counter()
    n_features = len(feeder.contract.features)
    with _int_missing_flags():
        onx = convert_sklearn(
            model,
            initial_types=[(FEATURES, FloatTensorType([None, n_features]))],
            options={id(model): {"zipmap": False}},
            target_opset={"": min(opset, 18), "ai.onnx.ml": 3},
        )
    kept = [o for o in onx.graph.output if o.name == "probabilities"]
    del onx.graph.output[:]
    onx.graph.output.extend(kept)
    for value in (onx.graph.input[0], kept[0]):  # the batch axis by name, as torch exports
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    stage()
    path = work / card_mod.MODEL
    onnx.save(onx, str(path))
    details = {
        "exporter": f"skl2onnx {skl2onnx.__version__}",
        "opset": min(opset, 18),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    stage()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, details, session, check_parity(model, session, feeder, tolerance)


@contextmanager
def _int_missing_flags():
    """skl2onnx 1.20 writes a Python bool for a leaf's `nodes_missing_value_tracks_true`
    (common/tree_ensemble.py: `missing = False`), which onnx 1.23 refuses ("Expected an
    int, got a boolean") for every HistGradientBoosting model: the flag goes in as an int."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args, nodes_missing_value_tracks_true=0, **kwargs):
        flag = int(nodes_missing_value_tracks_true)
        return original(*args, nodes_missing_value_tracks_true=flag, **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def check_parity(model, session, feeder, tolerance: float) -> ParityReport:
    """ONNX Runtime's probabilities against scikit-learn's predict_proba, at several batch
    sizes; class agreement at least MIN_AGREEMENT."""
    report = ParityReport(tolerance * 10, MIN_AGREEMENT, list(BATCH_SIZES), ["-"])
    agree = total = 0
    for bs in BATCH_SIZES:
        x = feeder.feeds(feeder.take(bs))[FEATURES]
        expected = model.predict_proba(x.astype(np.float64))
        got = session.run(None, {FEATURES: x})[0]
        report.checks += 1
        diff = float(np.abs(expected - got).max())
        report.max_abs_diff = max(report.max_abs_diff, diff)
        agree += int((expected.argmax(1) == got.argmax(1)).sum())
        total += len(x)
        if diff > tolerance * 10:
            report.failures.append(f"batch {bs}: probabilities differ by {diff:.3g}")
    report.top1_agreement = agree / total
    if report.top1_agreement < MIN_AGREEMENT:
        report.failures.append(f"class agreement {report.top1_agreement:.4f} < {MIN_AGREEMENT}")
    if report.failures:
        raise ParityError(report.failures, report.max_abs_diff, report.top1_agreement)
    return report
