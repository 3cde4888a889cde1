"""Coverage planning and the self-check of fused per-example gradients.

Planning (first batch): one forward with the tracked parameters requiring grad, under a
TorchFunctionMode that records, for every op consuming a tracked parameter, the stack of module
calls active at that moment; forward hooks on every module record the shapes of each call's
inputs and outputs. A second forward of the batch's first example alone gives the same shapes at
batch size 1: the axis whose size went from B to 1 is the batch axis of that tensor (an axis of
size B·s → s is a flattened, batch-major batch; an unchanged shape is shared by the batch, e.g. a
learned (1, D) query). Nothing is guessed from a size coinciding with B.

Self-check (first batch by default): the batch sum of the compressed rows must equal the
compressed gradient of the summed loss from one ordinary backward, per parameter tensor; and two
examples' rows must equal their batch-size-1 autograd gradients, compressed. A mismatch raises
`GradientCheckError`. In bfloat16/float16 the two examples' references are the gradients of their
own losses through the batch's forward instead (`batched_reference`): a forward of one example alone
rounds differently in every layer, and over a deep model that adds up to more than the tolerance
(Llama-3.2-1B, random weights, bf16: 5.9% on layer 0's value projection), while an example whose
loss depends on other examples still differs by O(1).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .compressors.base import add_layer_term, layer_terms
from .errors import DropinfError, GradientCheckError
from .modules import handler_for


# ---- batch axes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """Where the batch is in one tensor: dim `dim` ("batch"), dim `dim` holding batch·s entries,
    batch-major ("flat"), no batch dimension ("shared"), or a batch of one ("one")."""

    kind: str
    dim: int = 0


SHARED, ONE, EXPAND = Axis("shared"), Axis("one"), Axis("expand")
_BATCHED = ("batch", "flat", "one", "expand")


def axis_of(full, sub, B: int) -> Axis | None:
    """Batch axis from a tensor's shape in the batch and in its 1-example sub-batch (None: unknown)."""
    if full is None or sub is None or len(full) != len(sub):
        return None
    diff = [d for d, (a, b) in enumerate(zip(full, sub)) if a != b]
    if not diff:
        return SHARED
    if len(diff) == 1:
        d = diff[0]
        if sub[d] == 1 and full[d] == B:
            return Axis("batch", d)
        if sub[d] > 1 and full[d] == B * sub[d]:
            return Axis("flat", d)
    return None


def batch_major(t: torch.Tensor, axis: Axis | None, B: int, module=None) -> torch.Tensor:
    """t with its batch as dimension 0 (size B)."""
    if axis is not None and axis.kind == "expand" and t.dim() and t.shape[0] in (1, B):
        t = t.expand(B, *t.shape[1:])
    elif axis is not None and axis.kind == "batch" and t.dim() > axis.dim and t.shape[axis.dim] == B:
        t = t.movedim(axis.dim, 0) if axis.dim else t
    elif axis is not None and axis.kind == "flat" and t.dim() > axis.dim and t.shape[axis.dim] % B == 0:
        t = t.unflatten(axis.dim, (B, -1)).movedim(axis.dim, 0)
    elif B == 1:  # one example: everything is its own, whatever the layout
        t = t if t.dim() and t.shape[0] == 1 else t.unsqueeze(0)
    elif axis is None and t.dim() and t.shape[0] == B:
        pass  # a call the plan did not see (dynamic control flow): batch-first, checked below
    else:
        raise DropinfError(f"{type(module).__name__} module got a tensor of shape {tuple(t.shape)} whose batch "
                           f"axis for a batch of {B} is unknown or changed since the first batch "
                           f"(planned: {axis}); add the module to fallback= or exclude its parameters with params=")
    if t.shape[0] != B:
        raise DropinfError(f"{type(module).__name__} module: batch of {B} expected, got shape {tuple(t.shape)}")
    return t


