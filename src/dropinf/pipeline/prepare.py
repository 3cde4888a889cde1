"""Stage `prepare_data`: load a registered dataset, inject label noise with a seed, save tensors.

Label noise: exactly round(noise * n_train) training examples, drawn uniformly without
replacement, get a different label drawn uniformly from the other classes. The test split is
never touched. The file keeps the clean labels and the flipped mask, which is the ground truth of
the mislabel-detection AUC.

File format (no pickle: loading it runs no code): safetensors, one tensor per (split, key) named
`train/x`, `test/labels`, ...; everything else (name, task, classes, the loader's meta such as
texts, label-noise settings, provenance) as JSON in the header's metadata under "dropinf".
Feature tensors with NaN/inf values are refused here, naming the split, feature and rows.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DropinfError, IntegrityError, NonFiniteError
from .commands import command, option
from .common import Stage, atomic_path, jsonable, log

SPLIT_EXTRAS = ("labels_clean", "flipped")
SPLITS = ("train", "test")
HEADER_KEY = "dropinf"


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


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    out: Path = option("the prepared data file to write")
    dataset: str = option("registered dataset name")
    dataset_options: dict | None = option("JSON keyword options of the dataset loader", default=None)
    label_noise: float = option("fraction of training labels flipped", default=0.0)
    noise_seed: int = option("seed of the flipped labels", default=0)
    threads: int | None = option("torch CPU threads", default=None)


@command("prepare_data", PrepareOptions,
       help="load a dataset, flip a fraction of training labels (seeded), save tensors")
def prepare_data(*, out, dataset: str, dataset_options: dict | None = None, label_noise: float = 0.0,
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
    for split_name, split in (("train", train), ("test", data.test)):
        check_features(split, split_name, dataset)
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
    save_tensors(out, {s: blob.pop(s) for s in SPLITS}, blob)
    return {"n_train": n_train, "n_test": n_test, "n_flipped": n_flipped}


def check_features(split: dict, split_name: str, dataset: str) -> None:
    """Refuse NaN/inf in a floating-point input tensor, naming the feature and the first rows
    (else training would later fail as if it had diverged)."""
    for key, t in split.items():
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if not bad.any():
            continue
        rows_mask = bad.reshape(t.shape[0], -1).any(dim=1)
        rows = torch.nonzero(rows_mask).flatten()[:10].tolist()
        cols = torch.nonzero(bad.reshape(t.shape[0], -1)[rows[0]]).flatten()[:5].tolist()
        raise NonFiniteError(f"dataset {dataset}: {split_name} feature {key!r} has NaN/inf values in "
                             f"{int(rows_mask.sum())} row(s), first {rows} (row {rows[0]}: flat positions {cols}); "
                             f"clean the data (drop or impute those rows) before running")


def save_tensors(out, groups: dict[str, dict], header: dict) -> None:
    """A safetensors file holding `groups` ({group: {key: tensor}}) as `group/key` and `header`
    (JSON) in its metadata, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"{g}/{k}": v.detach().cpu().contiguous().clone() for g, d in groups.items() for k, v in d.items()}
    meta = {**jsonable(header), "groups": {g: list(d) for g, d in groups.items()}}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(meta, sort_keys=True)})


def load_tensors(path, what: str) -> tuple[dict, dict[str, dict]]:
    """(header, {group: {key: tensor}}) of a file written by `save_tensors`. A file in another
    format (e.g. a pickle written by an older dropinf, which is never loaded: unpickling runs code)
    or a damaged one raises IntegrityError naming the file and the command that rewrites it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fix = f"snakemake --forcerun {shlex.quote(str(path))}"
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(HEADER_KEY)
        tensors = load_file(str(path))
        header = json.loads(meta)
    except FileNotFoundError:
        raise DropinfError(f"{what} {path} does not exist") from None
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
            raise IntegrityError(f"{what} {path} is a pickle (torch.save) file from an older dropinf; pickles are "
                                 f"not loaded (they can run code). Rewrite it with: {fix}") from None
        raise IntegrityError(f"{what} {path} is damaged or not a dropinf file ({type(e).__name__}: {e}); "
                             f"rewrite it with: {fix}") from None
    groups = {g: {k: tensors[f"{g}/{k}"] for k in keys} for g, keys in header.pop("groups").items()}
    return header, groups


def load_prepared(path) -> dict:
    """The prepared data written by `prepare_data`: {"name", "task", "num_classes", "meta", "train",
    "test", "label_noise", "noise_seed", "dataset_options", "provenance"}."""
    header, groups = load_tensors(path, "prepared data")
    return {**header, **groups}


def task_data(blob: dict):
    """The saved splits as a `TaskData` (model inputs + labels only, for model builders)."""
    from ..data import TaskData

    return TaskData(name=blob["name"], task=blob["task"], num_classes=blob["num_classes"], meta=blob["meta"],
                    train=model_inputs(blob["train"]), test=model_inputs(blob["test"]))


def model_inputs(split: dict) -> dict:
    """A split without the workflow's bookkeeping tensors (clean labels, flipped mask)."""
    return {k: v for k, v in split.items() if k not in SPLIT_EXTRAS}
