"""Fused extraction of compressed per-example gradients.

One batched forward + backward per batch. Tracked parameters are switched to requires_grad=False,
so autograd never computes weight gradients (no weight-gradient GEMMs); gradients flow through
activations only. Forward hooks keep each supported layer's input; a tensor hook on its output
receives δ (the gradient of the summed per-example losses w.r.t. that output, which for example b
depends only on loss_b) and hands the factors to the compressor, which adds its compressed
contribution.

On the first batch a *plan* (`dropinf.selfcheck.make_plan`) records, for every tracked parameter,
inside which module calls it is consumed, and the batch axis of every module call's inputs and
outputs (from a 1-example forward of the same batch). A parameter is fused only when every use
is inside a module with a handler and those calls have a batch axis; every other parameter goes
to a fallback *site*: the innermost module call that contains all its uses and whose inputs and
outputs have a batch axis. There its inputs and output gradients are kept from the one batched
backward and torch.func computes per-example gradients of its parameters alone. A parameter with
no such site (used outside any module, or no batch axis anywhere) goes through the whole model
per example. The self-check (`dropinf.selfcheck`) then proves the fused rows against autograd.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import stateless
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .compressors.base import Compressor, compressor as make_compressor
from .errors import DropinfError, ShapeError, check_finite
from .layout import Layout, select_parameters
from .modules import handler_for
from .progress import bar
from . import selfcheck


def _batch_size(batch) -> int:
    leaves = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves:
        raise DropinfError("a batch must contain at least one tensor whose first dimension is the batch")
    return leaves[0].shape[0]


def _to_device(batch, device):
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _check_every(self_check) -> int:
    if self_check is True:
        return 0  # first batch only
    if self_check is False or self_check is None:
        return -1
    if isinstance(self_check, int) and self_check > 0:
        return int(self_check)
    raise DropinfError(f"self_check must be True, False or a positive int k (every k-th batch), got {self_check!r}")


class Extractor:
    """Reusable extraction state for one (model, tracked params, compressor).

    fallback: module names (as in `named_modules()`), module classes or class names whose
    handler is not used: their parameters take the per-module torch.func fallback.
    self_check: True (first batch), False, or k (every k-th batch): see `extract`.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, compressor: str | Compressor, r: int | None = None,
                 seed: int = 0, params=None, device=None, cuda_graph: bool = False, self_check=True,
                 fallback=(), **compressor_opts):
        self.model, self.loss_fn = model, loss_fn
        self.cuda_graph = cuda_graph
        self.check_every = _check_every(self_check)
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
        if not self.compressor.linear:
            self.check_every = -1  # nothing linear to compare with autograd (e.g. a probe's squared entries)
        self.forced = self._forced_modules(fallback)
        self.plan: selfcheck.Plan | None = None
        self._batches = 0  # batches extracted so far, over every run
        self.timings: dict[str, float] = {}

    def _forced_modules(self, fallback) -> set:
        names = dict(self.model.named_modules())
        forced = set()
        for f in ([fallback] if isinstance(fallback, (str, type)) else list(fallback)):
            if isinstance(f, type):
                forced |= {m for m in names.values() if isinstance(m, f)}
            elif isinstance(f, str) and f in names:
                forced.add(names[f])
            elif isinstance(f, str) and any(type(m).__name__ == f for m in names.values()):
                forced |= {m for m in names.values() if type(m).__name__ == f}
            else:
                raise DropinfError(f"fallback: {f!r} is neither a module name nor a module type of this model")
        return forced

    # ---- compatibility views of the plan ------------------------------------------------------
    @property
    def hooked(self) -> dict:
        return {} if self.plan is None else self.plan.hooked

    @property
    def fallback(self) -> list[str]:
        return [] if self.plan is None else self.plan.fallback_names

    def prepare(self, batch) -> "selfcheck.Plan":
        """Plan the batch's coverage (called by `run` on the first batch; public for inspection)."""
        batch = _to_device(batch, self.device)
        with _tracked_state(self):
            self.plan, _ = selfcheck.make_plan(self, batch, want_reference=False)
        return self.plan

    # ---- one batch ---------------------------------------------------------------------------
    def _fused(self, batch, out_dtype, comp=None) -> tuple[torch.Tensor, int]:
        comp = comp if comp is not None else self.compressor
        plan, leaves, handles = self.plan, [], []
        state = {"out": None}
        B = _batch_size(batch)
        calls: dict = {}
        site_calls: list = []

        def start_graph(t):
            """First tracked layer: start the activation graph at its output (a non-leaf clone, so
            later in-place ops stay legal)."""
            leaf = t.detach().requires_grad_()
            leaves.append(leaf)
            return leaf.clone()

        def fwd_hook(module, args, kwargs, output):
            k = calls[module] = calls.get(module, -1) + 1
            if module in plan.hooked:
                output = hooked_hook(module, k, args, kwargs, output)
            if module in plan.sites:
                output = site_hook(module, k, args, kwargs, output)
            return output

        def hooked_hook(module, k, args, kwargs, output):
            handler, slots, axes = plan.hooked[module]
            x_axis, y_axis = axes[min(k, len(axes) - 1)] if axes else (None, None)
            y = handler.output_tensor(module, output)
            if handler.needs_call:  # the handler reads the whole call and finds the batch itself
                saved = [handler.capture_call(module, args, kwargs, output)]
                to_batch = lambda d: d  # noqa: E731
            else:
                x = handler.input_of(module, args, kwargs)
                if not isinstance(y, torch.Tensor) or not isinstance(x, torch.Tensor):
                    raise DropinfError(f"{type(module).__name__} module: expected tensor input and output")
                saved = [handler.capture(module, selfcheck.batch_major(x, x_axis, B, module))]
                to_batch = lambda d: selfcheck.batch_major(d, y_axis, B, module)  # noqa: E731
            # (`saved` is a box, emptied once used so memory frees during backward)
            new = y
            if y_axis == selfcheck.EXPAND and B > 1:
                # Shared by the batch (planned: every loss unchanged by this): one copy per example,
                # so each example's gradient stays separate instead of being summed by broadcasting.
                new = new.expand(B, *new.shape[1:])
            if not new.requires_grad:
                new = start_graph(new)
            if new is not y:
                output = handler.replace_output(module, output, new)

            def on_grad(delta):
                handler.emit(module, saved.pop(), to_batch(delta), slots, comp, state["out"])

            new.register_hook(on_grad)
            return output

        def site_hook(module, k, args, kwargs, output):
            in_axes, out_axes = plan.site_axes(module, k)
            flat, spec = tree_flatten(output)
            idx = [i for i, t in enumerate(flat) if _floating(t)]
            for i in idx:
                if not flat[i].requires_grad:
                    flat[i] = start_graph(flat[i])
            deltas = [None] * len(idx)
            for j, i in enumerate(idx):
                def keep(d, j=j):
                    deltas[j] = d
                if flat[i].requires_grad:
                    flat[i].register_hook(keep)
            detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (args, kwargs))
            site_calls.append((module, detached, [flat[i].shape for i in idx], [flat[i].dtype for i in idx],
                               deltas, in_axes, out_axes))
            return tree_unflatten(flat, spec)

        for module in set(plan.hooked) | set(plan.sites):
            handles.append(module.register_forward_hook(fwd_hook, with_kwargs=True))
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
        elif plan.hooked or plan.sites:
            if not plan.whole:
                raise DropinfError("the loss does not depend on any tracked parameter")
        for module, (args, kwargs), shapes, dtypes, deltas, in_axes, out_axes in site_calls:
            deltas = [d if d is not None else torch.zeros(s, dtype=dt, device=self.device)
                      for d, s, dt in zip(deltas, shapes, dtypes)]
            self._site_rows(module, args, kwargs, deltas, in_axes, out_axes, B, comp, state["out"])
        return state["out"], B

    def _site_rows(self, module, args, kwargs, deltas, in_axes, out_axes, B, comp, out) -> None:
        """Per-example gradients of the site's fallback parameters from its inputs and δ (torch.func)."""
        names = self.plan.sites[module]
        local = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            local.setdefault(id(p), n)
        tracked = dict(self.named)
        pv = {local[id(tracked[n])]: tracked[n].detach() for n in names}
        grads = selfcheck.per_example_vjp(module, pv, args, kwargs, deltas, in_axes, out_axes, B)
        for n in names:
            g = grads[local[id(tracked[n])]]
            comp.add_vector(out, self.layout[n], g.reshape(B, 1, -1).to(out.dtype))

    def _functional(self, batch, out: torch.Tensor, comp=None) -> None:
        """Per-example gradients of the whole-model fallback parameters through torch.func, compressed."""
        comp = comp if comp is not None else self.compressor
        named = dict(self.named)
        params = {n: named[n].detach() for n in self.plan.whole}
        B = out.shape[0]

        def single_loss(p, example):
            example = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
            with stateless._reparametrize_module(self.model, p):
                return self.loss_fn(self.model, example)[0]

        in_dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == B else None,
                           batch)
        try:
            grads = torch.func.vmap(torch.func.grad(single_loss), in_dims=(None, in_dims))(params, batch)
        except Exception as err:  # ops without a batching rule (e.g. recurrent kernels): one example at a time
            grads = self._functional_loop(batch, B, err)
        for n, g in grads.items():
            comp.add_vector(out, self.layout[n], g.reshape(g.shape[0], 1, -1).to(out.dtype))

    def _functional_loop(self, batch, B, err) -> dict:
        named = dict(self.named)
        tracked = [named[n] for n in self.plan.whole]
        rows = {n: [] for n in self.plan.whole}
        for p in tracked:
            p.requires_grad_(True)
        try:
            for i in range(B):
                example = selfcheck.example(batch, i, B)
                try:
                    loss = self.loss_fn(self.model, example)[0]
                    gs = torch.autograd.grad(loss, tracked, allow_unused=True)
                except Exception as e:
                    raise DropinfError(f"per-example gradients of {self.plan.whole[:5]} failed both under torch.func "
                                       f"({type(err).__name__}: {err}) and one example at a time "
                                       f"({type(e).__name__}: {e}); exclude them with params=") from e
                for n, p, g in zip(self.plan.whole, tracked, gs):
                    rows[n].append(torch.zeros_like(p) if g is None else g)
        finally:
            for p in tracked:
                p.requires_grad_(False)
        return {n: torch.stack(v) for n, v in rows.items()}

    def _step(self, batch, out_dtype, comp=None):
        out, B = self._fused(batch, out_dtype, comp)
        if self.plan.whole:
            self._functional(batch, out, comp)
        return out, B

    # ---- CUDA graphs: replay the whole fused step, no per-layer Python in the loop --------------
    _MAX_GRAPHS = 4  # one per batch shape (full batches + the last partial one, typically)

    def _graph_ok(self) -> bool:
        if not (self.cuda_graph and self.device.type == "cuda"):
            return False
        why = None
        if self.plan.sites or self.plan.whole:
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

    def _checked_batch(self, index: int) -> bool:
        """`index` counts batches over this extractor's lifetime (several `run`s, as recompute makes):
        self_check=True checks the first one only."""
        if self.check_every < 0:
            return False
        return index == 0 if self.check_every == 0 else index % self.check_every == 0

    def run(self, loader: Iterable, sink: Callable[[int, torch.Tensor], None] | None = None, *,
            progress: bool | None = None, desc: str | None = None) -> torch.Tensor | None:
        """Compressed gradients of every example in `loader`, in order: (n, out_dim) float32
        (float64 for a float64 model). With `sink`, rows go to sink(start, rows) and None is returned.
        `progress`, `desc`: the bar over the examples (`dropinf.progress`)."""
        n_expected = len(loader.dataset) if hasattr(loader, "dataset") else None
        if hasattr(self.compressor, "check_budget") and n_expected is not None:
            self.compressor.check_budget(n_expected)
        out_dtype = torch.float64 if self.named[0][1].dtype == torch.float64 else torch.float32
        rows, start = [], 0
        t0 = time.perf_counter()
        self.timings["self_check_seconds"] = 0.0
        shown = bar(total=n_expected, desc=desc or f"extract {self.compressor.name}", unit="ex", progress=progress)
        with _tracked_state(self), shown:
            for batch in loader:
                index, self._batches = self._batches, self._batches + 1
                batch = _to_device(batch, self.device)
                B = _batch_size(batch)
                with torch.enable_grad():
                    ref = None
                    if self.plan is None or (B >= 2 and not self.plan.axes_known):
                        t = time.perf_counter()
                        self.plan, ref = selfcheck.make_plan(self, batch, want_reference=self._checked_batch(index))
                        self.timings["plan_seconds"] = _elapsed(t, self.device)
                    if self._checked_batch(index):
                        t = time.perf_counter()
                        out = selfcheck.checked_step(self, batch, out_dtype, start, ref)
                        self.timings["self_check_seconds"] += _elapsed(t, self.device)
                    elif self._graph_ok():
                        out, _ = self._graphed(batch, out_dtype)
                    else:
                        out, _ = self._step(batch, out_dtype)
                check_finite(out, "compressed per-example gradients", offset=start)
                if sink is not None:
                    sink(start, out)
                else:
                    rows.append(out.cpu() if self.device.type != "cpu" else out)
                start += B
                shown.update(B)
        self.timings["extract_seconds"] = _elapsed(t0, self.device)
        self.n = start
        if sink is not None:
            return None
        if not rows:
            raise DropinfError("extract: the loader yielded no batches")
        return torch.cat(rows)


