"""Second-moment probe: mean_i g_ij^2 per tracked coordinate j over a seeded sample of examples.

The squares are accumulated by a fused "compressor" with no output columns: the extraction engine
hands it one layer's per-example gradient factors at a time, it forms that layer's per-example
gradient a few rows at a time, squares and sums over the batch into a (dim,) buffer, and discards
it. No example's full gradient is ever held. A parameter that receives several contributions per
example (tied weights, a module called more than once) is summed over its contributions first and
squared when the batch ends; which parameters those are is found by a one-example counting pass.

Estimators (`estimator=`):

* "exact": the squares of the true per-example gradients. A layer with one position per example
  (nn.Linear on (B, n) inputs) is one GEMM of squares, (delta^2)^T (a^2); a layer with a sequence
  axis (or conv taps) forms its per-example gradient a few rows at a time.
* "diagonal": every rank-one term of a layer's gradient, and every contribution of a shared
  parameter, is squared on its own: sum_t (delta_t^2)^T (a_t^2), dropping the cross-position and
  cross-contribution products. One GEMM of squares per layer (an index_add for embeddings), no
  per-example gradient and no held sums: about one training step per probe batch. It equals "exact"
  on one-position layers and vector parameters (whose positions are summed before squaring).
"""
from __future__ import annotations

import time
import warnings
from collections import Counter

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .compressors.base import Compressor
from .errors import DropinfError, InvalidValueError
from .extraction import Extractor, _batch_size
from .factors import OneHot, acc, acc_dtype, position_sums
from .layout import Layout

__all__ = ["second_moments", "ProbeSizeError", "probe_rows", "ESTIMATORS"]

ESTIMATORS = ("exact", "diagonal")

#: memory for the per-example gradients of shared (tied) parameters held during one probe batch
HELD_BYTES = 1 << 30


def layout_dtype(extractor) -> torch.dtype:
    return extractor.named[0][1].dtype


class ProbeSizeError(DropinfError, ValueError):
    """A probe that asks for more examples than the training set has (or none)."""


class _CallCounter(Compressor):
    """Counts fused contributions per tracked parameter (no arithmetic, no output)."""

    linear = False

    def __init__(self, dim, layout):
        super().__init__(dim, 1, 0, layout)
        self.calls: Counter = Counter()

    @property
    def out_dim(self):
        return 0

    def add_outer(self, out, slot, rows, cols):
        self.calls[slot.name] += 1

    def add_vector(self, out, slot, values):
        self.calls[slot.name] += 1


