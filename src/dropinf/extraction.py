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

import statistics
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import stateless
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .compressors.base import Compressor, compressor as make_compressor
from .data.text import bucket_batch
from .errors import DropinfError, GradientCheckError, InvalidValueError, ShapeError, check_finite
from .layout import Layout, select_parameters
from .modules import handler_for
from .progress import bar
from . import selfcheck


class _GraphStart(torch.autograd.Function):
    """x itself (same storage), as a non-leaf that requires grad, tied to a scalar `anchor` leaf:
    the backward from the losses to the anchor runs through every layer above, firing their hooks.
    A leaf (x.detach().requires_grad_()) would refuse later in-place ops, and a clone of it costs
    one activation at the peak (6% of ResNet-9's); a detached alias returned from a Function is not
    a view, so in-place ops on it stay legal, exactly as on the module's own output."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return None, None  # nothing upstream wants it: the traversal itself is the point


_CAPTURE_STREAMS: dict = {}


def capture_stream(device) -> "torch.cuda.Stream":
    """The one side stream per device that every CUDA-graph warm-up runs on. cuBLAS keeps a
    workspace per stream for the life of the process, so a new stream per capture would leave one
    workspace (tens of MiB) allocated for each graph ever captured."""
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _CAPTURE_STREAMS[key]


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


GRAPH_MODES = ("auto", True, False)


def graph_mode(value) -> bool | str:
    """cuda_graph as "auto", True or False (the strings "true"/"false" too, as a command line gives them)."""
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.lower()]
    if value is True or value is False:
        return value
    raise InvalidValueError(f"cuda_graph must be 'auto', True or False, got {value!r}")


def _bucket_size(bucket) -> int:
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 0:
        raise InvalidValueError(f"bucket must be 0 (off) or a positive int (sequence lengths are padded to a "
                                f"multiple of it), got {bucket!r}")
    return int(bucket)


def _device_clock(device: torch.device) -> Callable[[], float]:
    """Seconds, after the device's queued work is done (a step's time includes its kernels)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock():
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def _shape_of(batch) -> str:
    """The batch's tensor shapes and dtypes, as a key and for the record ("input_ids 32x128 int64, ...")."""
    if isinstance(batch, dict):
        items = [(f"{k} ", v) for k, v in batch.items()]
    else:
        items = [("", v) for v in tree_leaves(batch)]
    return ", ".join(f"{k}{'x'.join(map(str, v.shape))} {str(v.dtype).removeprefix('torch.')}"
                     for k, v in items if isinstance(v, torch.Tensor))


@dataclass
class _ShapeTrial:
    """auto: the eager and graph-replay step times of one batch shape and compressor kind, and the choice."""

    shape: str
    compressor: str
    eager: list = field(default_factory=list)  # seconds of the timed eager steps
    graph: list = field(default_factory=list)  # seconds of the timed replays
    captures: list = field(default_factory=list)  # seconds of each capture (warm-up + capture)
    decision: str | None = None  # "graph" | "eager" (None: still timing)
    reason: str = ""
    batches: dict = field(default_factory=lambda: {"eager": 0, "graph": 0})

    def decide(self, decision: str, reason: str) -> None:
        self.decision, self.reason = decision, reason

    def summary(self) -> dict:
        timed = self.eager[GRAPH_WARMUP:]
        ms = lambda xs: round(1e3 * statistics.median(xs), 4) if xs else None  # noqa: E731
        return {"shape": self.shape, "compressor": self.compressor, "decision": self.decision or "undecided",
                "reason": self.reason, "eager_ms": ms(timed), "graph_ms": ms(self.graph),
                "capture_seconds": round(sum(self.captures), 4), "captures": len(self.captures),
                "batches_eager": self.batches["eager"], "batches_graph": self.batches["graph"]}


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    static: object  # the batch the graph reads (inputs are copied into it before each replay)
    out: torch.Tensor  # the rows the graph writes
    B: int
    comp: Compressor  # held, so that id(comp) in the key stays this compressor's
    replays: int = 0


