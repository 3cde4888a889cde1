"""Module handlers: how each supported layer type exposes its parameters' per-example gradients.

A handler's `capture` runs in the forward hook and keeps what the weight gradient needs (the
layer input, detached); `emit` runs when the output gradient δ arrives during backward and hands
the factors to the compressor. Registering a new layer type = one subclass with `types`.

The contract with the extraction engine, beyond capture/emit:
* `claims(module)`: the parameters the handler computes when hooked on `module`, keyed by the role
  names `emit` receives in `slots`. It may name a sub-module's parameters ("out_proj.weight" of
  nn.MultiheadAttention, whose own forward never runs); those sub-modules are then not hooked.
* `needs_call = True`: the handler reads the whole call. The forward hook is registered with
  `with_kwargs=True` and calls `capture_call(module, args, kwargs, output)`; the handler finds
  the batch axis itself (no args[0] shape rule applies). `output_tensor(module, output)` is the
  tensor whose gradient δ reaches `emit`; `replace_output(module, output, new)` puts a substitute
  for it (the engine's leaf, when the layer is the first tracked one) back into the output.
* `couples_examples(module)`: a reason the examples of a batch are not independent through this
  module (batch statistics, frequency-scaled gradients): no per-example gradient exists, refuse.
"""
from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import stateless

