"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): real data, offline.

`x` is the 64 pixel intensities scaled to [0, 1] (float32), `labels` the digit (int64). The
train/test split is stratified and seeded, so a (seed, test_fraction) pair always gives the same
examples in the same order.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DropinfError
from . import TaskData, register_dataset


@register_dataset("digits")
def load_digits(test_fraction: float = 0.2, seed: int = 0, max_train: int | None = None,
                max_test: int | None = None) -> TaskData:
    """Digits, split into train/test. `max_train`/`max_test` keep a seeded subset (for quick tests)."""
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise DropinfError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=float(test_fraction), random_state=int(seed), stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    rng = np.random.default_rng(int(seed))
    if max_train is not None and max_train < len(tr):
        tr = np.sort(rng.choice(tr, size=int(max_train), replace=False))
    if max_test is not None and max_test < len(te):
        te = np.sort(rng.choice(te, size=int(max_test), replace=False))

    def split(ix):
        return {"x": torch.from_numpy(x[ix]), "labels": torch.from_numpy(y[ix])}

    return TaskData(name="digits", task="classification", train=split(tr), test=split(te), num_classes=10,
                    meta={"source": "sklearn.datasets.load_digits", "n_features": int(x.shape[1]),
                          "train_index": tr.tolist(), "test_index": te.tolist(),
                          "test_fraction": float(test_fraction), "seed": int(seed)})