def example(batch, i, B: int):
    """Example i of a batch-first batch, as a batch of one (a slice: those examples)."""
    pick = i if isinstance(i, slice) else slice(i, i + 1)
    return tree_map(lambda t: t[pick] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == B else t, batch)


def _split(t: torch.Tensor, axis: Axis, B: int):
    """(tensor, vmap in_dim, restore) so that restore(one example's slice) is that example's tensor
    with a batch of one, in the module's own layout."""
    if B == 1 or axis.kind == "one":
        return t.unsqueeze(0), 0, lambda s: s
    if axis.kind == "shared":
        return t, None, lambda s: s
    if axis.kind == "batch":
        return t, axis.dim, lambda s, d=axis.dim: s.unsqueeze(d)
    return t.unflatten(axis.dim, (B, -1)), axis.dim, lambda s: s  # flat


def per_example_vjp(module: nn.Module, pv: dict, args, kwargs, deltas, in_axes, out_axes, B: int) -> dict:
    """Per-example gradients {local name: (B, *shape)} of `module`'s parameters `pv`, from one call's
    inputs and the gradients `deltas` of its floating outputs: torch.func vjp of the module alone,
    vmapped over the batch (one example at a time where an op has no batching rule)."""
    flat, spec = tree_flatten((args, kwargs))
    pos = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor)]
    xs, xdims, xback = zip(*[_split(flat[i], in_axes[i], B) for i in pos]) if pos else ((), (), ())
    ds, ddims, dback = zip(*[_split(d, a, B) for d, a in zip(deltas, out_axes)]) if deltas else ((), (), ())

    def call(p, xs):
        leaves = list(flat)
        for i, x, back in zip(pos, xs, xback):
            leaves[i] = back(x)
        a, kw = tree_unflatten(leaves, spec)
        out = torch.func.functional_call(module, p, tuple(a), kw)
        return tuple(t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())

    def one(pv, xs, ds):
        _, vjp = torch.func.vjp(lambda p: call(p, xs), pv)
        return vjp(tuple(back(d) for d, back in zip(ds, dback)))[0]

    def one_autograd(xs, ds):  # plain autograd: kernels that need real storage (packed LSTM) work here
        p = {k: v.detach().requires_grad_() for k, v in pv.items()}
        with torch.enable_grad():
            pairs = [(o, back(d)) for o, d, back in zip(call(p, xs), ds, dback) if o.requires_grad]
            gs = torch.autograd.grad([o for o, _ in pairs], list(p.values()), [d for _, d in pairs],
                                     allow_unused=True) if pairs else [None] * len(p)
        return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(pv.items(), gs)}

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")  # slower ops stay correct
            return torch.func.vmap(one, in_dims=(None, list(xdims), list(ddims)))(pv, list(xs), list(ds))
    except Exception as err:  # no batching rule (recurrent kernels, data-dependent control flow)
        first = err
    rows = []
    for i in range(B):
        pick = lambda ts, dims: [t if d is None else t.select(d, i) for t, d in zip(ts, dims)]  # noqa: E731
        try:
            rows.append(one_autograd(pick(xs, xdims), pick(ds, ddims)))
        except Exception as err:
            raise DropinfError(f"per-module fallback for {type(module).__name__} failed under torch.func "
                               f"({type(first).__name__}: {first}) and one example at a time "
                               f"({type(err).__name__}: {err}); exclude its parameters with params=") from err
    return {k: torch.stack([r[k] for r in rows]) for k in pv}


# ---- recording one forward ------------------------------------------------------------------------
@dataclass
class Call:
    ins: list      # shape (tuple) per leaf of (args, kwargs); None for non-tensors
    outs: list     # shapes of the floating output leaves
    x: tuple | None  # the handler's input, where the module has a handler
    y: tuple | None  # the output, where it is one tensor