#: auto: per batch shape, GRAPH_WARMUP untimed and GRAPH_TRIALS timed eager steps, then the capture
#: (timed apart), then GRAPH_TRIALS timed replays; the faster median stays for the rest of the job
GRAPH_WARMUP, GRAPH_TRIALS = 1, 3


class GraphReplayError(GradientCheckError):
    """A CUDA graph replay whose rows differ from the eager step's on the same batch."""


class Extractor:
    """Reusable extraction state for one (model, tracked params, compressor).

    fallback: module names (as in `named_modules()`), module classes or class names whose
    handler is not used: their parameters take the per-module torch.func fallback.
    self_check: True (first batch), False, or k (every k-th batch): see `extract`.
    cuda_graph: "auto" (default), True or False; bucket, bucket_mask: sequence-length bucketing;
    both: see `extract`. `use(compressor)` switches to another compressor (the next seed) and keeps
    the plan, the CUDA graphs and their decisions.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, compressor: str | Compressor, r: int | None = None,
                 seed: int = 0, params=None, device=None, cuda_graph: bool | str = "auto", self_check=True,
                 fallback=(), bucket: int = 0, bucket_mask: str = "attention_mask", **compressor_opts):
        self.model, self.loss_fn = model, loss_fn
        self.cuda_graph = graph_mode(cuda_graph)
        self.bucket, self.bucket_mask = _bucket_size(bucket), bucket_mask
        self._bucket_checked = False
        self._self_check = self_check
        self.check_every = _check_every(self_check)
        self._graphs: OrderedDict = OrderedDict()  # (batch shape, id(compressor)) -> _Graph
        self._trials: dict = {}  # (batch shape, compressor name, out_dim) -> _ShapeTrial
        self._graph_pool = None
        self._clock = _device_clock(torch.device(device) if device is not None else next(model.parameters()).device)
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
        self._read_cache: tuple | None = None  # (weakref to a compressor, plan, modules it reads): `_read_modules`
        self._batches = 0  # batches extracted so far, over every run
        self.timings: dict = {}  # seconds, and "cuda_graph": `graph_report()`

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

    def use(self, compressor: Compressor) -> "Extractor":
        """Extract with `compressor` (of the same tracked coordinates, e.g. the next seed) from now on,
        keeping the plan, the CUDA graphs captured so far and the per-shape graph decisions. Its first
        batch is self-checked as a new extractor's would be."""
        if compressor.dim != self.layout.dim:
            raise ShapeError(f"compressor dim {compressor.dim} != {self.layout.dim} tracked coordinates")
        self.compressor = compressor
        self.check_every = _check_every(self._self_check) if compressor.linear else -1
        self._batches = 0
        return self

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
            """First tracked layer: start the activation graph at its output, without a copy."""
            anchor = torch.empty((), device=t.device, requires_grad=True)
            leaves.append(anchor)
            return _GraphStart.apply(t, anchor)

        active = self._read_modules(comp)

        def fwd_hook(module, args, kwargs, output):
            k = calls[module] = calls.get(module, -1) + 1
            if module in active:
                output = hooked_hook(module, k, args, kwargs, output)
            if module in plan.sites:
                output = site_hook(module, k, args, kwargs, output)
            return output

        def hooked_hook(module, k, args, kwargs, output):
            handler, _, axes = plan.hooked[module]
            slots = active[module]
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

        for module in set(active) | set(plan.sites):
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
        elif active or plan.sites:
            if not plan.whole:
                raise DropinfError("the loss does not depend on any tracked parameter")
        for module, (args, kwargs), shapes, dtypes, deltas, in_axes, out_axes in site_calls:
            deltas = [d if d is not None else torch.zeros(s, dtype=dt, device=self.device)
                      for d, s, dt in zip(deltas, shapes, dtypes)]
            self._site_rows(module, args, kwargs, deltas, in_axes, out_axes, B, comp, state["out"])
        return state["out"], B

    def _read_modules(self, comp) -> dict:
        """The planned modules whose parameters `comp` reads, each with the slots it reads (cached for
        the last compressor): only these are hooked, so a module none of whose coordinates dropout
        keeps costs nothing, and the backward stops at the lowest one."""
        cached = self._read_cache  # (a weak reference: a compressor replaced by `use` is freed)
        if cached is None or cached[0]() is not comp or cached[1] is not self.plan:
            read = {}
            for module, (_, slots, _) in self.plan.hooked.items():
                kept = {role: slot for role, slot in slots.items() if comp.reads(slot)}
                if kept:
                    read[module] = kept
            cached = self._read_cache = (weakref.ref(comp), self.plan, read)
        return cached[2]

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
    #: graphs kept at once (they share one memory pool); a new compressor's capture first drops
    #: the graphs of compressors no longer in use (the seeds before)
    _MAX_GRAPHS = 8

    def _graph_capable(self) -> bool:
        return self.device.type == "cuda"

    #: auto: a graph keeps its batch's rows in its pool besides the copy each replay returns, so
    #: rows larger than this (raw gradients of a large model) stay eager
    _GRAPH_ROWS_BYTES = 256 << 20

    def _graph_obstacle(self, comp, batch) -> str | None:
        """Why this extraction cannot be replayed as a CUDA graph, or None."""
        if self.plan.sites or self.plan.whole:
            return "torch.func fallback parameters"
        rows = _batch_size(batch) * comp.out_dim * (8 if self.named[0][1].dtype == torch.float64 else 4)
        if self.cuda_graph == "auto" and rows > self._GRAPH_ROWS_BYTES:
            return f"a batch's rows ({rows / 2**20:.0f} MiB) would be held twice"
        safe = getattr(comp, "graph_safe", None)
        if safe is None:  # the package's compressors only write tensors; another must say so itself
            safe = self.cuda_graph is True or type(comp).__module__.startswith("dropinf.compressors.")
        if not safe:
            return f"{comp.name} is not marked graph_safe (it may run Python or draw random numbers per batch)"
        return None

    def _graph_key(self, batch, comp) -> tuple:
        return str(tree_map(lambda t: (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t, batch)), id(comp)

    def _make_room(self, comp) -> bool:
        """Room for one more graph: drop those of other compressors first (oldest first)."""
        for key in [k for k, g in self._graphs.items() if g.comp is not comp]:
            if len(self._graphs) < self._MAX_GRAPHS:
                break
            del self._graphs[key]
        return len(self._graphs) < self._MAX_GRAPHS

    def _capture(self, batch, out_dtype, comp) -> _Graph:
        static = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, batch)
        side = capture_stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: plans, kernel selection, allocator
            for _ in range(2):
                self._fused(static, out_dtype, comp)
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # one pool for all graphs: they never run at once, and each holds only its rows live
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out, B = self._fused(static, out_dtype, comp)
        return _Graph(graph, static, out, B, comp)

    def _replay(self, entry: _Graph, batch) -> torch.Tensor:
        tree_map(lambda d, s: d.copy_(s) if isinstance(d, torch.Tensor) else None, entry.static, batch)
        entry.graph.replay()
        return entry.out.clone()

    def _graphed(self, batch, out_dtype, comp=None, trial: _ShapeTrial | None = None) -> tuple[torch.Tensor, int]:
        """The batch's rows by replaying its shape's graph (captured on first use; the capture's
        seconds go to `trial`). The first replay of every graph is compared with the eager step."""
        comp = comp if comp is not None else self.compressor
        key = self._graph_key(batch, comp)
        entry = self._graphs.get(key)
        if entry is None:
            t = self._clock()
            entry = self._graphs[key] = self._capture(batch, out_dtype, comp)
            if trial is not None:
                trial.captures.append(self._clock() - t)
        self._graphs.move_to_end(key)
        out = self._replay(entry, batch)
        entry.replays += 1
        if entry.replays == 1:
            self._check_replay(key, out, batch, out_dtype, comp)
        return out, entry.B

    def _check_replay(self, key, out, batch, out_dtype, comp) -> None:
        """A graph replays what was captured: a model whose step depends on the batch through Python
        (a data-dependent branch, a shape read from values) would replay stale work. Checked once
        per graph against the eager step."""
        ref, _ = self._fused(batch, out_dtype, comp)
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(self.named[0][1].dtype, 3e-2)
        err = ((out - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny)).item()
        if not err <= tol:
            del self._graphs[key]
            raise GraphReplayError(f"cuda_graph: the CUDA graph replay of batch shape {_shape_of(batch)} differs "
                                   f"from the eager step (relative error {err:.2e} > {tol:g}); the model's step "
                                   f"depends on the batch in a way a graph cannot replay; use cuda_graph=False")

    def _trial(self, batch, comp) -> _ShapeTrial:
        shape = _shape_of(batch)
        key = (shape, comp.name, comp.out_dim)
        if key not in self._trials:
            self._trials[key] = _ShapeTrial(shape, f"{comp.name} out_dim={comp.out_dim}")
        return self._trials[key]

    def _eager(self, batch, out_dtype, trial: _ShapeTrial | None, timed: bool = False) -> torch.Tensor:
        t = self._clock() if timed else 0.0
        out, _ = self._step(batch, out_dtype)
        if timed:
            trial.eager.append(self._clock() - t)
        if trial is not None:
            trial.batches["eager"] += 1
        return out

    def _extract_batch(self, batch, out_dtype) -> torch.Tensor:
        """One unchecked batch: eagerly, or as a CUDA graph (`cuda_graph`: see `extract`)."""
        if self.cuda_graph is False or not self._graph_capable():
            return self._step(batch, out_dtype)[0]
        comp = self.compressor
        trial = self._trial(batch, comp)
        if trial.decision == "eager":
            return self._eager(batch, out_dtype, trial)
        why = self._graph_obstacle(comp, batch)
        if why is None and (self._graph_key(batch, comp) not in self._graphs and not self._make_room(comp)):
            why = f"more than {self._MAX_GRAPHS} batch shapes"
        if why is not None:
            if self.cuda_graph is True and not getattr(self, "_graph_warned", False):
                warnings.warn(f"dropinf.extract: cuda_graph disabled ({why}); running eagerly", stacklevel=4)
                self._graph_warned = True
            if trial.decision is None:
                trial.decide("eager", why)
            return self._eager(batch, out_dtype, trial)
        if self.cuda_graph is True:
            if trial.decision is None:
                trial.decide("graph", "cuda_graph=True")
            out, _ = self._graphed(batch, out_dtype, comp, trial)
            trial.batches["graph"] += 1
            return out
        # auto: a shape still being timed runs its eager steps first, then (captured) replays
        if trial.decision is None and len(trial.eager) < GRAPH_WARMUP + GRAPH_TRIALS:
            return self._eager(batch, out_dtype, trial, timed=True)
        key = self._graph_key(batch, comp)
        try:
            if key not in self._graphs:  # a new shape, or the next seed's compressor
                t = self._clock()
                self._graphs[key] = self._capture(batch, out_dtype, comp)
                trial.captures.append(self._clock() - t)
            t = self._clock()
            out, _ = self._graphed(batch, out_dtype, comp, trial)
            seconds = self._clock() - t
        except (GraphReplayError, torch.OutOfMemoryError, RuntimeError) as err:
            self._graphs.pop(key, None)
            if isinstance(err, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            warnings.warn(f"dropinf.extract: cuda_graph='auto' runs batch shape {trial.shape} eagerly: {err}",
                          stacklevel=3)
            trial.decide("eager", f"{type(err).__name__}: {err}"[:300])
            return self._eager(batch, out_dtype, trial)
        trial.batches["graph"] += 1
        if trial.decision is None:
            if self._graphs[key].replays > 1:  # the first replay's time includes its check against eager
                trial.graph.append(seconds)
            if len(trial.graph) >= GRAPH_TRIALS:
                eager_s, graph_s = statistics.median(trial.eager[GRAPH_WARMUP:]), statistics.median(trial.graph)
                faster = graph_s < eager_s
                trial.decide("graph" if faster else "eager", f"replay {1e3 * graph_s:.3f} ms {'<' if faster else '>='} "
                             f"eager {1e3 * eager_s:.3f} ms per batch")
                if not faster:
                    del self._graphs[key]  # its memory goes back
        return out

    def graph_report(self) -> dict:
        """What the CUDA-graph setting did over this extractor's lifetime: per batch shape and
        compressor kind, the decision, its reason, the median eager and replay step times (ms),
        the capture seconds, and how many batches ran each way."""
        shapes = [t.summary() for t in self._trials.values()]
        return {"mode": {True: "true", False: "false"}.get(self.cuda_graph, self.cuda_graph),
                "device_type": self.device.type, "bucket": self.bucket,
                "used": any(t["batches_graph"] for t in shapes), "shapes": shapes}

    # ---- sequence-length bucketing -----------------------------------------------------------
    def _bucketed(self, batch, start: int):
        """The batch cut or padded to a multiple of `bucket` tokens (`dropinf.data.text.bucket_batch`).
        The first batch whose width changes is checked: every example's loss must stay the same
        (the model ignores padded positions), else bucketing would change the gradients."""
        try:
            out = bucket_batch(batch, self.bucket, self.bucket_mask)
        except DropinfError as e:
            raise DropinfError(f"bucket={self.bucket}: {e}") from None
        if out is not batch and not self._bucket_checked:
            self._check_bucketed(batch, out, start)
        return out

    def _check_bucketed(self, batch, bucketed, start: int) -> None:
        with torch.no_grad():
            a = self.loss_fn(self.model, _to_device(batch, self.device))
            b = self.loss_fn(self.model, _to_device(bucketed, self.device))
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(self.named[0][1].dtype, 3e-2)
        scale = a.abs().clamp_min(1.0)
        bad = torch.nonzero(((a - b).abs() > tol * scale)).flatten()
        if len(bad):
            i = int(bad[0])
            raise DropinfError(f"bucket={self.bucket}: the loss of example {start + i} changes from "
                               f"{a[i].item():.6g} to {b[i].item():.6g} when its batch's sequence length goes from "
                               f"{batch[self.bucket_mask].shape[1]} to {bucketed[self.bucket_mask].shape[1]} "
                               f"(padded positions, mask {self.bucket_mask!r} = 0, are not ignored by the model "
                               f"or the loss); set bucket to 0")
        self._bucket_checked = True

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
                if self.bucket:
                    batch = self._bucketed(batch, start)
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
                    else:
                        out = self._extract_batch(batch, out_dtype)
                check_finite(out, "compressed per-example gradients", offset=start)
                if sink is not None:
                    sink(start, out)
                else:
                    rows.append(out.cpu() if self.device.type != "cpu" else out)
                start += B
                shown.update(B)
        self.timings["extract_seconds"] = _elapsed(t0, self.device)
        self.timings["cuda_graph"] = self.graph_report()
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
      cuda_graph="auto" (default): on a CUDA device, for each new batch shape (and compressor kind)
        time a few eager steps, capture the fused step as a CUDA graph, time a few replays, and keep
        the faster way for that shape for the rest of the job (shapes seen too rarely stay eager);
        on the CPU, or where a graph cannot replay the step (torch.func fallback parameters, a
        compressor not marked `graph_safe`), eager. True: always replay (checked batches run
        eagerly); False: never. Each graph's first replay is checked against the eager step. The
        decisions, step times and capture seconds: `Extractor.timings["cuda_graph"]`.
      bucket=0 (default, off) or a multiple m: cut or pad each batch's sequence length to the
        smallest multiple of m holding every real token (`dropinf.data.text.bucket_batch`: padded
        positions get mask 0 in `bucket_mask`, default "attention_mask"), so variable-length text
        has few batch shapes for CUDA graphs. Exact when the model ignores padded positions, as
        the first changed batch checks (every example's loss must stay the same).
      progress: a bar over the examples (`dropinf.progress`): True, False, or None (default: shown
        unless the environment variable DROPINF_PROGRESS is 0).
    """
    return Extractor(model, loss_fn, compressor, r, seed, params, device, **opts).run(loader, sink=sink,
                                                                                      progress=progress)
