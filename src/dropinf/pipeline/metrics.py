"""The evaluation metrics, as pure functions of arrays, and the one schema of the tidy metric rows.

* `mislabel_auc`: ROC AUC of influence scores against the flipped-label mask (positive = harmful,
  so mislabeled examples should score high; ties count one half; 0.5 = chance).
* `most_helpful_first`: training indices from the most negative score (most helpful) up.
* `spearman_columns`, `lds_per_test`: the linear datamodeling score (see `pipeline/lds.py`).

Scores with NaN or inf raise `NonFiniteError` naming the first bad indices: a metric of a broken
score vector would look like a (bad) result. Only numpy, scipy and scikit-learn are imported.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import NonFiniteError, ShapeError

#: Provenance columns stamped on every metric row by the stage that produced it.
PROVENANCE = ("git_commit", "git_dirty", "config_sha256", "dropinf_version", "torch_version", "device",
              "stage_seconds", "started_at")
#: Columns of every metrics.csv and of summary.csv (`r` empty for uncompressed methods, `seed`
#: empty for deterministic ones).
COLUMNS = ("experiment", "method", "r", "seed", "metric", "value") + PROVENANCE
#: Wall-second metrics: own gradient pass (both splits), projection of stored raw gradients, the
#: solver (including any recomputation), raw gradients recomputed inside the solver.
TIMING_METRICS = ("extract_seconds", "compress_seconds", "score_seconds", "recompute_seconds")


def _finite(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(x.shape[0], -1).any(axis=1) if x.ndim > 1 else bad)[:10].tolist()
        raise NonFiniteError(f"{what} has NaN/inf values at indices {rows} (first {len(rows)} shown)")
    return x


def mislabel_auc(flipped, scores) -> float:
    """ROC AUC of `scores` for the positive class `flipped` (bool, one per training example)."""
    from sklearn.metrics import roc_auc_score

    flipped = np.asarray(flipped, dtype=bool)
    scores = _finite(scores, "influence scores")
    if flipped.shape != scores.shape or flipped.ndim != 1:
        raise ShapeError(f"mislabel AUC needs one score per example: {scores.shape} scores, {flipped.shape} labels")
    n_pos = int(flipped.sum())
    if n_pos in (0, flipped.shape[0]):
        raise ValueError(f"mislabel AUC needs flipped and clean examples; {n_pos} of {flipped.shape[0]} are flipped")
    return float(roc_auc_score(flipped, scores))


def most_helpful_first(scores) -> np.ndarray:
    """Training indices ordered from the most negative score (most helpful) to the most positive
    (most harmful); equal scores keep index order, so the ranking is reproducible."""
    scores = _finite(scores, "influence scores")
    if scores.ndim != 1:
        raise ShapeError(f"ranking needs one score per example, got shape {scores.shape}")
    return np.argsort(scores, kind="stable")


def average_ranks(x) -> np.ndarray:
    """1-based ranks of each column of `x` (or of a vector), ties getting their average rank."""
    from scipy.stats import rankdata

    x = np.asarray(x, dtype=np.float64)
    return rankdata(x, method="average", axis=0)


def spearman_columns(a, b) -> np.ndarray:
    """(m,) Spearman correlation of a[:, j] with b[:, j] (both (M, m), finite); NaN where a column is
    constant (no correlation is defined there)."""
    from scipy.stats import ConstantInputWarning, spearmanr

    a, b = _finite(a, "predicted values"), _finite(b, "actual values")
    if a.shape != b.shape or a.ndim != 2:
        raise ShapeError(f"spearman_columns needs two (M, m) arrays of one shape, got {a.shape} and {b.shape}")
    out = np.full(a.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        for j in range(a.shape[1]):
            out[j] = spearmanr(a[:, j], b[:, j]).statistic
    return out


def predicted_losses(masks, scores) -> np.ndarray:
    """(M, m) linear datamodel predictions sum_{i in S_k} tau_j(z_i) = masks @ scores."""
    masks = np.asarray(masks, dtype=np.float64)
    scores = _finite(scores, "per-test-example scores")
    if masks.ndim != 2 or scores.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise ShapeError(f"masks {masks.shape} (subsets x train) and scores {scores.shape} (train x test) do not fit")
    return masks @ scores


def lds_per_test(masks, scores, actual) -> np.ndarray:
    """(m,) LDS_j: Spearman over the subsets of predicted (masks @ scores) against actual (M, m)."""
    return spearman_columns(predicted_losses(masks, scores), actual)