class _Uses(TorchFunctionMode):
    """Which module calls consume each tracked parameter (an op on it whose result requires grad)."""

    def __init__(self, ids: dict, stack: list, uses: dict):
        super().__init__()
        self.ids, self.stack, self.uses = ids, stack, uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        hit = [self.ids[id(t)] for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and id(t) in self.ids]
        if hit and any(isinstance(o, torch.Tensor) and o.requires_grad for o in tree_leaves(out)):
            for name in hit:
                self.uses[name].add(tuple(self.stack))
        return out


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def record(ex, batch, reference: bool, track_uses: bool):
    """Forward `batch` recording every module call; with `reference`, also autograd gradients of the
    summed loss. Returns (calls {module: [Call]}, uses {name: {stack}}, grads or None, losses shape)."""
    stack, calls, uses = [], defaultdict(list), defaultdict(set)
    ids = {id(p): n for n, p in ex.named}

    def pre(m, args, kwargs):
        stack.append(m)

    def post(m, args, kwargs, output):
        if stack and stack[-1] is m:
            stack.pop()
        h = handler_for(m)
        x = y = None
        if h is not None:
            try:
                y = _shape(h.output_tensor(m, output))
                x = y if h.needs_call else _shape(h.input_of(m, args, kwargs))  # whole-call handlers find the batch
            except (IndexError, KeyError, TypeError):
                x = None
        outs = [tuple(t.shape) for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        calls[m].append(Call([_shape(t) for t in tree_leaves((args, kwargs))], outs, x, y))

    handles = []
    for m in ex.model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    tracked = [p for _, p in ex.named]
    for p in tracked:
        p.requires_grad_(True)
    try:
        mode = _Uses(ids, stack, uses) if track_uses else contextlib.nullcontext()
        with torch.enable_grad(), mode:
            losses = ex.loss_fn(ex.model, batch)
        grads = None
        if reference:
            grads = [g if g is not None else torch.zeros_like(p)
                     for g, p in zip(torch.autograd.grad(losses.sum(), tracked, allow_unused=True), tracked)]
    finally:
        for h in handles:
            h.remove()
        for p in tracked:
            p.requires_grad_(False)
    return calls, uses, grads, losses.detach()


def _expansion_is_transparent(ex, batch, expandable: dict, losses: torch.Tensor) -> bool:
    """Forward again with the shared outputs of `expandable` {module: [call index]} expanded to the
    batch: True when every loss is unchanged (the consumers broadcast it), so each example's copy
    carries its own gradient; False when the forward fails or any loss changes (e.g. `.squeeze(0)`)."""
    B = losses.shape[0]
    count: dict = {}

    def hook(m, args, output):
        k = count[m] = count.get(m, -1) + 1
        return output.expand(B, *output.shape[1:]) if k in expandable[m] else output

    handles = [m.register_forward_hook(hook) for m in expandable]
    try:
        with torch.no_grad():
            again = ex.loss_fn(ex.model, batch)
        return tuple(again.shape) == tuple(losses.shape) and torch.allclose(again, losses, rtol=1e-5, atol=1e-6)
    except Exception:
        return False
    finally:
        for h in handles:
            h.remove()


# ---- the plan --------------------------------------------------------------------------------------
@dataclass
class Plan:
    hooked: dict = field(default_factory=dict)   # module -> (handler, {role: slot}, [(x_axis, y_axis)] per call)
    sites: dict = field(default_factory=dict)    # module -> [tracked names] (per-module fallback)
    axes: dict = field(default_factory=dict)     # site module -> [(in_axes, out_axes)] per call
    whole: list = field(default_factory=list)    # names through the whole model per example
    where: dict = field(default_factory=dict)    # name -> how it is computed (for messages)
    axes_known: bool = True                      # False when planned on a batch of one

    def site_axes(self, module, k: int):
        axes = self.axes[module]
        return axes[min(k, len(axes) - 1)]

    @property
    def fallback_names(self) -> list[str]:
        return [n for n in self.where if not self.where[n].startswith("fused")]


def _module_names(model) -> dict:
    names = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(m, n or "<model>")
    return names


def make_plan(ex, batch, want_reference: bool):
    """Plan coverage on this batch; with want_reference, also return the autograd reference
    (summed-loss gradient and example 0's gradient) for the self-check."""
    from .extraction import _batch_size

    B = _batch_size(batch)
    calls, uses, gsum, losses = record(ex, batch, reference=want_reference, track_uses=True)
    lshape = tuple(losses.shape)
    if lshape != (B,):
        from .errors import ShapeError
        raise ShapeError(f"loss_fn must return per-example losses of shape [B] = [{B}], got {lshape}")
    ref = Reference(gsum)
    if B >= 2:
        try:
            sub, _, g0, _ = record(ex, example(batch, 0, B), reference=want_reference, track_uses=False)
        except Exception as err:
            raise DropinfError(f"the model fails on one example of the batch alone ({type(err).__name__}: {err}); "
                               "per-example gradients need a forward that runs on a batch of one (batch tensors "
                               "are sliced along their first dimension)") from err
        if want_reference and not batched_reference(ex):
            ref.examples[0] = g0
    elif want_reference:
        ref.examples[0] = gsum
    plan = Plan(axes_known=B >= 2)

    def call_axes(m):
        """[(in_axes, out_axes, x_axis, y_axis)] per call, or None where the two forwards differ."""
        full = calls.get(m, [])
        if B < 2:
            return [([ONE if s is not None else None for s in c.ins], [ONE] * len(c.outs), ONE, ONE) for c in full]
        part = sub.get(m, [])
        if len(full) != len(part):
            return None
        res = []
        for c, s in zip(full, part):
            if len(c.ins) != len(s.ins) or len(c.outs) != len(s.outs):
                return None
            res.append(([axis_of(a, b, B) if a is not None else None for a, b in zip(c.ins, s.ins)],
                        [axis_of(a, b, B) for a, b in zip(c.outs, s.outs)],
                        axis_of(c.x, s.x, B), axis_of(c.y, s.y, B)))
        return res

    axes_cache = {}

    def axes(m):
        if m not in axes_cache:
            axes_cache[m] = call_axes(m)
        return axes_cache[m]

    def shared_rows(m):
        """Calls whose input and output are shared by the batch with a leading 1 (a (1, T) position
        table, a (1, D) query): fusable when expanding the output to the batch changes no loss."""
        a = axes(m) or []
        return [k for k, (_, _, x, y) in enumerate(a)
                if x == SHARED and y == SHARED and calls[m][k].y is not None and calls[m][k].y[:1] == (1,)]

    expandable = {m: shared_rows(m) for m in calls
                  if handler_for(m) is not None and not handler_for(m).needs_call and shared_rows(m)}
    # checked on the first two examples: a forward of two, not of the whole batch
    if expandable and not _expansion_is_transparent(ex, example(batch, slice(0, 2), B), expandable, losses[:2]):
        expandable = {}
    for m, ks in expandable.items():
        axes_cache[m] = [(i, o, EXPAND, EXPAND) if k in ks else (i, o, x, y)
                         for k, (i, o, x, y) in enumerate(axes_cache[m])]

    def fusable(m) -> bool:
        a = axes(m)
        return a is not None and all(x is not None and x.kind in _BATCHED and y is not None and y.kind in _BATCHED
                                     for _, _, x, y in a)

    def site_ok(m) -> bool:
        a = axes(m)
        if not a:
            return False
        for (ins, outs, _, _), c in zip(a, calls[m]):
            tens = [ax for ax, s in zip(ins, c.ins) if s is not None]
            if any(ax is None for ax in tens) or not any(ax.kind in _BATCHED for ax in tens):
                return False
            if not outs or any(ax is None or ax.kind not in _BATCHED for ax in outs):
                return False
        return True

    mnames = _module_names(ex.model)
    for m in calls:  # no per-example gradient exists through a module that mixes the batch's examples
        h = handler_for(m)
        coupled = None if h is None else h.couples_examples(m)
        if coupled:
            raise DropinfError(f"{type(m).__name__} module {mnames.get(m, '?')!r}: {coupled}; the examples of a batch "
                               "are not independent, so per-example gradients do not exist for this model")
    owners = defaultdict(list)    # id(param) -> [(module, role)] from the module tree
    claimants = defaultdict(dict)  # id(param) -> {module: (handler, role)} from the handlers' claims
    for m in ex.model.modules():
        for role, p in m._parameters.items():
            if p is not None:
                owners[id(p)].append((m, role))
        h = handler_for(m)
        if h is not None and m not in ex.forced and h.supports(m) is None:
            for role, p in h.claims(m).items():
                claimants[id(p)][m] = (h, role)
    reasons = []
    for name, p in ex.named:
        why = None
        for m, role in owners[id(p)]:
            h = handler_for(m)
            reason = None if h is None else h.supports(m)
            if m in ex.forced:
                why = f"{type(m).__name__} in fallback="
            elif m not in claimants[id(p)]:
                why = why or f"no handler for {type(m).__name__}" + (f" ({reason})" if reason else "")
        stacks = uses.get(name, set())
        claim = claimants[id(p)]
        # the claimants whose forward consumes it (a parent's claim on a sub-module's parameter that
        # its sub-module never reads itself, as nn.MultiheadAttention's out_proj)
        handled = {m: hr for m, hr in claim.items() if not stacks or any(st and st[-1] is m for st in stacks)}
        fused = False
        if handled:
            outer = next((st for st in stacks if not (st and st[-1] in handled)), None)
            if outer is not None:
                why = f"used outside its module, in {type(outer[-1]).__name__ + '.forward' if outer else 'loss_fn'}"
            elif not all(fusable(m) for m in handled if calls.get(m)):
                why = "its module's input has no batch axis (shared by the batch)"
            else:
                fused = True
        if fused:
            for m, (h, role) in handled.items():
                entry = plan.hooked.setdefault(m, (h, {}, [(x, y) for _, _, x, y in (axes(m) or [])]))
                entry[1][role] = ex.layout[name]
            plan.where[name] = "fused: " + ", ".join(sorted({type(m).__name__ for m in handled}))
            continue
        if not stacks:
            why = why or "no module call uses it"
            site = None
        else:
            common = list(min(stacks, key=len))
            for st in stacks:
                k = 0
                while k < min(len(common), len(st)) and common[k] is st[k]:
                    k += 1
                common = common[:k]
            owning = [m for m in reversed(common) if any(q is p for _, q in m.named_parameters(remove_duplicate=False))]
            site = next((m for m in owning if site_ok(m)), None)
            if owning and site is not owning[0]:
                why = (why or "") + (f"; {type(owning[0]).__name__}'s inputs or outputs have no batch axis "
                                     "(shared, or packed sequences)")
        if site is None:
            plan.whole.append(name)
            plan.where[name] = "whole model per example"
        else:
            plan.sites.setdefault(site, []).append(name)
            plan.axes[site] = [(ins, outs) for ins, outs, _, _ in axes(site)]
            plan.where[name] = f"fallback at {mnames.get(site, '?')} ({type(site).__name__})"
        reasons.append(f"{name} ({why}) -> {plan.where[name]}")
    if reasons and not getattr(ex, "_plan_warned", False):
        warnings.warn(f"dropinf.extract: no fused path for {len(reasons)} parameter(s): " + "; ".join(reasons[:8])
                      + ("; ..." if len(reasons) > 8 else ""), stacklevel=4)
        ex._plan_warned = True
    return plan, (ref if want_reference else None)


# ---- the check ----------------------------------------------------------------------------------------
@dataclass
class Reference:
    sum: list | None
    examples: dict = field(default_factory=dict)  # example index -> [grad per tracked param]


class SlotRecorder:
    """Wraps a compressor: every contribution also goes, per parameter tensor, into its batch sum,
    the sum of its rows' norms (the scale of rounding) and the rows of the checked examples, each on
    the columns the compressor says the tensor can reach (`slot_columns`); a write outside them is
    recorded as a failure of the check."""

    def __init__(self, comp, picks):
        self.comp, self.picks = comp, list(picks)
        self.sums, self.scale, self.rows = {}, {}, {}
        self.outside: set[str] = set()

    def __getattr__(self, key):
        return getattr(self.comp, key)

    def _record(self, out, slot, add, into_out: bool = True):
        tmp = torch.zeros_like(out)
        add(tmp)
        if into_out:
            out += tmp
        n, cols = slot.name, self.comp.slot_columns(slot)
        if any(part.numel() and bool(part.ne(0).any()) for part in (tmp[:, :cols.start], tmp[:, cols.stop:])):
            self.outside.add(n)
        mine = tmp[:, cols]
        self.sums[n] = self.sums.get(n, 0) + mine.sum(0)
        self.scale[n] = self.scale.get(n, 0) + mine.norm(dim=1).sum()
        self.rows[n] = self.rows.get(n, 0) + mine[self.picks]

    def add_outer(self, out, slot, rows, cols):
        self._record(out, slot, lambda t: self.comp.add_outer(t, slot, rows, cols))

    def add_vector(self, out, slot, values):
        self._record(out, slot, lambda t: self.comp.add_vector(t, slot, values))

    def add_layer(self, out, rows, cols, **terms):
        # the rows get the layer's own (fused) path, which the check of whole rows against the matrix
        # path then judges; each tensor's record comes from its own call, so a failure names it
        self.comp.add_layer(out, rows, cols, **terms)
        for term, slot in layer_terms(**terms):
            self._record(out, slot, lambda t: add_layer_term(self.comp, t, rows, cols, term, slot), into_out=False)


def tolerance(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(relative, absolute) error allowed between two computations equal in exact arithmetic, in
    this precision; the absolute part is relative to the whole gradient's scale, so parameters whose
    gradient vanishes (e.g. a bias before a softmax) are not judged on rounding noise."""
    if dtype == torch.float64:
        return 1e-8, 1e-10
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        # TF32 (10-bit mantissa; cuDNN's default for convolutions) picks other kernels at batch size 1
        # than for the batch, so the two sides round differently through every layer: a ResNet-9 conv
        # coordinate differed by 2.3% on an H200. The errors this check exists for are O(1).
        return (5e-2, 1e-2) if tf32 else (1e-3, 1e-4)
    return 5e-2, 1e-2


def batched_reference(ex) -> bool:
    """Whether the examples' references come from the batch's own forward (a tracked parameter in
    a precision coarser than float32) rather than from a forward of each example alone."""
    return any(torch.finfo(p.dtype).eps > torch.finfo(torch.float32).eps for _, p in ex.named)


def reference(ex, batch, picks, ref: Reference | None) -> Reference:
    """Fill in what is missing: the summed-loss gradient and the picked examples' gradients."""
    from .extraction import _batch_size

    B = _batch_size(batch)
    ref = ref or Reference(None)
    tracked = [p for _, p in ex.named]
    missing = [i for i in picks if i not in ref.examples]
    batched = batched_reference(ex)
    for p in tracked:
        p.requires_grad_(True)
    try:
        def grads(loss, keep=False):
            gs = torch.autograd.grad(loss, tracked, allow_unused=True, retain_graph=keep)
            return [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, tracked)]

        if ref.sum is None or (batched and missing):
            losses = ex.loss_fn(ex.model, batch)  # one forward; each backward below keeps it for the next
            todo = missing if batched else []
            if ref.sum is None:
                ref.sum = grads(losses.sum(), keep=bool(todo))
            for n, i in enumerate(todo):
                ref.examples[i] = grads(losses[i], keep=n < len(todo) - 1)
        for i in missing:
            if i not in ref.examples:
                ref.examples[i] = grads(ex.loss_fn(ex.model, example(batch, i, B))[0])
    finally:
        for p in tracked:
            p.requires_grad_(False)
    return ref


def checked_step(ex, batch, out_dtype, start: int, ref: Reference | None) -> torch.Tensor:
    """One eager fused step whose rows are proven against autograd; raises GradientCheckError."""
    from .extraction import _batch_size

    B = _batch_size(batch)
    picks = sorted({0, B - 1})
    rec = SlotRecorder(ex.compressor, picks)
    out, _ = ex._step(batch, out_dtype, rec)
    ref = reference(ex, batch, picks, ref)
    comp = ex.compressor
    coarsest = max((p.dtype for _, p in ex.named), key=lambda d: torch.finfo(d).eps)
    tol, atol = max(tolerance(coarsest, ex.device), tolerance(out_dtype, ex.device))
    tiny = torch.finfo(out_dtype).tiny
    whole = sum(float(v) for v in rec.scale.values())  # Σ over slots and examples of the rows' norms
    row_norm = {i: float(out[i].norm()) for i in picks}
    bad = []

    def judge(got, want, scale, floor):
        diff = float((got - want).norm())
        err = diff / max(scale, tiny)
        return err if err > tol and diff > atol * floor else None

    def compressed(g, slot):
        y = torch.zeros(1, comp.out_dim, dtype=out_dtype, device=ex.device)
        comp.add_vector(y, slot, g.detach().reshape(1, 1, -1).to(out_dtype))
        return y[0, comp.slot_columns(slot)]

    for k, (name, _) in enumerate(ex.named):
        slot = ex.layout[name]
        if name in rec.outside:
            bad.append((name, f"writes outside its columns {comp.slot_columns(slot)}", float("inf")))
            continue
        want = compressed(ref.sum[k], slot)
        zero = torch.zeros_like(want)
        got = rec.sums.get(name, zero)
        err = judge(got, want, float(rec.scale.get(name, 0.0)) + float(want.norm()), whole)
        if err is not None:
            bad.append((name, "sum over the batch", err))
            continue
        for j, i in enumerate(picks):
            want = compressed(ref.examples[i][k], slot)
            got = rec.rows[name][j] if name in rec.rows else zero
            err = judge(got, want, float(got.norm()) + float(want.norm()), row_norm[i])
            if err is not None:
                bad.append((name, f"example {start + i}", err))
                break
    if not bad:  # the whole rows through the compressor's matrix path
        G = torch.stack([torch.cat([g.detach().reshape(-1) for g in ref.examples[i]]) for i in picks]).to(out_dtype)
        want = comp.compress(G)
        for j, i in enumerate(picks):
            err = judge(out[i], want[j], row_norm[i] + float(want[j].norm()), row_norm[i])
            if err is not None:
                bad.append(("<all tracked parameters>", f"example {start + i}, compressor matrix path", err))
    if bad:
        plan = ex.plan
        lines = [f"  {n} [{plan.where.get(n, '?')}]: {what}: relative error {e:.3g} (tolerance {tol:.0e})"
                 for n, what, e in bad[:20]]
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        mods = sorted({plan.where.get(n, '?').split(": ", 1)[-1] for n, _, _ in bad})
        raise GradientCheckError(
            f"self-check failed on the batch starting at example {start}: the fused per-example gradients of "
            f"{len(bad)} parameter(s) disagree with autograd:\n" + "\n".join(lines) + more +
            f"\nModule types involved: {', '.join(mods)}. Exclude these parameters with params=, or route their "
            "modules to the per-module fallback with fallback=[module names or types]; self_check=False "
            "skips this check (not recommended).")
    return out
