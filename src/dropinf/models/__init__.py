"""Models: a registry of builders returning a `ModelSpec` (module + how to score a batch).

A builder is `fn(data: TaskData, **opts) -> ModelSpec`, registered with `@register_model("name")`,
each in its own module under `dropinf.models`; every module of the package is imported below,
which registers it (a new model is one new file).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DropinfError


@dataclass
class ModelSpec:
    """`loss_fn(model, batch)` returns per-example losses (shape [B]) - the function that both
    training (its mean) and gradient extraction (`dropinf.extract`) use; `logits_fn(model, batch)`
    returns predictions for accuracy (classification) or None for language models."""

    module: torch.nn.Module
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor]
    logits_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None
    params: list[str] | None = None  # parameters to track; None = dropinf's default selection


MODELS: dict[str, Callable[..., ModelSpec]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def build_model(name: str, data, **opts) -> ModelSpec:
    try:
        fn = MODELS[name]
    except KeyError:
        raise DropinfError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    return fn(data, **opts)


def _register_all() -> None:
    """Import every submodule (each registers its builders): a new model is one new file."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
