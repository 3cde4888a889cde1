"""metrics: each function against a value computed independently, by counting, on fresh random
inputs with ties; NaN/inf and misshapen inputs raise one clear error."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dropinf.errors import NonFiniteError, ShapeError
from dropinf.pipeline import metrics


def _auc_by_counting(labels, scores):
    """P(score of a positive > score of a negative) + P(equal) / 2, over all pairs."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _ranks_by_counting(values):
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


def _spearman_by_counting(a, b):
    ra, rb = _ranks_by_counting(list(a)), _ranks_by_counting(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return float("nan") if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


@pytest.mark.parametrize("trial", range(12))
def test_mislabel_auc_equals_pair_counting(trial):
    rng = np.random.default_rng(trial)
    y = rng.random(60) < 0.3
    y[0], y[1] = True, False
    # every other trial: few distinct values, so many ties
    s = rng.integers(0, 4, 60).astype(float) if trial % 2 else rng.standard_normal(60)
    assert metrics.mislabel_auc(y, s) == pytest.approx(_auc_by_counting(y, s), abs=1e-12)


def test_mislabel_auc_orientation_and_chance():
    y = np.array([False, False, True, True])
    assert metrics.mislabel_auc(y, [0.0, 1.0, 2.0, 3.0]) == 1.0  # flipped score highest: perfect
    assert metrics.mislabel_auc(y, [3.0, 2.0, 1.0, 0.0]) == 0.0
    assert metrics.mislabel_auc(y, [1.0, 1.0, 1.0, 1.0]) == 0.5  # all tied: chance


def test_mislabel_auc_errors():
    y = np.array([False, True, False, True])
    with pytest.raises(NonFiniteError, match=r"indices \[2\]"):
        metrics.mislabel_auc(y, [0.1, 0.2, float("nan"), 0.4])
    with pytest.raises(ShapeError, match="one score per example"):
        metrics.mislabel_auc(y, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 of 4 are flipped"):
        metrics.mislabel_auc(np.zeros(4, bool), [0.1, 0.2, 0.3, 0.4])


def test_most_helpful_first():
    assert metrics.most_helpful_first(np.array([0.5, -2.0, 1.0, -2.0])).tolist() == [1, 3, 0, 2]
    rng = np.random.default_rng(3)
    s = rng.integers(-3, 3, 200).astype(float)
    order = metrics.most_helpful_first(s)
    expected = sorted(range(200), key=lambda i: (s[i], i))  # by score, ties by index
    assert order.tolist() == expected
    with pytest.raises(NonFiniteError, match=r"indices \[1\]"):
        metrics.most_helpful_first([0.0, float("inf")])


def test_ranks_and_spearman_equal_counting():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(15, 6)).astype(float)  # many ties
    b = rng.standard_normal((15, 6))
    b[:, 2] = 3.0  # a constant column: no correlation is defined
    ranks = metrics.average_ranks(a)
    for j in range(a.shape[1]):
        assert ranks[:, j].tolist() == _ranks_by_counting(list(a[:, j]))
    rho = metrics.spearman_columns(a, b)
    ref = np.array([_spearman_by_counting(a[:, j], b[:, j]) for j in range(a.shape[1])])
    assert np.isnan(rho[2]) and np.isnan(ref[2])
    np.testing.assert_allclose(rho, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_spearman_errors():
    a = np.zeros((5, 2))
    with pytest.raises(ShapeError, match="one shape"):
        metrics.spearman_columns(a, np.zeros((5, 3)))
    b = np.ones((5, 2))
    b[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"actual values .* indices \[3\]"):
        metrics.spearman_columns(a, b)


def test_lds_per_test_equals_counting():
    rng = np.random.default_rng(2)
    n, m, M = 30, 5, 11
    masks = rng.random((M, n)) < 0.5
    scores = rng.standard_normal((n, m))
    actual = rng.standard_normal((M, m))
    ref = []
    for j in range(m):
        predicted = [sum(scores[i, j] for i in range(n) if masks[k, i]) for k in range(M)]
        ref.append(_spearman_by_counting(predicted, list(actual[:, j])))
    np.testing.assert_allclose(metrics.lds_per_test(masks, scores, actual), ref, rtol=1e-10, atol=1e-12)
    # a perfect linear datamodel: actual losses are the predictions themselves
    assert np.allclose(metrics.lds_per_test(masks, scores, masks @ scores), 1.0)
    with pytest.raises(ShapeError, match="do not fit"):
        metrics.lds_per_test(masks, scores[:-1], actual)


def test_columns_defined_once():
    from dropinf.pipeline import evaluate, report

    assert evaluate.COLUMNS is metrics.COLUMNS and report.COLUMNS is metrics.COLUMNS
    assert metrics.COLUMNS[:6] == ("experiment", "method", "r", "seed", "metric", "value")
