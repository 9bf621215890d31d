"""Reference distributions for drift monitoring, measured with the exported model on the
checkpoint's holdout (DESIGN.md §2 and §4): the task's prediction shares, a confidence
histogram, a PCA basis of the pooled embedding with per-component histograms and the
reconstruction error, and simple input statistics. The statistics and the calibration are
the task contract's (`tasks/drift.py`): the service compares live traffic with these."""

from __future__ import annotations

import numpy as np

from export.preprocess import Feeder
from tasks.common import quantile_hist as _quantile_hist
from tasks.drift import calibrate_samples, pca_basis, project  # noqa: F401 (project: tests)

PCA_COMPONENTS = 8  # low-dimensional view of the embedding, cheap to project per request


def input_statistics(feeder: Feeder) -> dict:
    if hasattr(feeder.contract, "input_summary"):  # tables, audio: the task's own
        return feeder.contract.input_summary([i.value for i in feeder.items])
    if feeder.contract.heavy_inputs:
        gray = feeder.inputs.astype(np.float32).mean(axis=3) / 255.0  # N, H, W
        return {
            "brightness": _quantile_hist(gray.mean(axis=(1, 2))),
            "contrast": _quantile_hist(gray.std(axis=(1, 2))),
        }
    tok, max_len = feeder.tokenizer, int(feeder.pre["max_length"])
    texts = [feeder.contract.input_text(i) for i in feeder.items]
    saved = tok.truncation
    tok.no_truncation()
    try:
        encs = tok.encode_batch(texts)
    finally:
        tok.enable_truncation(saved["max_length"])
    special = tok.num_special_tokens_to_add(False)  # [CLS] and [SEP] do not count as words
    ids = [e.ids for e in encs]
    lengths = np.array([sum(e.attention_mask) for e in encs], dtype=np.float64)
    unk = getattr(feeder.contract, "unk_id", None)
    unk_ratio = np.array(
        [sum(t == unk for t in x) / max(1, n - special) for x, n in zip(ids, lengths, strict=True)]
    )
    return {
        "length_tokens": _quantile_hist(lengths),
        "truncated_fraction": float((lengths > max_len).mean()),
        "unknown_token_ratio": {
            "mean": float(unk_ratio.mean()),
            "p95": float(np.quantile(unk_ratio, 0.95)),
        },
    }


def build_reference(
    outputs, embeddings: np.ndarray, stats: dict, feeder: Feeder, train_per_class: dict[str, int]
) -> dict:
    contract = feeder.contract
    samples = contract.drift_samples(outputs, embeddings, stats)
    basis = pca_basis(embeddings.astype(np.float64), PCA_COMPONENTS)
    coords, recon = project(embeddings, basis)
    edges = np.linspace(0.0, 1.0, 21)
    conf_counts = np.histogram(np.clip(samples.confidence, 0, 1), bins=edges)[0]
    prior = contract.drift_prior(train_per_class)
    reference = {
        "n_samples": int(len(embeddings)),
        "labels": contract.labels,
        "checks": list(contract.checks),
        "confidence": {
            "edges": edges.tolist(),
            "probs": (conf_counts / max(1, conf_counts.sum())).tolist(),
            "mean": float(np.mean(samples.confidence)),
        },
        "embedding": {
            "pca": basis,
            "components": [_quantile_hist(coords[:, j]) for j in range(coords.shape[1])],
            "reconstruction_error": _quantile_hist(recon),
        },
        "inputs": input_statistics(feeder),
        # Drift thresholds calibrated on this holdout (tasks/drift.py, DESIGN §4).
        "drift": calibrate_samples(
            samples, prior, contract.checks, categories=contract.drift_categories()
        ),
    }
    if prior is not None:  # classification: the training prior and the predicted shares
        pred = np.asarray(samples.pred)
        reference["class_prior"] = dict(zip(contract.labels, prior, strict=True))
        reference["predicted_class_shares"] = {
            c: float((pred == i).mean()) for i, c in enumerate(contract.labels)
        }
    return reference
