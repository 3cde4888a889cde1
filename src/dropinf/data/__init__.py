"""Data sources: a registry of loaders that return `TaskData` (tensors, already tokenized).

A loader is `fn(**opts) -> TaskData`, registered with `@register_dataset("name")`. Each lives in
its own module under `dropinf.data`; every module of the package is imported below, which
registers it (a new dataset is one new file).
Label noise is not a loader's business: the `prepare_data` stage injects it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import DropinfError


@dataclass
class TaskData:
    """Tensors of one experiment's data; every tensor in a split has leading dim n.

    task "classification": split dicts hold the model inputs (e.g. "x", or "input_ids" and
    "attention_mask") and "labels"; `num_classes` is set.
    task "lm": split dicts hold "input_ids", "attention_mask" (loss over non-padded tokens).
    """

    name: str
    task: str
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    num_classes: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for split in ("train", "test"):
            d = getattr(self, split)
            sizes = {k: v.shape[0] for k, v in d.items()}
            if len(set(sizes.values())) > 1:
                raise DropinfError(f"dataset {self.name}: {split} tensors disagree on n: {sizes}")


DATASETS: dict[str, Callable[..., TaskData]] = {}


def register_dataset(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn
    return deco


def load_dataset(name: str, **opts) -> TaskData:
    try:
        fn = DATASETS[name]
    except KeyError:
        raise DropinfError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None
    return fn(**opts)


def _register_all() -> None:
    """Import every submodule (each registers its loaders): a new dataset is one new file."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
