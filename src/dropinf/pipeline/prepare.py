"""Stage `prepare_data`: load a registered dataset, inject label noise with a seed, save tensors.

Label noise: exactly round(noise * n_train) training examples, drawn uniformly without
replacement, get a different label drawn uniformly from the other classes. The test split is
never touched. The file keeps the clean labels and the flipped mask, which is the ground truth of
the mislabel-detection AUC.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DropinfError
from .common import Stage, atomic_path, log

SPLIT_EXTRAS = ("labels_clean", "flipped")


def flip_labels(labels: torch.Tensor, num_classes: int, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy labels, flipped mask): round(rate*n) labels moved to a different class."""
    if not 0.0 <= rate < 1.0:
        raise DropinfError(f"label_noise must be in [0, 1), got {rate}")
    n = labels.shape[0]
    k = int(round(rate * n))
    rng = np.random.default_rng(int(seed))
    flipped = np.zeros(n, dtype=bool)
    noisy = labels.clone()
    if k:
        if num_classes is None or num_classes < 2:
            raise DropinfError("label noise needs a classification dataset with at least 2 classes")
        idx = rng.choice(n, size=k, replace=False)
        shift = rng.integers(1, num_classes, size=k)
        noisy[idx] = (labels[idx] + torch.from_numpy(shift)) % num_classes
        flipped[idx] = True
    return noisy, torch.from_numpy(flipped)


def prepare_data(out, dataset: str, dataset_options: dict | None = None, label_noise: float = 0.0,
                 noise_seed: int = 0, threads: int | None = None) -> dict:
    from ..data import load_dataset

    stage = Stage("prepare_data", threads=threads)
    data = load_dataset(dataset, **(dataset_options or {}))
    train = dict(data.train)
    if label_noise:
        if data.task != "classification" or "labels" not in train:
            raise DropinfError(f"label_noise={label_noise} needs a classification dataset; {dataset} is {data.task!r}")
        noisy, flipped = flip_labels(train["labels"], data.num_classes, label_noise, noise_seed)
        train["labels_clean"], train["labels"], train["flipped"] = train["labels"], noisy, flipped
    elif "labels" in train:
        train["labels_clean"] = train["labels"].clone()
        train["flipped"] = torch.zeros(train["labels"].shape[0], dtype=torch.bool)
    n_train = next(iter(train.values())).shape[0]
    n_test = next(iter(data.test.values())).shape[0]
    n_flipped = int(train["flipped"].sum()) if "flipped" in train else 0
    log.info("dataset %s: %d train, %d test examples; %d train labels flipped (rate %.3f, seed %d)",
             dataset, n_train, n_test, n_flipped, label_noise, noise_seed)
    blob = {
        "name": data.name, "task": data.task, "num_classes": data.num_classes, "meta": data.meta,
        "train": train, "test": dict(data.test),
        "label_noise": float(label_noise), "noise_seed": int(noise_seed),
        "dataset_options": dict(dataset_options or {}),
        "provenance": stage.provenance(),
    }
    with atomic_path(out) as tmp:
        torch.save(blob, tmp)
    return {"n_train": n_train, "n_test": n_test, "n_flipped": n_flipped}


def load_prepared(path) -> dict:
    return torch.load(path, weights_only=False)


def task_data(blob: dict):
    """The saved splits as a `TaskData` (model inputs + labels only, for model builders)."""
    from ..data import TaskData

    return TaskData(name=blob["name"], task=blob["task"], num_classes=blob["num_classes"], meta=blob["meta"],
                    train=model_inputs(blob["train"]), test=model_inputs(blob["test"]))


def model_inputs(split: dict) -> dict:
    """A split without the workflow's bookkeeping tensors (clean labels, flipped mask)."""
    return {k: v for k, v in split.items() if k not in SPLIT_EXTRAS}