from .errors import DropinfError
from .factors import Dense, GroupRows, Normalized, OneHot, Unfold, acc_dtype, product_sums

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

    needs_call: ClassVar[bool] = False

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

    @classmethod
    def couples_examples(cls, module: nn.Module) -> str | None:
        """Why examples of a batch interact through this module (then no per-example gradient
        exists and extraction must refuse), or None."""
        return None

    @classmethod
    def claims(cls, module: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters this handler computes when hooked on `module`, by role."""
        return {r: p for r, p in module._parameters.items() if p is not None and r in cls.roles}

    @classmethod
    def capture(cls, module, x: torch.Tensor):
        if cls.needs_call:  # an engine that passes only the first input must not get a silent wrong answer
            raise DropinfError(f"{type(module).__name__}: {cls.__name__} needs the whole call (capture_call), "
                               "not only its first input")
        return x.detach()

    @classmethod
    def capture_call(cls, module, args, kwargs, output):
        """What `emit` needs, from the whole call (used when `needs_call`)."""
        return cls.capture(module, args[0] if args else next(iter(kwargs.values())))

    @staticmethod
    def output_tensor(module, output) -> torch.Tensor:
        return output

    @staticmethod
    def replace_output(module, output, new: torch.Tensor):
        return new

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        raise NotImplementedError


class LinearHandler(Handler):
    types = (nn.Linear,)

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        comp.add_layer(out, Dense(delta), Dense(x), outer=slots.get("weight"), row_sums=slots.get("bias"))


class Conv1DHandler(Handler):
    """Hugging Face GPT-2's Conv1D: y = x @ W + b with W of shape (in, out)."""

    @classmethod
    def matches(cls, module):
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf")

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        comp.add_layer(out, Dense(x), Dense(delta), outer=slots.get("weight"), col_sums=slots.get("bias"))


class EmbeddingHandler(Handler):
    types = (nn.Embedding,)
    roles = ("weight",)

    @classmethod
    def supports(cls, module):
        if module.max_norm is not None:
            return "max_norm renormalizes the table in the forward pass"
        return cls.couples_examples(module)

    @classmethod
    def couples_examples(cls, module):
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales by token counts over the whole batch"
        return None

    @classmethod
    def matches(cls, module):
        return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward

    @staticmethod
    def emit(module, ids, delta, slots, comp, out):
        if module.padding_idx is not None:  # the padding row never receives gradient
            delta = delta * (ids != module.padding_idx).unsqueeze(-1).to(delta.dtype)
        comp.add_outer(out, slots["weight"], OneHot(ids, module.num_embeddings, delta.dtype),
                       Dense(delta.reshape(delta.shape[0], -1, delta.shape[-1])))


class ComputedIndexEmbeddingHandler(EmbeddingHandler):
    """An nn.Embedding subclass whose forward computes what it looks up: OPT's learned positions
    (called with the attention mask, indices = cumulative mask + offset), scaled word embeddings
    (rows times a factor, per position or not). The forward is run once more on a probe table whose
    row n is (n + 1, 1, 1, ...): column 1 of the result is the factor c and column 0 / c - 1 the
    index actually read. The real output must equal c · weight[index] (exactly in float64, to a
    few ulps otherwise), else the module is refused by name; the gradient rows are c · δ."""

    needs_call = True

    @classmethod
    def matches(cls, module):
        return isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward

    @classmethod
    def capture_call(cls, module, args, kwargs, output):
        name, w = type(module).__name__, module.weight.detach()
        N, D = w.shape
        probe = torch.ones(N, D, dtype=torch.float64, device=w.device)
        probe[:, 0] = torch.arange(1, N + 1, dtype=torch.float64, device=w.device)
        with torch.no_grad(), stateless._reparametrize_module(module, {"weight": probe}):
            looked = module.forward(*args, **kwargs)  # forward, not __call__: no hooks run again
        ok = torch.is_tensor(looked) and torch.is_tensor(output) and looked.shape == output.shape
        if ok:
            c = looked[..., 1] if D > 1 else torch.ones_like(looked[..., 0])
            ids = torch.where(c != 0, looked[..., 0] / torch.where(c != 0, c, 1) - 1, 0).round().long()
            ok = ids.dim() >= 1 and (ids.numel() == 0 or (ids.min() >= 0 and ids.max() < N))
        if ok:
            want = c.to(w.dtype).unsqueeze(-1) * F.embedding(ids, w)
            tol = 0.0 if w.dtype == torch.float64 else 4 * torch.finfo(w.dtype).eps
            ok = torch.allclose(want, output.detach(), rtol=tol, atol=0.0)
        if not ok:
            raise DropinfError(f"{name}: its forward does more than look up (and scale) rows of its table, so its "
                               "per-example gradient cannot be formed from indices; exclude its weight with params=")
        if ids.dim() < 2:
            raise DropinfError(f"{name}: looked up indices of shape {tuple(ids.shape)}: need a batch dimension")
        return ids, c.to(w.dtype)

    @classmethod
    def emit(cls, module, saved, delta, slots, comp, out):
        ids, c = saved
        super().emit(module, ids, delta * c.unsqueeze(-1), slots, comp, out)


class MultiheadAttentionHandler(Handler):
    """nn.MultiheadAttention: packed or separate q/k/v projections, in_proj bias and out_proj.

    F.multi_head_attention_forward reads out_proj's weight directly (out_proj's forward never
    runs), so this handler owns out_proj's parameters too. Forward: keep query/key/value and the
    masks. Backward, given δ of the attention output: the context c (before out_proj) and its
    gradients w.r.t. the projected q/k/v come from re-running torch's own attention on the
    projected inputs with identity projections (exact: same masks, same softmax), so
    out_proj = δ ⊗ c and each projection = (its gradient) ⊗ (its input), per example."""

    needs_call = True
    roles = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
             "out_proj.weight", "out_proj.bias")
    types = (nn.MultiheadAttention,)

    @classmethod
    def supports(cls, module):
        if module.bias_k is not None:
            return "add_bias_kv=True"
        return None

    @classmethod
    def claims(cls, module):
        own = super().claims(module)
        own.update({f"out_proj.{r}": p for r, p in module.out_proj._parameters.items() if p is not None})
        return own

    @staticmethod
    def output_tensor(module, output):
        return output[0]

    @staticmethod
    def replace_output(module, output, new):
        return (new, output[1])

    @classmethod
    def capture_call(cls, module, args, kwargs, output):
        call = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        q, k, v = a["query"], a["key"], a["value"]
        if q.dim() != 3:
            raise DropinfError(f"{type(module).__name__} got an unbatched query of shape {tuple(q.shape)}: fused "
                               "extraction needs a batch dimension")
        weights = output[1]
        if weights is not None and weights.requires_grad:
            def refuse(_):
                raise DropinfError(f"{type(module).__name__}: its attention weights (need_weights=True) feed the "
                                   "loss; only the attention output's gradient is handled. Exclude the module's "
                                   "parameters with params=, or do not use the returned weights")
            weights.register_hook(refuse)
        bm = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))  # batch-major views
        return {"query": bm(q.detach()), "key": bm(k.detach()), "value": bm(v.detach()),
                "self": q is k and k is v, "key_padding_mask": a["key_padding_mask"], "attn_mask": a["attn_mask"],
                "is_causal": a["is_causal"]}

    @staticmethod
    def _projections(module):
        E = module.embed_dim
        if module._qkv_same_embed_dim:
            ws = module.in_proj_weight.chunk(3)
        else:
            ws = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        bs = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
        return [(w.detach(), None if b is None else b.detach()) for w, b in zip(ws, bs)], E

    @classmethod
    def emit(cls, module, saved, delta, slots, comp, out):
        x = [saved["query"], saved["key"], saved["value"]]      # batch-major (B, L|S, dim)
        proj, E = cls._projections(module)
        d = delta if module.batch_first else delta.transpose(0, 1)  # (B, L, E)
        with torch.enable_grad():
            qkv = [F.linear(t, w, b).transpose(0, 1).detach().requires_grad_() for t, (w, b) in zip(x, proj)]
            eye = torch.eye(E, dtype=d.dtype, device=d.device)
            ctx, _ = F.multi_head_attention_forward(
                *qkv, E, module.num_heads, None, None, None, None, module.add_zero_attn, 0.0, eye, None,
                training=False, key_padding_mask=saved["key_padding_mask"], need_weights=False,
                attn_mask=saved["attn_mask"], use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
                v_proj_weight=eye, is_causal=saved["is_causal"])
            d_ctx = (d @ module.out_proj.weight.detach()).transpose(0, 1)
            grads = torch.autograd.grad(ctx, qkv, d_ctx, allow_unused=True)
        ctx = ctx.detach().transpose(0, 1)                      # (B, L, E)
        gq, gk, gv = [torch.zeros_like(t) if g is None else g.transpose(0, 1) for g, t in zip(grads, qkv)]
        comp.add_layer(out, Dense(d), Dense(ctx), outer=slots.get("out_proj.weight"), row_sums=slots.get("out_proj.bias"))
        if "in_proj_weight" in slots:
            if saved["self"]:  # one input: stack the three gradients along the rows
                rows, cols = torch.cat([gq, gk, gv], -1), x[0]
            else:  # three inputs: one position block each, zero rows outside the block's projection
                rows = torch.cat([F.pad(g, (i * E, (2 - i) * E)) for i, g in enumerate((gq, gk, gv))], 1)
                cols = torch.cat(x, 1)
            comp.add_outer(out, slots["in_proj_weight"], Dense(rows), Dense(cols))
        for role, g, t in (("q_proj_weight", gq, x[0]), ("k_proj_weight", gk, x[1]), ("v_proj_weight", gv, x[2])):
            if role in slots:
                comp.add_outer(out, slots[role], Dense(g), Dense(t))
        if "in_proj_bias" in slots:
            comp.add_vector(out, slots["in_proj_bias"], torch.cat([g.sum(1) for g in (gq, gk, gv)], -1)[:, None])