class SquareAccumulator(Compressor):
    """sum over examples of each coordinate's squared per-example gradient, into `self.sumsq` (dim,).

    `shared`: names of parameters that get several contributions per example; their per-example
    gradient of the current batch is summed in `pending` and squared by `end_batch`.
    `diagonal`: the "diagonal" estimator (module docstring); `shared` is then ignored."""

    linear = False

    def __init__(self, dim, layout, shared=(), chunk_elems: int = 1 << 26, diagonal: bool = False):
        super().__init__(dim, 1, 0, layout)
        self.diagonal = bool(diagonal)
        self.shared = frozenset() if self.diagonal else frozenset(shared)
        self.chunk_elems = int(chunk_elems)
        self.sumsq: torch.Tensor | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()
        self.n = 0

    @property
    def out_dim(self):
        return 0

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        if self.sumsq is None:
            self.sumsq = torch.zeros(self.dim, dtype=acc(like).dtype, device=like.device)
        return self.sumsq

    def _add(self, slot, lo: int, g: torch.Tensor) -> None:
        """g (B, m): per-example gradient of coordinates [slot.offset + lo, + m) from one contribution."""
        if slot.name in self.shared:
            held = self.pending.get(slot.name)
            if held is None:
                held = self.pending[slot.name] = torch.zeros(g.shape[0], slot.numel, dtype=g.dtype, device=g.device)
            held[:, lo:lo + g.shape[1]] += g
            return
        if lo == 0:  # first chunk of this contribution
            self._once(slot)
        buf = self._buffer(g)
        buf[slot.offset + lo:slot.offset + lo + g.shape[1]] += g.square().sum(0).to(buf.dtype)

    def _once(self, slot) -> None:
        if self.diagonal:
            return  # contributions are squared one by one: any number per batch
        if slot.name in self.seen:
            raise DropinfError(
                f"second-moment probe: parameter {slot.name!r} received more than one gradient contribution "
                "for the same batch, although the one-example counting pass saw one; the model's calls "
                "differ between batches, which the probe does not support")
        self.seen.add(slot.name)

    def add_outer(self, out, slot, rows, cols):
        nrow, ncol = slot.matrix_shape
        if rows.length == 1 and slot.name not in self.shared:
            # one position: g[b]_ij^2 = R[b,i]^2 C[b,j]^2, summed over b in one GEMM
            self._once(slot)
            R, C = acc(rows.full())[:, 0], acc(cols.full())[:, 0]
            buf = self._buffer(R)
            buf[slot.offset:slot.stop] += (R.square().T @ C.square()).reshape(-1).to(buf.dtype)
            return
        if self.diagonal:
            self._add_outer_diagonal(slot, rows, cols)
            return
        step = max(1, self.chunk_elems // max(1, rows.batch * ncol))
        full_cols = cols.full()
        for r0 in range(0, nrow, step):
            r1 = min(nrow, r0 + step)
            ri = torch.arange(r0, r1, device=out.device)
            g = torch.einsum("bti,btj->bij", acc(rows.gather(ri)), full_cols).reshape(rows.batch, -1)
            self._add(slot, r0 * ncol, g)

    def _add_outer_diagonal(self, slot, rows, cols) -> None:
        """sum over (b, t) of R[b,t]^2 (outer) C[b,t]^2 into the slot's matrix view."""
        nrow, ncol = slot.matrix_shape
        C2 = cols.full().square().reshape(-1, ncol)  # (B*T, ncol)
        buf = self._buffer(C2)
        view = buf[slot.offset:slot.stop].view(nrow, ncol)
        if isinstance(rows, OneHot):  # one-hot rows square to themselves: add each position's C^2 to its row
            view.index_add_(0, rows.ids.reshape(-1), C2.to(buf.dtype))
            return
        step = max(1, self.chunk_elems // max(1, rows.batch * rows.length))
        for r0 in range(0, nrow, step):
            ri = torch.arange(r0, min(nrow, r0 + step), device=C2.device)
            R2 = acc(rows.gather(ri)).square().reshape(-1, ri.numel())
            view[r0:r0 + ri.numel()] += (R2.T @ C2).to(buf.dtype)

    def add_vector(self, out, slot, values):
        self._add(slot, 0, position_sums(values, acc_dtype(values.dtype)))

    def end_batch(self, start: int, out: torch.Tensor) -> None:
        """Extraction sink: the batch is complete; square the held sums of shared parameters."""
        for name, g in self.pending.items():
            slot = self.layout[name]
            buf = self._buffer(g)
            buf[slot.offset:slot.stop] += g.square().sum(0).to(buf.dtype)
        self.pending.clear()
        self.seen.clear()
        self.n += out.shape[0]


# ---- the probe's rows ----------------------------------------------------------------------------------

def _count_rows(loader) -> int:
    if hasattr(loader, "dataset"):
        return len(loader.dataset)
    return sum(_batch_size(b) for b in loader)


def _select(batch, keep: torch.Tensor):
    """Rows `keep` (positions inside the batch) of every per-example tensor of the batch."""
    B = _batch_size(batch)

    def pick(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B:
            return t.index_select(0, keep.to(t.device))
        return t
    return tree_map(pick, batch)


def _concat(parts: list):
    """One batch from batches of the same structure (per-example leaves concatenated)."""
    if len(parts) == 1:
        return parts[0]
    flat = [tree_flatten(p) for p in parts]
    spec = flat[0][1]
    sizes = [_batch_size(p) for p in parts]
    leaves = []
    for i, leaf in enumerate(flat[0][0]):
        column = [f[0][i] for f in flat]
        if all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b for t, b in zip(column, sizes)):
            leaves.append(torch.cat(column))
        else:
            leaves.append(leaf)
    return tree_unflatten(leaves, spec)


def _signature(batch):
    leaves, spec = tree_flatten(batch)
    return str(spec), [tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else None for t in leaves]


def probe_rows(n_total: int, n: int, seed: int) -> torch.Tensor:
    """The probe: n distinct row positions (sorted) drawn uniformly from range(n_total), seeded."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ProbeSizeError(f"probe must be a positive number of training examples, got {n!r}")
    if n > n_total:
        raise ProbeSizeError(f"probe of {n} examples is larger than the training set ({n_total} examples); "
                             f"use probe <= {n_total}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[:n].sort().values


class _ProbeLoader:
    """The probe's rows of `loader` (by position in its iteration order), re-batched into batches of
    at most `batch_rows` rows (consecutive rows of the same structure are concatenated)."""

    def __init__(self, loader, rows: torch.Tensor, batch_rows: int):
        self.loader, self.rows, self.batch_rows = loader, rows, max(1, int(batch_rows))
        self.dataset = range(rows.numel())

    def __iter__(self):
        start, parts, have, sig = 0, [], 0, None
        rows = self.rows
        for batch in self.loader:
            B = _batch_size(batch)
            lo, hi = torch.searchsorted(rows, torch.tensor([start, start + B])).tolist()
            start += B
            if hi == lo:
                continue
            keep = rows[lo:hi] - (start - B)
            for a in range(0, keep.numel(), self.batch_rows):  # no probe batch above batch_rows
                part = _select(batch, keep[a:a + self.batch_rows])
                size = min(keep.numel(), a + self.batch_rows) - a
                s = _signature(part)
                if parts and (s != sig or have + size > self.batch_rows):
                    yield _concat(parts)
                    parts, have = [], 0
                parts.append(part)
                sig = s
                have += size
        if parts:
            yield _concat(parts)


def second_moments(model, loss_fn, loader, n: int = 64, seed: int = 0, params=None, device=None,
                   return_info: bool = False, estimator: str = "diagonal", on_device: bool = False):
    """mean_i g_ij^2 over n training examples drawn (seeded) from `loader`: a (dim,) CPU tensor in the
    tracked coordinates of `dropinf.layout` (float64 for a float64 model, else float32).

    `loader` yields batches as for `dropinf.extract`; the probe's rows are positions in its iteration
    order. A probe larger than the loader's examples raises ProbeSizeError. `estimator`: "exact" or
    "diagonal" (module docstring). on_device: return the weights on the probe's device instead.
    With return_info, also a dict (n, seed, n_total, seconds, estimator)."""
    if estimator not in ESTIMATORS:
        raise InvalidValueError(f"second-moment probe: estimator must be one of {', '.join(ESTIMATORS)}, "
                                f"got {estimator!r}")
    diagonal = estimator == "diagonal"
    t0 = time.perf_counter()
    n_total = _count_rows(loader)
    rows = probe_rows(n_total, n, seed)
    first = next(iter(loader))
    batch_rows = _batch_size(first)
    layout = Layout.from_model(model, params)
    shared = set()
    if not diagonal:  # the diagonal estimator squares contributions one by one: nothing to find or hold
        counter = _CallCounter(layout.dim, layout)
        with warnings.catch_warnings():  # the fallback warning, if any, comes once, from the probe pass
            warnings.simplefilter("ignore")
            counter_ex = Extractor(model, loss_fn, counter, params=params, device=device)
            counter_ex.run([_select(first, torch.tensor([0]))], sink=lambda s, out: None)
        fallback = set(counter_ex.fallback)  # torch.func gradients come whole, once per parameter
        shared = {name for name, c in counter.calls.items() if c > 1 and name not in fallback}
        held = sum(layout[name].numel for name in shared) * (8 if layout_dtype(counter_ex) == torch.float64 else 4)
        if held:  # shared parameters hold a (rows, numel) gradient per batch: keep that within HELD_BYTES
            batch_rows = max(1, min(batch_rows, HELD_BYTES // held))
    acc_comp = SquareAccumulator(layout.dim, layout, shared, diagonal=diagonal)
    ex = Extractor(model, loss_fn, acc_comp, params=params, device=device)
    ex.run(_ProbeLoader(loader, rows, batch_rows), sink=acc_comp.end_batch)
    if acc_comp.n != n:
        raise DropinfError(f"second-moment probe: the loader yielded {acc_comp.n} of the {n} probe rows "
                           f"(it had {n_total} examples when counted); is it reproducible from one pass to the next?")
    sumsq = acc_comp.sumsq if acc_comp.sumsq is not None else torch.zeros(acc_comp.dim)
    weights = sumsq / n if on_device else (sumsq / n).cpu()
    if return_info:
        if weights.device.type == "cuda":
            torch.cuda.synchronize(weights.device)
        return weights, {"n": int(n), "seed": int(seed), "n_total": int(n_total), "estimator": estimator,
                         "seconds": time.perf_counter() - t0}
    return weights
