"""Drift statistics (DESIGN.md §4), numpy only: the per-sample summary every task produces,
the window statistics, and the thresholds calibrated at export for a target false-alarm rate.
Export (`calibrate`, on the holdout) and the service (`service.drift.Monitor`, on live
traffic) both compute them here, so they are the same numbers.

Checks (each task names the ones it has, `Task.checks`):
  prediction  chi-square of the predicted-category counts against the reference shares
              (classes; the dominant entity type of a text)
  confidence  two-sample Kolmogorov-Smirnov distance of the per-sample confidence
  embedding   mean shift in PCA space plus the reconstruction error, in reference units
  input       chi-square of a binned input statistic (image brightness, tokens per text)
  entities    chi-square of the binned entity count per text (token classification)
  detections  the same of the detections per image (object detection)
  feature:<name>  chi-square of one input column (tables): numeric values binned at the
              reference quantiles, categories counted (unseen ones in an "other" bin), each
              with a bin for missing values; one check per column, at most MAX_FEATURES
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.common import softmax

CHECKS = ("prediction", "confidence", "embedding", "input")
ALL_CHECKS = CHECKS + ("entities", "detections")
COUNTS = ("entities", "detections")  # checks of the per-sample count, binned
WINDOW = 200  # samples per evaluation; thresholds are calibrated for exactly this size
REPLAYS = 400  # in-distribution windows replayed at export to set each threshold
PRIOR_FLOOR = 1e-3  # a class absent from training still has an expected count
MIN_HOLDOUT = 50  # below this, a half-holdout reference is too noisy to calibrate against
MAX_FEATURES = 32  # per-column checks (and `check` label values) of a table at most
FEATURE = "feature:"  # prefix of the per-column checks


@dataclass
class Summary:
    """Per-sample numbers kept for the window (a few floats per request)."""

    pred: np.ndarray  # predicted category index
    confidence: np.ndarray  # top-1 probability (or the task's per-sample confidence)
    coords: np.ndarray  # [n, k] PCA coordinates of the pooled embedding
    recon: np.ndarray  # relative reconstruction error of the embedding
    inputs: np.ndarray  # brightness (images) or tokens after truncation (texts)
    count: np.ndarray  # entities per text, detections per image, else zeros
    features: np.ndarray  # [n, columns] encoded table rows (NaN: missing), else [n, 0]

    def __len__(self) -> int:
        return len(self.pred)

    def take(self, idx: np.ndarray) -> Summary:
        return Summary(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list[Summary]) -> Summary:
        return Summary(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in Summary.__dataclass_fields__)
        )


@dataclass
class Samples:
    """What a task hands the drift monitor for a batch: one entry per input."""

    pred: np.ndarray
    confidence: np.ndarray
    embedding: np.ndarray  # [n, dim] pooled embedding
    inputs: np.ndarray
    count: np.ndarray | None = None
    features: np.ndarray | None = None  # tables: the encoded rows, per-column checks
    kinds: tuple[str, ...] = ()  # tables: each column's kind, numeric or categorical

    @staticmethod
    def from_logits(logits: np.ndarray, embedding: np.ndarray, inputs) -> Samples:
        p = softmax(logits)
        return Samples(p.argmax(1), p.max(1), embedding, np.asarray(inputs, dtype=np.float64))


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


def summarize_samples(s: Samples, basis: dict) -> Summary:
    coords, recon = project(s.embedding, basis)
    n = len(s.pred)
    count = np.zeros(n) if s.count is None else np.asarray(s.count, dtype=np.float64)
    features = np.zeros((n, 0)) if s.features is None else np.asarray(s.features, np.float64)
    return Summary(
        np.asarray(s.pred, dtype=np.int64),
        np.asarray(s.confidence, dtype=np.float64),
        coords,
        recon,
        np.asarray(s.inputs, dtype=np.float64),
        count,
        features,
    )


def summarize(logits: np.ndarray, embedding: np.ndarray, inputs, basis: dict) -> Summary:
    """The summary of classification outputs (top-1 class and probability)."""
    return summarize_samples(Samples.from_logits(logits, embedding, inputs), basis)


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


def _binned(values: np.ndarray, ref: dict) -> float:
    edges = np.asarray(ref["edges"])  # inner edges: bins run to -inf and +inf
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return chi_square(counts, np.asarray(ref["probs"]))


def statistics(s: Summary, ref: dict) -> dict[str, float]:
    """Every check the reference was calibrated for (old references: the four of CHECKS)."""
    checks = ref.get("checks", CHECKS)
    out = {}
    if "prediction" in checks:
        prior = np.maximum(np.asarray(ref["prior"]), PRIOR_FLOOR)
        prior /= prior.sum()
        out["prediction"] = chi_square(np.bincount(s.pred, minlength=len(prior)), prior)
    if "confidence" in checks:
        out["confidence"] = ks_distance(s.confidence, np.asarray(ref["confidence_sample"]))
    if "embedding" in checks:
        emb = ref["embedding"]
        # Two-sample form: the reference mean is itself estimated from `emb["n"]` samples.
        scale = 1.0 / len(s) + 1.0 / emb["n"]
        shift = (s.coords.mean(0) - np.asarray(emb["mean"])) / np.asarray(emb["std"])
        recon_z = (s.recon.mean() - emb["recon_mean"]) / emb["recon_std"]
        out["embedding"] = float(((shift**2).sum() + recon_z**2) / scale)
    if "input" in checks:
        out["input"] = _binned(s.inputs, ref["input"])
    for c in COUNTS:
        if c in checks:
            out[c] = _binned(s.count, ref[c])
    for c in checks:
        if c.startswith(FEATURE):
            out[c] = _column(s.features[:, ref["features"][c]["index"]], ref["features"][c])
    return out


def _column_counts(values: np.ndarray, col: dict) -> np.ndarray:
    """Counts per bin of one table column: value bins (quantile edges, or one per category
    and one for the unseen), then one for missing values."""
    missing = np.isnan(values)
    present = values[~missing]
    if col["kind"] == "numeric":
        idx = np.searchsorted(np.asarray(col["edges"]), present, side="right")
    else:
        idx = np.minimum(present.astype(np.int64), col["categories"])
    bins = len(col["probs"]) - 1
    return np.append(np.bincount(idx, minlength=bins)[:bins], missing.sum())


def _column(values: np.ndarray, col: dict) -> float:
    return chi_square(_column_counts(values, col), np.asarray(col["probs"]))


def _fit_column(values: np.ndarray, index: int, kind: str, bins: int = 8) -> dict:
    present = values[~np.isnan(values)]
    if kind == "numeric":
        edges = (
            np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1]))
            if len(present)
            else np.array([])
        )
        col = {
            "index": index,
            "kind": kind,
            "edges": edges.tolist(),
            "probs": [0.0] * (len(edges) + 2),
        }
    else:
        k = int(present.max()) + 1 if len(present) else 0
        col = {"index": index, "kind": kind, "categories": k, "probs": [0.0] * (k + 2)}
    counts = _column_counts(values, col) + 0.5  # no empty bin: no infinite statistic
    col["probs"] = (counts / counts.sum()).tolist()
    return col


# ------------------------------------------------------------------ calibration (export)


def _bins(values: np.ndarray, bins: int) -> dict:
    inner = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    binned = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(inner) + 1)
    probs = (binned + 0.5) / (binned + 0.5).sum()  # no empty bin: no infinite statistic
    return {"edges": inner.tolist(), "probs": probs.tolist()}


def fit(s: Summary, prior: list[float], bins: int = 8, checks=CHECKS, kinds: tuple = ()) -> dict:
    """The reference part: everything `statistics` compares a window with."""
    # Floors relative to the typical spread: a near-constant PCA direction of a small holdout
    # must not turn rounding noise into an alarm.
    std = s.coords.std(0)
    std = np.maximum(std, 0.05 * std.mean() + 1e-9)
    recon_std = max(float(s.recon.std()), 0.05 * float(s.recon.mean()), 0.01)  # a ratio
    ref = {
        "checks": list(checks),
        "prior": list(prior),
        "confidence_sample": np.sort(s.confidence).tolist(),
        "embedding": {
            "n": len(s),
            "mean": s.coords.mean(0).tolist(),
            "std": std.tolist(),
            "recon_mean": float(s.recon.mean()),
            "recon_std": recon_std,
        },
        "input": _bins(s.inputs, bins),
    }
    for c in COUNTS:
        if c in checks:
            ref[c] = _bins(s.count, bins)
    columns = [c for c in checks if c.startswith(FEATURE)]
    if columns:
        ref["features"] = {
            c: _fit_column(s.features[:, j], j, kinds[j], bins) for j, c in enumerate(columns)
        }
    return ref


def calibrate_samples(
    samples: Samples,
    prior: list[float] | None,
    checks=CHECKS,
    false_alarm_rate: float = 0.01,
    seed: int = 0,
    categories: int | None = None,
) -> dict:
    """Fit the reference (PCA basis included) on one half of the holdout, replay bootstrap
    windows of the other half, and set each check's threshold at the (1 - rate / checks)
    quantile: an evaluation of in-distribution traffic raises any alarm with probability
    about `false_alarm_rate`. The replayed half is unseen by the fit, like live traffic
    (a basis fitted on all of the holdout under-states new samples' reconstruction error).
    `prior` None: the predicted-category shares of the fitted half (with `categories`)."""
    n = len(samples.pred)
    if n < MIN_HOLDOUT:
        return {
            "disabled": f"the holdout has {n} samples; drift calibration needs at least "
            f"{MIN_HOLDOUT} (fine-tune with more validation data)"
        }
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    a, b = order[: n // 2], order[n // 2 :]
    basis = pca_basis(np.asarray(samples.embedding)[a].astype(np.float64))
    full = summarize_samples(samples, basis)
    fitted, replay = full.take(a), full.take(b)
    if prior is None:
        k = categories or int(full.pred.max()) + 1
        prior = (np.bincount(fitted.pred, minlength=k) / len(fitted)).tolist()
    ref = fit(fitted, prior, checks=checks, kinds=samples.kinds)
    null = {c: [] for c in checks}
    for _ in range(REPLAYS):
        window = replay.take(rng.integers(0, len(replay), WINDOW))
        for c, v in statistics(window, ref).items():
            null[c].append(v)
    per_check = false_alarm_rate / len(checks)
    return {
        **ref,
        "basis": basis,
        "window": WINDOW,
        "target_false_alarm_rate": false_alarm_rate,
        "replays": REPLAYS,
        "thresholds": {c: _threshold(np.asarray(v), per_check) for c, v in null.items()},
    }


def _threshold(null: np.ndarray, rate: float) -> float:
    """The (1 - rate) quantile of the replayed statistics; when ties at it would fire more
    often than `rate` (a discrete statistic: e.g. every text's dominant entity type the same),
    the next float above it, so that only a larger statistic reaches the threshold."""
    q = float(np.quantile(null, 1 - rate))
    if (null >= q).mean() > rate:
        q = float(np.nextafter(q, np.inf)) if q > 0 else float(np.nextafter(0.0, 1.0))
    return q


def calibrate(
    logits: np.ndarray,
    embeddings: np.ndarray,
    inputs: np.ndarray,
    prior: list[float],
    false_alarm_rate: float = 0.01,
    seed: int = 0,
) -> dict:
    """`calibrate_samples` for classification outputs against the training prior."""
    samples = Samples.from_logits(logits, embeddings, inputs)
    return calibrate_samples(samples, prior, CHECKS, false_alarm_rate, seed)