def _conv_geometry(conv) -> tuple[tuple, tuple, tuple, tuple]:
    """(kernel, stride, dilation, padding (top, bottom, left, right)) of a Conv1d/Conv2d in 2-d terms;
    a 1-d convolution is a 2-d one over height 1. padding="same" puts an odd remainder at the end,
    as torch does."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "valid" or conv.padding_mode != "zeros":  # other modes: the input was padded in capture
        pads = [(0, 0)] * len(k)
    elif conv.padding == "same":
        pads = [(di * (ki - 1) // 2, di * (ki - 1) - di * (ki - 1) // 2) for ki, di in zip(k, d)]
    else:
        pads = [(p, p) for p in conv.padding]
    if len(k) == 1:
        return (1, k[0]), (1, s[0]), (1, d[0]), (0, 0, *pads[0])
    return tuple(k), tuple(s), tuple(d), (*pads[0], *pads[1])


class ConvHandler(Handler):
    """nn.Conv1d and nn.Conv2d: any stride, dilation, padding and padding_mode; grouped and
    depthwise included."""

    types = (nn.Conv1d, nn.Conv2d)

    @staticmethod
    def capture(module, x):
        x = x.detach()
        if x.dim() != module.weight.dim():
            raise DropinfError(f"{type(module).__name__} got an input of shape {tuple(x.shape)}: fused extraction "
                               "needs a batch dimension")
        if module.padding_mode != "zeros":  # reflect/replicate/circular: pad as the module's forward does
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x

    @staticmethod
    def emit(module, x, delta, slots, comp, out):
        d = delta.flatten(2).transpose(1, 2)  # (B, L, out_channels)
        cols = Unfold(x, *_conv_geometry(module), groups=module.groups)
        if module.groups == 1:
            comp.add_layer(out, Dense(d), cols, outer=slots.get("weight"), row_sums=slots.get("bias"))
            return
        if "weight" in slots:
            comp.add_outer(out, slots["weight"], GroupRows(d, module.groups), cols)
        if "bias" in slots:
            comp.add_vector(out, slots["bias"], d)


def _keep_input(x: torch.Tensor):
    """A normalization layer's input, kept for its backward hook together with its version. Autograd
    saves this same tensor for the layer's input gradient, so holding it costs no memory, while a
    normalized copy x̂ kept from the forward would cost one activation per layer (5% of GPT-2's peak,
    a third of ResNet-9's): x̂ is recomputed in the backward hook instead."""
    x = x.detach()
    return x, x._version


def _kept_input(module, saved) -> torch.Tensor:
    x, version = saved
    if x._version != version:
        raise DropinfError(f"{type(module).__name__}: its input was modified in place after the forward used it, "
                           "so its parameters' per-example gradients cannot be formed; avoid the in-place "
                           "operation (x = x + y, not x += y) or exclude the module's parameters with params=")
    return x


def _by_channel(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ..., *normalized_shape) → (B, positions, channels): the last n dims are the channels, in
    the weight's flattening."""
    return t.reshape(t.shape[0], -1, math.prod(t.shape[t.dim() - n:]))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without an op when it already is (a no-op `to` still costs a dispatch per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


class LayerNormHandler(Handler):
    types = (nn.LayerNorm,)

    @staticmethod
    def capture(module, x):
        return _keep_input(x)

    @staticmethod
    def emit(module, saved, delta, slots, comp, out):
        n = len(module.normalized_shape)
        x = _by_channel(_kept_input(module, saved), n)

        def stats():
            # F.layer_norm's statistics: per row, in float32 for reduced-precision inputs (a
            # transient float copy there; float32/64 inputs are read once, no copy)
            var, mean = torch.var_mean(_cast(x, acc_dtype(x.dtype)), -1, correction=0, keepdim=True)
            return mean, torch.rsqrt(var + module.eps)

        # x̂ on the kept channels only (a whole x̂ and δ·x̂ per layer are a large share of the fused
        # backward in a model with many norms); rounded to x's dtype, as F.layer_norm does
        comp.add_layer(out, Dense(_by_channel(delta, n)), Normalized(x, stats, round_to=x.dtype),
                       diagonal=slots.get("weight"), row_sums=slots.get("bias"))


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
        return _keep_input(x)

    @staticmethod
    def _hf(module) -> bool:
        return hasattr(module, "variance_epsilon")

    @classmethod
    def _channel_dims(cls, module) -> int:
        """How many trailing dims are normalized together (HF: the last one)."""
        return 1 if cls._hf(module) else len(module.normalized_shape)

    @classmethod
    def _inv_rms(cls, module, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """(1/rms per row (B, positions, 1), the dtype x is normalized in) for x (B, positions,
        channels), as the module computes it: HF in float32; F.rms_norm in float32 for reduced
        precision, else in x's dtype, with eps=None meaning the machine epsilon of the dtype it
        computes in (float32's for bfloat16 inputs, as F.rms_norm does). One pass over x: no float
        copy, no x²."""
        if cls._hf(module):
            h, eps = torch.float32, module.variance_epsilon
        else:
            h = acc_dtype(x.dtype)
            eps = torch.finfo(h).eps if module.eps is None else module.eps
        if x.dtype.itemsize > h.itemsize:
            # HF on float64 inputs narrows them to float32 (a copy either way): its own arithmetic, so
            # that the rows are as exact as a float64 check asks (a norm's sqrt-then-square differs by
            # float32 rounding)
            ms = x.to(h).pow(2).mean(-1, keepdim=True)
        else:
            ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=h).square_().div_(x.shape[-1])
        return torch.rsqrt(ms + eps), h

    @classmethod
    def emit(cls, module, saved, delta, slots, comp, out):
        if "weight" not in slots:
            return
        n = cls._channel_dims(module)
        x = _by_channel(_kept_input(module, saved), n)
        xhat = Normalized(x, lambda: (None, cls._inv_rms(module, x)[0]), round_to=x.dtype)
        comp.add_layer(out, Dense(_by_channel(delta, n)), xhat, diagonal=slots["weight"])


class BatchNormHandler(Handler):
    """Eval-mode BatchNorm (running statistics): examples are independent, x̂ is per example."""

    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    @classmethod
    def supports(cls, module):
        return cls.couples_examples(module)

    @classmethod
    def couples_examples(cls, module):
        if module.running_mean is None:
            return "no running statistics (track_running_stats=False): batch statistics couple examples"
        return None

    @staticmethod
    def capture(module, x):
        return _keep_input(x)

    @staticmethod
    def emit(module, saved, delta, slots, comp, out):
        x = _kept_input(module, saved)

        # (B, positions, channels) views, so that a compressor reads only the channels it keeps
        by_channel = (lambda t: t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2))
        def stats():  # x̂ in the dtype that x - running_mean promotes to, as the layer computes it
            dtype = torch.promote_types(x.dtype, module.running_mean.dtype)
            return module.running_mean.to(dtype), torch.rsqrt(module.running_var + module.eps).to(dtype)

        comp.add_layer(out, Dense(by_channel(delta)), Normalized(by_channel(x), stats),
                       diagonal=slots.get("weight"), row_sums=slots.get("bias"))


def handler_for(module: nn.Module) -> type[Handler] | None:
    for h in HANDLERS:
        if h.matches(module):
            return h
    return None
