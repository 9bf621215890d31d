"""Whether a precision variant may replace fp32: a paired non-inferiority test on the holdout.

The holdout is drawn from the test split, which early stopping and model selection never saw;
fp32 and the variant answer the same items, so they are compared item by item (paired), and the
gate asks for a bound, not a point estimate: a variant passes when the one-sided 95% upper
confidence bound of its metric's drop is within `max_drop`. A raw difference on a few hundred
items cannot tell one flipped borderline answer from a real loss (256 items: 0.4 points each).

- accuracy (classification of texts, images, audio): Newcombe's hybrid score interval for the
  difference of two paired proportions (Newcombe 1998, Statistics in Medicine 17, method 10),
  with McNemar's exact p-value reported beside it;
- any other metric (entity F1, SQuAD F1, mAP, mIoU, ROC-AUC, WER): a paired bootstrap of the
  task's own metric, the same resampled items for both (`RESAMPLES`); for a metric where lower
  is better (WER) the drop is the variant's rise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z_ONE_SIDED_95 = 1.6449  # one-sided 95% bound: the upper end of a two-sided 90% interval
RESAMPLES = 200  # paired bootstrap resamples: the 95th percentile within about ±0.3 points
SEED = 0  # the same resamples for every variant of an export


@dataclass(frozen=True)
class Verdict:
    test: str  # which bound
    items: int  # holdout items compared
    drop: float  # fp32 metric minus the variant's, on those items
    drop_upper_95: float  # one-sided 95% upper confidence bound of the drop
    max_drop: float
    passed: bool
    mcnemar_p: float | None = None  # exact two-sided, accuracy only
    fp32_only_right: int | None = None  # discordant pairs (accuracy only)
    variant_only_right: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def reason(self, metric: str) -> str:
        name = metric.replace("_", " ")
        why = (
            f"{name} drop {self.drop:+.4f} on {self.items} holdout items, 95% upper bound "
            f"{self.drop_upper_95:.4f} > allowed {self.max_drop:g} ({self.test})"
        )
        if self.drop <= self.max_drop:
            why += "; too few holdout items to show it (fine-tune with a larger --holdout-size)"
        return why


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_accuracy(fp32_right: np.ndarray, variant_right: np.ndarray, max_drop: float) -> Verdict:
    """Newcombe's upper bound of accuracy(fp32) - accuracy(variant) from paired 0/1 answers."""
    from scipy.stats import binomtest

    x, y = np.asarray(fp32_right, bool), np.asarray(variant_right, bool)
    n = len(x)
    a, b = int((x & y).sum()), int((x & ~y).sum())
    c, d = int((~x & y).sum()), int((~x & ~y).sum())
    p1, p2 = (a + b) / n, (a + c) / n
    z = Z_ONE_SIDED_95
    l1, u1 = _wilson(a + b, n, z)
    l2, u2 = _wilson(a + c, n, z)
    # The correlation of the pair (phi), with Newcombe's continuity correction when positive;
    # 0 when a margin is empty (every item right, say).
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    ad_bc = a * d - b * c
    phi = (max(ad_bc - n / 2, 0) if ad_bc > 0 else ad_bc) / math.sqrt(margins) if margins else 0.0
    upper = (p1 - p2) + math.sqrt(
        max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0)
    )
    p_value = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return Verdict(
        "Newcombe paired score interval",
        n,
        (b - c) / n,
        upper,
        max_drop,
        upper <= max_drop,
        float(p_value),
        b,
        c,
    )


def paired_bootstrap(
    score, fp32: Sequence, variant: Sequence, targets: Sequence, max_drop: float
) -> Verdict:
    """95th percentile of the metric's drop over paired resamples; `score(outputs, targets)`
    gives the metric (nan where a resample cannot be scored, e.g. one class for ROC-AUC)."""
    n = len(targets)
    drop = score(fp32, targets) - score(variant, targets)
    rng = np.random.default_rng(SEED)
    drops = []
    for _ in range(RESAMPLES):
        idx = rng.integers(0, n, n)
        pick = [targets[i] for i in idx]
        drops.append(score([fp32[i] for i in idx], pick) - score([variant[i] for i in idx], pick))
    finite = np.asarray(drops, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    upper = float(np.percentile(finite, 95)) if len(finite) >= RESAMPLES // 2 else math.inf
    return Verdict(
        f"paired bootstrap, {RESAMPLES} resamples",
        n,
        float(drop),
        upper,
        max_drop,
        upper <= max_drop,
    )


def judge(
    contract, fp32: Sequence, variant: Sequence, targets: Sequence, max_drop: float, skip: int = 0
) -> Verdict:
    """The gate for one variant on holdout items `skip:` (the first `skip` calibrated it)."""
    fp32, variant, targets = list(fp32)[skip:], list(variant)[skip:], list(targets)[skip:]
    metric = contract.metric
    correct = contract.item_correct(fp32, targets)
    if metric == "accuracy" and correct is not None:
        return paired_accuracy(correct, contract.item_correct(variant, targets), max_drop)

    sign = -1.0 if getattr(contract, "lower_is_better", False) else 1.0  # WER: a rise drops

    def score(outputs, gold) -> float:
        try:
            return sign * float(contract.score(outputs, gold)[metric])
        except ValueError:  # a resample the metric is undefined on
            return math.nan

    return paired_bootstrap(score, fp32, variant, targets, max_drop)
