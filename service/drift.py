"""Drift detection (DESIGN.md §4): cheap per-batch summaries in the request path, statistics
over a window of the latest samples, and thresholds calibrated at export for a target
false-alarm rate (`calibrate`, called by export/reference.py on the holdout).

numpy only (no bentoml, no torch), so the export stage and the service compute the very same
statistics. Checks:
  prediction  chi-square of the predicted-class counts against the training prior
  confidence  two-sample Kolmogorov-Smirnov distance of the top-1 probabilities
  embedding   mean shift in PCA space plus the reconstruction error, in reference units
  input       chi-square of binned input statistics (image brightness or text tokens)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from service.runtime import softmax

CHECKS = ("prediction", "confidence", "embedding", "input")
WINDOW = 200  # samples per evaluation; thresholds are calibrated for exactly this size
REPLAYS = 400  # in-distribution windows replayed at export to set each threshold
PRIOR_FLOOR = 1e-3  # a class absent from training still has an expected count
MIN_HOLDOUT = 50  # below this, a half-holdout reference is too noisy to calibrate against


@dataclass
class Summary:
    """Per-sample numbers kept for the window (a few floats per request)."""

    pred: np.ndarray  # predicted class index
    confidence: np.ndarray  # top-1 probability
    coords: np.ndarray  # [n, k] PCA coordinates of the pooled embedding
    recon: np.ndarray  # relative reconstruction error of the embedding
    inputs: np.ndarray  # brightness (images) or tokens after truncation (texts)

    def __len__(self) -> int:
        return len(self.pred)

    def take(self, idx: np.ndarray) -> Summary:
        return Summary(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list[Summary]) -> Summary:
        return Summary(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in Summary.__dataclass_fields__)
        )


def pca_basis(embeddings: np.ndarray, k: int = 8) -> dict:
    """Mean and the top-k principal directions (rows) of a set of embeddings."""
    mean = embeddings.mean(0)
    _, s, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    k = max(1, min(k, vt.shape[0], len(embeddings) - 1))
    var = (s**2) / max(1, len(embeddings) - 1)
    return {
        "mean": mean.tolist(),
        "components": vt[:k].tolist(),
        "explained_variance": var[:k].tolist(),
        "explained_variance_ratio": float(var[:k].sum() / var.sum()) if var.sum() else 1.0,
    }


def project(embeddings: np.ndarray, basis: dict) -> tuple[np.ndarray, np.ndarray]:
    """PCA coordinates and the relative reconstruction error of each embedding."""
    mean, comps = np.asarray(basis["mean"]), np.asarray(basis["components"])
    centred = embeddings.astype(np.float64) - mean
    coords = centred @ comps.T
    residual = centred - coords @ comps
    norm = np.linalg.norm(centred, axis=1) + 1e-12
    return coords, np.linalg.norm(residual, axis=1) / norm


def summarize(logits: np.ndarray, embedding: np.ndarray, inputs, basis: dict) -> Summary:
    p = softmax(logits)
    coords, recon = project(embedding, basis)
    return Summary(p.argmax(1), p.max(1), coords, recon, np.asarray(inputs, dtype=np.float64))


# ------------------------------------------------------------------ statistics


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic of observed counts against expected proportions."""
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def ks_distance(sample: np.ndarray, reference_sorted: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic D (reference given sorted)."""
    a = np.sort(sample)
    grid = np.concatenate([a, reference_sorted])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(reference_sorted, grid, side="right") / len(reference_sorted)
    return float(np.abs(cdf_a - cdf_b).max())


def statistics(s: Summary, ref: dict) -> dict[str, float]:
    n = len(s)
    prior = np.maximum(np.asarray(ref["prior"]), PRIOR_FLOOR)
    prior /= prior.sum()
    emb = ref["embedding"]
    # Two-sample form: the reference mean is itself estimated from `emb["n"]` samples.
    scale = 1.0 / n + 1.0 / emb["n"]
    shift = (s.coords.mean(0) - np.asarray(emb["mean"])) / np.asarray(emb["std"])
    recon_z = (s.recon.mean() - emb["recon_mean"]) / emb["recon_std"]
    edges = np.asarray(ref["input"]["edges"])  # inner edges: bins run to -inf and +inf
    binned = np.bincount(np.searchsorted(edges, s.inputs, side="right"), minlength=len(edges) + 1)
    return {
        "prediction": chi_square(np.bincount(s.pred, minlength=len(prior)), prior),
        "confidence": ks_distance(s.confidence, np.asarray(ref["confidence_sample"])),
        "embedding": float(((shift**2).sum() + recon_z**2) / scale),
        "input": chi_square(binned, np.asarray(ref["input"]["probs"])),
    }


# ------------------------------------------------------------------ calibration (export)


def fit(s: Summary, prior: list[float], bins: int = 8) -> dict:
    """The reference part: everything `statistics` compares a window with."""
    inner = np.unique(np.quantile(s.inputs, np.linspace(0, 1, bins + 1)[1:-1]))
    binned = np.bincount(np.searchsorted(inner, s.inputs, side="right"), minlength=len(inner) + 1)
    probs = (binned + 0.5) / (binned + 0.5).sum()  # no empty bin: no infinite statistic
    # Floors relative to the typical spread: a near-constant PCA direction of a small holdout
    # must not turn rounding noise into an alarm.
    std = s.coords.std(0)
    std = np.maximum(std, 0.05 * std.mean() + 1e-9)
    recon_std = max(float(s.recon.std()), 0.05 * float(s.recon.mean()), 0.01)  # a ratio
    return {
        "prior": list(prior),
        "confidence_sample": np.sort(s.confidence).tolist(),
        "embedding": {
            "n": len(s),
            "mean": s.coords.mean(0).tolist(),
            "std": std.tolist(),
            "recon_mean": float(s.recon.mean()),
            "recon_std": recon_std,
        },
        "input": {"edges": inner.tolist(), "probs": probs.tolist()},
    }


def calibrate(
    logits: np.ndarray,
    embeddings: np.ndarray,
    inputs: np.ndarray,
    prior: list[float],
    false_alarm_rate: float = 0.01,
    seed: int = 0,
) -> dict:
    """Fit the reference (PCA basis included) on one half of the holdout, replay bootstrap
    windows of the other half, and set each check's threshold at the (1 - rate / checks)
    quantile: an evaluation of in-distribution traffic raises any alarm with probability
    about `false_alarm_rate`. The replayed half is unseen by the fit, like live traffic
    (a basis fitted on all of the holdout under-states new samples' reconstruction error)."""
    n = len(logits)
    if n < MIN_HOLDOUT:
        return {
            "disabled": f"the holdout has {n} samples; drift calibration needs at least "
            f"{MIN_HOLDOUT} (fine-tune with more validation data)"
        }
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    a, b = order[: n // 2], order[n // 2 :]
    basis = pca_basis(embeddings[a].astype(np.float64))
    inputs = np.asarray(inputs, dtype=np.float64)
    ref = fit(summarize(logits[a], embeddings[a], inputs[a], basis), prior)
    replay = summarize(logits[b], embeddings[b], inputs[b], basis)
    null = {c: [] for c in CHECKS}
    for _ in range(REPLAYS):
        window = replay.take(rng.integers(0, len(replay), WINDOW))
        for c, v in statistics(window, ref).items():
            null[c].append(v)
    q = 1 - false_alarm_rate / len(CHECKS)
    return {
        **ref,
        "basis": basis,
        "window": WINDOW,
        "target_false_alarm_rate": false_alarm_rate,
        "replays": REPLAYS,
        "thresholds": {c: float(np.quantile(v, q)) for c, v in null.items()},
    }


# ------------------------------------------------------------------ the service's monitor


class Monitor:
    """Keeps the latest `window` samples younger than `max_age_s`; `scores()` is statistic /
    threshold per check, computed only when samples arrived since the previous call."""

    def __init__(self, drift: dict, max_age_s: float = 900.0) -> None:
        self.ref, self.basis = drift, drift["basis"]
        self.window, self.max_age_s = int(drift["window"]), max_age_s
        self._parts: list[tuple[float, Summary]] = []  # (monotonic time observed, summary)
        self._n = 0
        self._fresh = False  # samples arrived since the latest scores()
        self._lock = threading.Lock()

    def observe(self, logits: np.ndarray, embedding: np.ndarray, inputs, now=None) -> None:
        part = summarize(logits, embedding, inputs, self.basis)
        with self._lock:
            self._parts.append((time.monotonic() if now is None else now, part))
            self._n += len(part)
            self._fresh = True
            while self._n - len(self._parts[0][1]) >= self.window:
                self._n -= len(self._parts.pop(0)[1])

    def _expire(self, now: float | None) -> None:
        cutoff = (time.monotonic() if now is None else now) - self.max_age_s
        while self._parts and self._parts[0][0] < cutoff:
            self._n -= len(self._parts.pop(0)[1])

    def samples(self, now: float | None = None) -> int:
        """Samples in the window, after dropping those older than `max_age_s`."""
        with self._lock:
            self._expire(now)
            return min(self._n, self.window)

    def scores(self, now: float | None = None) -> dict[str, float] | None:
        """None while the window is not full or nothing new arrived since the last call."""
        with self._lock:
            self._expire(now)
            if self._n < self.window or not self._fresh:
                return None
            self._fresh = False
            s = Summary.concat([p for _, p in self._parts])
        s = s.take(np.arange(len(s) - self.window, len(s)))
        stats = statistics(s, self.ref)
        return {c: stats[c] / self.ref["thresholds"][c] for c in CHECKS}
