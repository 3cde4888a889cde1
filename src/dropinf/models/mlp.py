"""A small multilayer perceptron for flat-feature classification (e.g. `digits`).

Input: the split's "x" tensor, shape (B, features) (anything after dim 0 is flattened).
Every parameter is tracked (Linear weights and biases), so d is small enough for the full-space
methods (`orig`, `lissa`, `datainf`, `tracin`).
"""
from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DropinfError
from . import ModelSpec, register_model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, hidden=(32,), activation: str = "tanh"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise DropinfError(f"mlp: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        layers, width = [], n_in
        for h in hidden:
            layers += [nn.Linear(width, int(h)), _ACTIVATIONS[activation]()]
            width = int(h)
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


def _logits(model, batch):
    return model(batch["x"])


def _loss(model, batch):
    return F.cross_entropy(_logits(model, batch), batch["labels"], reduction="none")


@register_model("mlp")
def build_mlp(data, hidden=(32,), activation: str = "tanh", init_seed: int = 0) -> ModelSpec:
    """MLP sized from the data: inputs = prod(x.shape[1:]), outputs = num_classes.

    Weights are initialised from `init_seed`, so a (data, options) pair always builds the same network."""
    if data.task != "classification" or "x" not in data.train:
        raise DropinfError("mlp: needs a classification dataset with an 'x' feature tensor")
    n_in = prod(data.train["x"].shape[1:])
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(int(init_seed))
    try:
        module = MLP(n_in, int(data.num_classes), hidden=tuple(hidden), activation=activation)
    finally:
        torch.random.set_rng_state(gen_state)
    return ModelSpec(module=module, loss_fn=_loss, logits_fn=_logits)
