"""The paired variant gate (export/gate.py): numbers first, then the export that uses it."""

import numpy as np
import pytest

from export import gate


def _pairs(both: int, fp32_only: int, variant_only: int, neither: int):
    x = [1] * both + [1] * fp32_only + [0] * variant_only + [0] * neither
    y = [1] * both + [0] * fp32_only + [1] * variant_only + [0] * neither
    return np.array(x, bool), np.array(y, bool)


def test_mcnemar_counts_and_exact_p_value():
    v = gate.paired_accuracy(*_pairs(240, 6, 1, 9), max_drop=0.01)
    assert (v.fp32_only_right, v.variant_only_right, v.items) == (6, 1, 256)
    assert v.drop == pytest.approx(5 / 256)
    assert v.mcnemar_p == pytest.approx(2 * (1 + 7) / 2**7)  # exact binomial, 6 of 7 one way
    assert v.drop_upper_95 > v.drop and not v.passed


def test_the_bound_accounts_for_the_holdout_size():
    """No answer differs in both, but 6 items cannot show a drop under 1 point; 2,000 can."""
    small = gate.paired_accuracy(*_pairs(5, 0, 0, 1), max_drop=0.01)
    large = gate.paired_accuracy(*_pairs(1900, 0, 0, 100), max_drop=0.01)
    assert small.drop == large.drop == 0.0
    assert small.drop_upper_95 > 0.1 and not small.passed
    assert large.drop_upper_95 < 0.005 and large.passed
    assert "larger --holdout-size" in small.reason("accuracy")


def test_one_flip_among_many_passes_and_the_bound_grows_with_the_flips():
    bounds = [
        gate.paired_accuracy(*_pairs(760, k, 0, 14 - k), 0.01).drop_upper_95 for k in range(6)
    ]
    assert bounds == sorted(bounds) and bounds[1] < 0.01 < bounds[5]


def test_paired_bootstrap_of_a_metric_that_is_not_a_mean():
    """Macro-averaged scores go through the bootstrap: the variant here loses one class."""
    rng = np.random.default_rng(0)
    targets = list(rng.integers(0, 3, 300))

    def score(outputs, gold):
        out, gold = np.asarray(outputs), np.asarray(gold)
        return float(np.mean([np.mean(out[gold == c] == c) for c in np.unique(gold)]))

    same = gate.paired_bootstrap(score, targets, targets, targets, 0.01)
    assert same.drop == 0 and same.drop_upper_95 == 0 and same.passed
    worse = [0 if t == 2 else t for t in targets]
    lost = gate.paired_bootstrap(score, targets, worse, targets, 0.01)
    assert lost.drop == pytest.approx(1 / 3) and lost.drop_upper_95 >= lost.drop - 0.05
    assert not lost.passed
