"""Module handlers: how each supported layer type exposes its parameters' per-example gradients.

A handler's `capture` runs in the forward hook and keeps what the weight gradient needs (the
layer input, detached); `emit` runs when the output gradient δ arrives during backward and hands
the factors to the compressor. Registering a new layer type = one subclass with `types`.
"""
from __future__ import annotations

import inspect
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .factors import Dense, OneHot, Unfold

HANDLERS: list[type["Handler"]] = []


class Handler:
    types: ClassVar[tuple] = ()
    roles: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        HANDLERS.append(cls)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.types) if cls.types else False

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        """None if every tracked role can be handled, else the reason it cannot."""
        return None

    @staticmethod
    def input_of(module, args, kwargs):
        """The tensor the parameter gradients are built from: the forward's first argument,
        passed by position or by keyword (`fc(input=x)`)."""
        if args:
            return args[0]
        first = next(iter(inspect.signature(module.forward).parameters))
        return kwargs[first]

    @staticmethod
    def capture(module, x: torch.Tensor):
        return x.detach()

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        raise NotImplementedError


def _vec(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., D) → (B, T, D) for vector-parameter contributions (a view where possible; the
    dtype is kept: compressors select their coordinates first, then reduce in float32)."""
    return t if t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])


class LinearHandler(Handler):
    types = (nn.Linear,)

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        if "weight" in slots:
            comp.add_outer(out, slots["weight"], Dense(delta), Dense(x))
        if "bias" in slots:
            comp.add_vector(out, slots["bias"], _vec(delta))


class Conv1DHandler(Handler):
    """Hugging Face GPT-2's Conv1D: y = x @ W + b with W of shape (in, out)."""

    @classmethod
    def matches(cls, module):
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf")

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        if "weight" in slots:
            comp.add_outer(out, slots["weight"], Dense(x), Dense(delta))
        if "bias" in slots:
            comp.add_vector(out, slots["bias"], _vec(delta))


class EmbeddingHandler(Handler):
    types = (nn.Embedding,)
    roles = ("weight",)

    @classmethod
    def supports(cls, module):
        if module.max_norm is not None:
            return "max_norm renormalizes the table in the forward pass"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples examples in a batch"
        return None

    @staticmethod
    def emit(module, ids, delta, slots, comp, out):
        if module.padding_idx is not None:  # the padding row never receives gradient
            delta = delta * (ids != module.padding_idx).unsqueeze(-1).to(delta.dtype)
        comp.add_outer(out, slots["weight"], OneHot(ids, module.num_embeddings, delta.dtype),
                       Dense(delta.reshape(delta.shape[0], -1, delta.shape[-1])))


class Conv2dHandler(Handler):
    types = (nn.Conv2d,)

    @classmethod
    def supports(cls, module):
        if module.groups != 1:
            return f"groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        return None

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        d = delta.flatten(2).transpose(1, 2)  # (B, L, out_channels)
        if "weight" in slots:
            comp.add_outer(out, slots["weight"], Dense(d), Unfold(x, module))
        if "bias" in slots:
            comp.add_vector(out, slots["bias"], d)


class LayerNormHandler(Handler):
    types = (nn.LayerNorm,)

    @staticmethod
    def capture(module, x):
        return F.layer_norm(x.detach(), module.normalized_shape, eps=module.eps)  # x̂

    @staticmethod
    def emit(module, xhat, delta, slots, comp, out):
        n = len(module.normalized_shape)
        flat = lambda t: t.reshape(t.shape[0], -1, *t.shape[t.dim() - n:]).flatten(2)  # noqa: E731
        if "weight" in slots:
            comp.add_vector(out, slots["weight"], flat(delta) * flat(xhat))
        if "bias" in slots:
            comp.add_vector(out, slots["bias"], flat(delta))


class RMSNormHandler(Handler):
    """torch.nn.RMSNorm and Hugging Face *RMSNorm (Llama-style: normalize in float32, cast back)."""

    roles = ("weight",)

    @classmethod
    def matches(cls, module):
        rms = getattr(nn, "RMSNorm", None)
        if rms is not None and isinstance(module, rms):
            return True
        return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")

    @staticmethod
    def capture(module, x):
        x = x.detach()
        if hasattr(module, "variance_epsilon"):
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)

    @staticmethod
    def emit(module, xhat, delta, slots, comp, out):
        shape = module.weight.shape
        n = len(shape)
        flat = lambda t: t.reshape(t.shape[0], -1, *t.shape[t.dim() - n:]).flatten(2)  # noqa: E731
        comp.add_vector(out, slots["weight"], flat(delta) * flat(xhat))


class BatchNormHandler(Handler):
    """Eval-mode BatchNorm (running statistics): examples are independent, x̂ is per example."""

    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    @classmethod
    def supports(cls, module):
        if module.running_mean is None:
            return "no running statistics (track_running_stats=False): batch statistics couple examples"
        return None

    @staticmethod
    def capture(module, x):
        x = x.detach()
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)

    @staticmethod
    def emit(module, xhat, delta, slots, comp, out):
        chan_last = lambda t: t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)  # noqa: E731
        if "weight" in slots:
            comp.add_vector(out, slots["weight"], chan_last(delta * xhat))
        if "bias" in slots:
            comp.add_vector(out, slots["bias"], chan_last(delta))


def handler_for(module: nn.Module) -> type[Handler] | None:
    for h in HANDLERS:
        if h.matches(module):
            return h
    return None
