"""ONNX Runtime vs PyTorch on the checkpoint's holdout: shapes first, then the largest absolute
difference against a tolerance, then top-1 agreement, at several batch sizes and (text)
sequence lengths. Every failure is collected and reported at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from export.errors import ParityError
from export.preprocess import Feeder

BATCH_SIZES = (1, 7, 32)  # one, an odd size, and a typical serving batch
EMBEDDING_ATOL = 1e-3  # pooled features are larger in magnitude than logits


@dataclass
class ParityReport:
    tolerance: float
    min_top1_agreement: float
    batch_sizes: list[int]
    sequence_lengths: list[int | str]
    max_abs_diff: float = 0.0  # logits
    max_abs_diff_embedding: float = 0.0
    top1_agreement: float = 1.0
    checks: int = 0
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": not self.failures}


def _torch_run(graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from export.convert import positional

    with torch.no_grad():
        out = graph(*positional(feeds))
    return [o.numpy() for o in out]


def check_parity(
    graph,
    session,
    feeder: Feeder,
    *,
    tolerance: float = 1e-4,
    min_top1_agreement: float = 0.99,
    batch_sizes=BATCH_SIZES,
) -> ParityReport:
    """Raise ParityError listing every failed check; return the report when all pass."""
    lengths = feeder.contract.parity_lengths()
    names = list(feeder.contract.onnx_outputs)
    report = ParityReport(
        tolerance,
        min_top1_agreement,
        list(batch_sizes),
        ["longest" if n is None else n for n in lengths],
    )
    agree, total = 0, 0
    for bs in batch_sizes:
        for length in lengths:
            feeds = feeder.feeds(feeder.take(bs), length)
            where = f"batch {bs}" + (f", length {length}" if length else "")
            expected = _torch_run(graph, feeds)
            got = session.run(None, feeds)
            report.checks += 1
            shapes = [(e.shape, g.shape) for e, g in zip(expected, got, strict=True)]
            if any(e != g for e, g in shapes):
                report.failures.append(f"{where}: output shapes differ {shapes}")
                continue
            compare = getattr(feeder.contract, "compare", None)
            if compare is not None:  # detection, segmentation: the task's own reading
                failures, diff = compare(expected, got, tolerance)
                report.failures += [f"{where}: {f}" for f in failures]
                report.max_abs_diff = max(report.max_abs_diff, diff)
                e, g = expected[-1], got[-1]  # pooled_embedding
                emb = float(np.abs(e - g).max()) if e.size else 0.0
                report.max_abs_diff_embedding = max(report.max_abs_diff_embedding, emb)
                if emb > EMBEDDING_ATOL:
                    report.failures.append(f"{where}: embedding max abs diff {emb:.3g}")
                agree += len(e) - sum(1 for f in failures if f.startswith("image "))
                total += len(e)
                continue
            for name, e, g in zip(names, expected, got, strict=True):
                diff = float(np.abs(e - g).max()) if e.size else 0.0
                if name == "pooled_embedding":
                    report.max_abs_diff_embedding = max(report.max_abs_diff_embedding, diff)
                    if diff > EMBEDDING_ATOL:
                        report.failures.append(
                            f"{where}: embedding max abs diff {diff:.3g} > {EMBEDDING_ATOL:g}"
                        )
                    continue
                report.max_abs_diff = max(report.max_abs_diff, diff)
                if diff > tolerance:
                    report.failures.append(
                        f"{where}: {name} max abs diff {diff:.3g} > {tolerance:g}"
                    )
            # Top-1 along the last axis: the class, each token's tag, the span's token.
            agree += int((expected[0].argmax(-1) == got[0].argmax(-1)).sum())
            total += expected[0].argmax(-1).size
    report.top1_agreement = agree / total if total else 0.0
    if report.top1_agreement < min_top1_agreement:
        report.failures.append(
            f"top-1 agreement {report.top1_agreement:.4f} < {min_top1_agreement}"
        )
    if report.failures:
        raise ParityError(report.failures, report.max_abs_diff, report.top1_agreement)
    return report
