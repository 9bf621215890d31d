"""Reference distributions for drift monitoring, measured with the exported model on the
checkpoint's holdout (DESIGN.md §2 and §4): class prior, confidence histogram, a PCA basis of
the pooled embedding with per-component histograms and the reconstruction error, and simple
input statistics. The service compares live traffic with these."""

from __future__ import annotations

import numpy as np

from export.preprocess import Feeder
from service.drift import calibrate, pca_basis, project
from service.runtime import brightness, softmax

PCA_COMPONENTS = 8  # low-dimensional view of the embedding, cheap to project per request
HIST_BINS = 10  # quantile bins: equal mass on the reference, so every bin is informative


def _quantile_hist(values: np.ndarray, bins: int = HIST_BINS) -> dict:
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant statistic: one bin around it
        edges = np.array([values.min() - 0.5, values.max() + 0.5])
    inner = edges[1:-1]
    counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(edges) - 1)
    return {
        "edges": edges.tolist(),
        "probs": (counts / counts.sum()).tolist(),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


def input_statistics(feeder: Feeder) -> dict:
    if feeder.task == "image-classification":
        gray = feeder.inputs.astype(np.float32).mean(axis=3) / 255.0  # N, H, W
        return {
            "brightness": _quantile_hist(gray.mean(axis=(1, 2))),
            "contrast": _quantile_hist(gray.std(axis=(1, 2))),
        }
    tok, max_len = feeder.tokenizer, int(feeder.pre["max_length"])
    ids = tok([str(t) for t in feeder.inputs], truncation=False)["input_ids"]
    lengths = np.array([len(x) for x in ids], dtype=np.float64)
    unk = tok.unk_token_id
    special = 2  # [CLS] and [SEP] do not count as words
    unk_ratio = np.array([sum(t == unk for t in x) / max(1, len(x) - special) for x in ids])
    return {
        "length_tokens": _quantile_hist(lengths),
        "truncated_fraction": float((lengths > max_len).mean()),
        "unknown_token_ratio": {
            "mean": float(unk_ratio.mean()),
            "p95": float(np.quantile(unk_ratio, 0.95)),
        },
    }


def drift_inputs(feeder: Feeder) -> np.ndarray:
    """Per-sample input statistic as the service measures it (service/runtime.py feeds): crop
    brightness, or tokens after truncation."""
    if feeder.task == "image-classification":
        return brightness(feeder.inputs)
    enc = feeder.tokenizer(
        [str(t) for t in feeder.inputs], truncation=True, max_length=int(feeder.pre["max_length"])
    )
    return np.array([sum(m) for m in enc["attention_mask"]], dtype=np.float64)


def build_reference(
    logits: np.ndarray,
    embeddings: np.ndarray,
    feeder: Feeder,
    labels: list[str],
    train_per_class: dict[str, int],
) -> dict:
    probs = softmax(logits)
    confidence = probs.max(1)
    pred = probs.argmax(1)
    total = sum(train_per_class.values())
    basis = pca_basis(embeddings.astype(np.float64), PCA_COMPONENTS)
    coords, recon = project(embeddings, basis)
    edges = np.linspace(0.0, 1.0, 21)
    conf_counts = np.histogram(confidence, bins=edges)[0]
    return {
        "n_samples": int(len(logits)),
        "labels": labels,
        "class_prior": {c: train_per_class.get(c, 0) / total for c in labels},
        "predicted_class_shares": {c: float((pred == i).mean()) for i, c in enumerate(labels)},
        "confidence": {
            "edges": edges.tolist(),
            "probs": (conf_counts / conf_counts.sum()).tolist(),
            "mean": float(confidence.mean()),
        },
        "embedding": {
            "pca": basis,
            "components": [_quantile_hist(coords[:, j]) for j in range(coords.shape[1])],
            "reconstruction_error": _quantile_hist(recon),
        },
        "inputs": input_statistics(feeder),
        # Drift thresholds calibrated on this holdout (service/drift.py, DESIGN §4).
        "drift": calibrate(
            logits,
            embeddings,
            drift_inputs(feeder),
            [train_per_class.get(c, 0) / total for c in labels],
        ),
    }