def _elapsed(t0: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


class _tracked_state:
    """Eval mode and requires_grad=False on every parameter for the duration; both restored after."""

    def __init__(self, ex: Extractor):
        self.model = ex.model

    def __enter__(self):
        self.was_training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()  # no dropout; BatchNorm uses running statistics, so examples are independent
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)


def extract(model: nn.Module, loss_fn: Callable, loader: Iterable, compressor: str | Compressor, r: int | None = None,
            seed: int = 0, params=None, device=None, sink=None, progress: bool | None = None,
            **opts) -> torch.Tensor | None:
    """Compressed per-example gradients, shape (n, out_dim), one fused pass per batch.

    `loss_fn(model, batch)` returns per-example losses [B]; batch tensors are batch-first (as a
    DataLoader collates them; the model may transpose inside). With compressor="dropout" the kept
    coordinates are exactly `dropinf.compressor("dropout", dim=<tracked coordinates>, r, seed).indices`.

    Options:
      self_check=True (default): on the first batch, prove the fused rows against autograd on this
        model: the batch sum of the compressed rows must equal the compressed gradient of the summed
        loss (one ordinary backward), per parameter tensor, and two examples must equal their
        batch-size-1 autograd gradients at the compressed coordinates. A mismatch raises
        `dropinf.errors.GradientCheckError` naming the parameters. `self_check=k` checks every
        k-th batch; `self_check=False` skips it. The model's state (train/eval, requires_grad,
        .grad) is never changed.
      fallback=[module names, types or type names]: do not use the fused handler for these
        modules; their parameters take the per-module torch.func fallback.
      cuda_graph=True: replay the fused step as a CUDA graph (checked batches run eagerly).
      progress: a bar over the examples (`dropinf.progress`): True, False, or None (default: shown
        unless the environment variable DROPINF_PROGRESS is 0).
    """
    return Extractor(model, loss_fn, compressor, r, seed, params, device, **opts).run(loader, sink=sink,
                                                                                      progress=progress)
