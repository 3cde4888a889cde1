"""Fused extraction of compressed per-example gradients.

One batched forward + backward per batch. Tracked parameters are switched to requires_grad=False,
so autograd never computes weight gradients (no weight-gradient GEMMs); gradients flow through
activations only. Forward hooks keep each supported layer's input; a tensor hook on its output
receives δ (the gradient of the summed per-example losses w.r.t. that output, which for example b
depends only on loss_b) and hands the factors to the compressor, which adds its compressed
contribution. Parameters of unsupported module types fall back to torch.func per-example
gradients, with one warning naming the module types.
"""
from __future__ import annotations

import time
import warnings
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import stateless
from torch.utils._pytree import tree_map

from .compressors.base import Compressor, compressor as make_compressor
from .errors import DropinfError, ShapeError, check_finite
from .layout import Layout, select_parameters
from .modules import handler_for


def _batch_size(batch) -> int | None:
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves:
        raise DropinfError("a batch must contain at least one tensor whose first dimension is the batch")
    return leaves[0].shape[0]


def _to_device(batch, device):
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


class Extractor:
    """Reusable extraction state for one (model, tracked params, compressor)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, compressor: str | Compressor, r: int | None = None,
                 seed: int = 0, params=None, device=None, cuda_graph: bool = False, **compressor_opts):
        self.model, self.loss_fn = model, loss_fn
        self.cuda_graph = cuda_graph
        self._graphs: dict = {}
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.named = select_parameters(model, params)
        self.layout = Layout.from_shapes((n, p.shape) for n, p in self.named)
        if isinstance(compressor, Compressor):
            if compressor.dim != self.layout.dim:
                raise ShapeError(f"compressor dim {compressor.dim} != {self.layout.dim} tracked coordinates")
            self.compressor = compressor
        else:
            if r is None and compressor == "identity":
                r = self.layout.dim
            if r is None:
                raise DropinfError("extract: r is required")
            self.compressor = make_compressor(compressor, dim=self.layout.dim, r=r, seed=seed,
                                              layout=self.layout, **compressor_opts)
        self._plan_modules()
        self.timings: dict[str, float] = {}

    # ---- which module computes which tracked parameter --------------------------------------
    def _plan_modules(self):
        slot_of = {id(p): self.layout[n] for n, p in self.named}
        usages = defaultdict(list)  # param id -> [(module, role)]
        for module in self.model.modules():
            for role, p in module._parameters.items():
                if p is not None and id(p) in slot_of:
                    usages[id(p)].append((module, role))
        self.hooked: dict[nn.Module, tuple[type, dict]] = {}
        fallback, reasons = [], set()
        for name, p in self.named:
            ok = True
            for module, role in usages[id(p)]:
                h = handler_for(module)
                why = None if h is None else h.supports(module)
                if h is None or role not in h.roles or why:
                    ok = False
                    reasons.add(type(module).__name__ + (f" ({why})" if why else ""))
            if not usages[id(p)]:
                ok = False
                reasons.add("<no owning module>")
            if ok:
                for module, role in usages[id(p)]:
                    self.hooked.setdefault(module, (handler_for(module), {}))[1][role] = slot_of[id(p)]
            else:
                fallback.append(name)
        self.fallback = fallback
        if fallback:
            warnings.warn(f"dropinf.extract: no fused path for {sorted(reasons)}; {len(fallback)} parameter(s) "
                          f"({', '.join(fallback[:5])}{'...' if len(fallback) > 5 else ''}) use torch.func "
                          "per-example gradients (slower)", stacklevel=3)

    # ---- one batch ---------------------------------------------------------------------------
    def _fused(self, batch, out_dtype) -> tuple[torch.Tensor, int]:
        comp, leaves, handles = self.compressor, [], []
        state = {"out": None}
        B = _batch_size(batch)

        def fwd_hook(module, args, output):
            handler, slots = self.hooked[module]
            x = args[0]
            if x.shape[0] != B:
                if x.shape[0] != 1:
                    raise DropinfError(f"{type(module).__name__} module got input of shape {tuple(x.shape)} for a "
                                       f"batch of {B}: fused extraction needs batch-major inputs")
                # Shared across the batch (e.g. position embeddings, shape (1, T)): expand so that
                # each example's gradient stays separate instead of being summed by broadcasting.
                x, output = x.expand(B, *x.shape[1:]), output.expand(B, *output.shape[1:])
            saved = [handler.capture(module, x)]  # a box, emptied once used so memory frees during backward
            if not output.requires_grad:  # first tracked layer: start the activation graph here
                leaf = output.detach().requires_grad_()
                leaves.append(leaf)
                output = leaf.clone()  # a non-leaf, so later in-place ops stay legal

            def on_grad(delta):
                handler.emit(module, saved.pop(), delta, slots, comp, state["out"])

            output.register_hook(on_grad)
            return output

        for module in self.hooked:
            handles.append(module.register_forward_hook(fwd_hook))
        try:
            losses = self.loss_fn(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        if losses.dim() != 1 or losses.shape[0] != B:
            raise ShapeError(f"loss_fn must return per-example losses of shape [B] = [{B}], got {tuple(losses.shape)}")
        state["out"] = torch.zeros(B, comp.out_dim, dtype=out_dtype, device=self.device)
        if leaves:
            torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        elif self.hooked:
            raise DropinfError("the loss does not depend on any tracked parameter")
        return state["out"], B

    def _functional(self, batch, out: torch.Tensor) -> None:
        """Per-example gradients of the fallback parameters through torch.func, compressed."""
        named = dict(self.named)
        params = {n: named[n].detach() for n in self.fallback}

        def single_loss(p, example):
            example = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
            with stateless._reparametrize_module(self.model, p):
                return self.loss_fn(self.model, example)[0]

        in_dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, batch)
        grads = torch.func.vmap(torch.func.grad(single_loss), in_dims=(None, in_dims))(params, batch)
        for n, g in grads.items():
            slot = self.layout[n]
            self.compressor.add_vector(out, slot, g.reshape(g.shape[0], 1, -1).to(out.dtype))

    # ---- CUDA graphs: replay the whole fused step, no per-layer Python in the loop --------------
    _MAX_GRAPHS = 4  # one per batch shape (full batches + the last partial one, typically)

    def _graph_ok(self) -> bool:
        if not (self.cuda_graph and self.device.type == "cuda"):
            return False
        why = None
        if self.fallback:
            why = "torch.func fallback parameters"
        elif not getattr(self.compressor, "graph_safe", True):
            why = f"{self.compressor.name} draws random numbers per batch"
        elif len(self._graphs) >= self._MAX_GRAPHS:
            why = f"more than {self._MAX_GRAPHS} batch shapes"
        if why:
            if not getattr(self, "_graph_warned", False):
                warnings.warn(f"dropinf.extract: cuda_graph disabled ({why}); running eagerly", stacklevel=4)
                self._graph_warned = True
            return False
        return True

    def _graphed(self, batch, out_dtype) -> tuple[torch.Tensor, int]:
        key = str(tree_map(lambda t: (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t, batch))
        entry = self._graphs.get(key)
        if entry is None:
            static = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, batch)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: plans, kernel selection, allocator
                for _ in range(2):
                    self._fused(static, out_dtype)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out, B = self._fused(static, out_dtype)
            entry = self._graphs[key] = (graph, static, out, B)
        graph, static, out, B = entry
        torch.utils._pytree.tree_map(lambda d, s: d.copy_(s) if isinstance(d, torch.Tensor) else None, static, batch)
        graph.replay()
        return out.clone(), B

    def run(self, loader: Iterable, sink: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """Compressed gradients of every example in `loader`, in order: (n, out_dim) float32
        (float64 for a float64 model). With `sink`, rows go to sink(start, rows) and None is returned."""
        model = self.model
        n_expected = len(loader.dataset) if hasattr(loader, "dataset") else None
        if hasattr(self.compressor, "check_budget") and n_expected is not None:
            self.compressor.check_budget(n_expected)
        was_training = model.training
        saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        out_dtype = torch.float64 if self.named[0][1].dtype == torch.float64 else torch.float32
        rows, start = [], 0
        t0 = time.perf_counter()
        model.eval()  # no dropout; BatchNorm uses running statistics, so examples are independent
        try:
            for p, _ in saved_flags:
                p.requires_grad_(False)
            for batch in loader:
                batch = _to_device(batch, self.device)
                with torch.enable_grad():
                    if self._graph_ok():
                        out, B = self._graphed(batch, out_dtype)
                    else:
                        out, B = self._fused(batch, out_dtype)
                    if self.fallback:
                        self._functional(batch, out)
                check_finite(out, "compressed per-example gradients", offset=start)
                if sink is not None:
                    sink(start, out)
                else:
                    rows.append(out.cpu() if self.device.type != "cpu" else out)
                start += B
        finally:
            for p, flag in saved_flags:
                p.requires_grad_(flag)
            model.train(was_training)
        self.timings["extract_seconds"] = time.perf_counter() - t0
        self.n = start
        if sink is not None:
            return None
        if not rows:
            raise DropinfError("extract: the loader yielded no batches")
        return torch.cat(rows)


def extract(model: nn.Module, loss_fn: Callable, loader: Iterable, compressor: str | Compressor, r: int | None = None,
            seed: int = 0, params=None, device=None, sink=None, **opts) -> torch.Tensor | None:
    """Compressed per-example gradients, shape (n, out_dim), one fused pass per batch.

    `loss_fn(model, batch)` returns per-example losses [B]. With compressor="dropout" the kept
    coordinates are exactly `dropinf.compressor("dropout", dim=<tracked coordinates>, r, seed).indices`.
    """
    return Extractor(model, loss_fn, compressor, r, seed, params, device, **opts).run(loader, sink=sink)
