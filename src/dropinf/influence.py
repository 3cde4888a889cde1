"""Influence scores from per-example gradients, streamed over the training set in row chunks.

    I(z_k) = -v^T (H + lambda I)^{-1} g_k,   v = mean test gradient,   H = G^T G / n (empirical Fisher)

Positive = up-weighting z_k raises the test loss (harmful); negative = helpful. Curvature is
block-diagonal: one block per layer (or per index group), each with its own damping.

Which columns form a block (`blocks=`): a curvature setting, 'layer' (default: the parameters of
one module, weight and bias together), 'tensor' (one block per parameter tensor) or 'global' (one
block), resolved against what the columns are: `layout=` (a `Layout` for raw gradients, or the
`Compressor` that made the columns: its `column_blocks`), else the attributes of a stored array
(the extract stage's zarr arrays), else nothing is known and the columns are one block. Or
explicit blocks: (start, stop) ranges, 1-D index tensors, or a dict label -> index tensor.

`train` (n, k) may be larger than memory (a zarr array on disk): every pass reads it in row chunks
and nothing of size n*k is ever held. `test` (m, k) is loaded whole. A solver computes
X = (H + lambda I)^{-1} V in one or more passes, then one more pass gives scores = -G X.

Solvers register themselves by subclassing `Solver` with `names = (...)`; `SOLVERS` maps each
name to its class. Adding a method = one new subclass.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import DropinfError, NotPositiveDefiniteError, ShapeError, check_finite
from .progress import bar

__all__ = ["influence", "self_influence", "pairwise_blocks", "damping_for", "resolve_blocks", "SOLVERS",
           "Solver", "DampingRangeError"]


class DampingRangeError(DropinfError, ValueError):
    """A damping that the solve's dtype cannot represent (overflows to inf or rounds to 0)."""

CHUNK_BYTES = 256 << 20  # default row-chunk size
PANEL_CHUNKS = 4         # Woodbury holds a panel of this many chunks against which all later rows stream
PAIRWISE_BYTES = 64 << 20  # default size of one block of a pairwise matrix
PAPER_FACTOR = 0.1       # paper appendix D.1 (same as DataInf): lambda_b = 0.1 * mean ||g_b||^2 / d_b
_FLOATS = ("float16", "bfloat16", "float32", "float64")

SOLVERS: dict[str, type["Solver"]] = {}

#: What the entries of a pairwise matrix and of a self-influence vector mean (stored with them).
PAIRWISE_CONVENTION = (
    "P[j, k] = -g_test_j^T (H + lambda I)^{-1} g_k; rows j = test examples, columns k = training examples; "
    "positive = up-weighting training example k raises the loss of test example j (harmful); "
    "the mean over j is the influence score I(z_k)"
)
SELF_INFLUENCE_CONVENTION = (
    "S[k] = g_k^T (H + lambda I)^{-1} g_k >= 0 (minus the influence of z_k on its own loss); "
    "high = the model fits z_k only by leaning on z_k itself: mislabeled or atypical examples score high"
)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def _dtype_name(x) -> str:
    dt = x.dtype
    if isinstance(dt, torch.dtype):
        return str(dt).removeprefix("torch.")
    return np.dtype(dt).name


def _matrix(x, what: str):
    """Array-like with .shape and row slicing; validated as a 2-D float matrix."""
    if not (hasattr(x, "shape") and hasattr(x, "__getitem__") and hasattr(x, "dtype")):
        x = np.asarray(x)
    shape = tuple(int(s) for s in x.shape)
    if len(shape) != 2:
        raise ShapeError(f"{what} must be 2-D (examples x gradient coordinates), got shape {shape}")
    name = _dtype_name(x)
    if name not in _FLOATS:
        raise ShapeError(f"{what} has dtype {name}; expected a float dtype ({', '.join(_FLOATS)})")
    return x, shape, name


def _to_torch(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes bfloat16 (zarr): reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return torch.as_tensor(a)


@dataclass
class _Blocks:
    """Blocks as contiguous ranges after permuting columns by `perm` (None: already contiguous)."""

    perm: torch.Tensor | None
    bounds: list[tuple[int, int]]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.bounds)

    @property
    def widths(self) -> list[int]:
        return [hi - lo for lo, hi in self.bounds]

    def ids(self, device) -> torch.Tensor:
        """(k,) block number of every (permuted) column, for broadcasting per-block values."""
        w = torch.tensor(self.widths, device=device)
        return torch.repeat_interleave(torch.arange(len(self), device=device), w)


def resolve_blocks(train, blocks="layer", layout=None):
    """Explicit blocks for `blocks` (a curvature setting or explicit blocks; see the module doc):
    None (one block), a list of ranges/index tensors, or a dict label -> column indices."""
    if not isinstance(blocks, str):
        return blocks
    from .layout import Layout, check_curvature

    check_curvature(blocks, "blocks")
    k = int(train.shape[1])
    if blocks == "global":
        return None
    if layout is not None:
        if hasattr(layout, "column_blocks"):  # a Compressor: the blocks of its output columns
            if int(layout.out_dim) != k:
                raise ShapeError(f"layout= is a {layout.name} compressor with {layout.out_dim} output columns, "
                                 f"but train has {k}")
            return layout.column_blocks(blocks)
        if not isinstance(layout, Layout):
            raise DropinfError(f"layout= must be a dropinf Layout or Compressor, got {type(layout).__name__}")
        if layout.dim != k:
            raise ShapeError(f"layout= covers {layout.dim} coordinates, but train has {k} columns")
        return layout.coordinate_blocks(blocks)
    attrs = getattr(train, "attrs", None)
    if attrs is not None and "layout" in attrs and "compressor_attrs" in attrs:
        from .compressors.base import column_blocks_from_attrs

        return column_blocks_from_attrs(dict(attrs), blocks)
    # columns with no recorded layout: nothing says which parameter a column belongs to
    warnings.warn(f"influence: blocks={blocks!r} asked for, but train carries no layout (a plain tensor): "
                  "solving with ONE block over all columns; pass layout= (the Compressor that made the columns, "
                  "or a dropinf.layout.Layout) for per-layer curvature, or blocks='global' to say so", stacklevel=3)
    return None


def _parse_blocks(blocks, k: int) -> _Blocks:
    if blocks is None:
        return _Blocks(None, [(0, k)], [f"block 0 (all columns 0:{k})"])
    names = None
    if isinstance(blocks, dict):
        names, blocks = list(blocks), list(blocks.values())
    if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
        raise DropinfError(f"blocks must be a list of (start, stop) pairs or 1-D index tensors, got {blocks!r}")
    blocks = list(blocks)
    if not blocks:
        raise DropinfError("blocks is empty; pass None for one global block")
    owner = torch.full((k,), -1, dtype=torch.long)
    groups, labels = [], []
    for b, blk in enumerate(blocks):
        if isinstance(blk, (torch.Tensor, np.ndarray)):
            idx = torch.as_tensor(blk)
            if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
                raise DropinfError(f"block {b} must be a 1-D integer index tensor, got {idx.dtype} of shape "
                                   f"{tuple(idx.shape)}")
            idx = idx.long().cpu()
            label = (f"block {b} (index group of {idx.numel()} columns)" if names is None
                     else f"block {b} ({names[b]}, {idx.numel()} columns)")
            if idx.numel() == 0:
                raise DropinfError(f"{label} is empty")
            bad = (idx < 0) | (idx >= k)
            if bad.any():
                raise DropinfError(f"{label} has column {int(idx[bad][0])} outside [0, {k})")
            if torch.unique(idx).numel() != idx.numel():
                raise DropinfError(f"{label} lists a column more than once")
        else:
            try:
                start, stop = blk
                start, stop = operator.index(start), operator.index(stop)
            except (TypeError, ValueError):
                raise DropinfError(f"block {b} must be a (start, stop) pair of ints or a 1-D index tensor, "
                                   f"got {blk!r}") from None
            label = f"block {b} (columns {start}:{stop})"
            if not 0 <= start < stop <= k:
                raise DropinfError(f"{label} is not a non-empty range inside [0, {k})")
            idx = torch.arange(start, stop)
        clash = owner[idx] >= 0
        if clash.any():
            col = int(idx[clash][0])
            raise DropinfError(f"{label} overlaps block {int(owner[col])} at column {col}")
        owner[idx] = b
        groups.append(idx)
        labels.append(label)
    missing = torch.nonzero(owner < 0).flatten()
    if missing.numel():
        raise DropinfError(f"columns {missing[:10].tolist()} ({missing.numel()} in all) are in no block; "
                           f"blocks must cover all {k} columns")
    perm = torch.cat(groups)
    ends = np.cumsum([0] + [g.numel() for g in groups]).tolist()
    if torch.equal(perm, torch.arange(k)):
        perm = None
    return _Blocks(perm, list(zip(ends[:-1], ends[1:])), labels)


def _positive(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer, torch.Tensor)):
        raise DropinfError(f"{what} must be a positive number, got {x!r}")
    x = float(x)
    if not (math.isfinite(x) and x > 0):
        raise DropinfError(f"{what} must be positive and finite, got {x} (never damping 0: H is singular)")
    return x


def _per_block(x, nblocks: int, what: str) -> list[float]:
    """One positive float per block, from a scalar or a sequence of nblocks values."""
    if isinstance(x, (list, tuple, np.ndarray)) or (isinstance(x, torch.Tensor) and x.dim()):
        vals = list(x)
        if len(vals) != nblocks:
            raise DropinfError(f"{what} has {len(vals)} values for {nblocks} blocks")
        return [_positive(v, f"{what} of block {b}") for b, v in enumerate(vals)]
    return [_positive(x, what)] * nblocks


def _parse_damping(damping, nblocks: int):
    """'paper' or a list of one positive lambda per block."""
    if isinstance(damping, str):
        if damping == "paper":
            return "paper"
        raise DropinfError(f"damping must be 'paper' or a positive number, got {damping!r}")
    return _per_block(damping, nblocks, "damping")


def _paper(sumsq: Sequence[float], n: int, blocks: _Blocks, which: Sequence[int], dtype) -> list[float]:
    """lambda_b = 0.1 * mean_i ||g_{b,i}||^2 / d_b from the per-block sums of squares over train."""
    out = []
    for s, b in zip(sumsq, which):
        lam = PAPER_FACTOR * float(s) / (n * blocks.widths[b])
        if float(s) == 0.0:
            # Every training gradient is 0 on this block (e.g. dropout kept one coordinate of an
            # embedding row no training example uses): its term -v_b^T (H_b + lambda I)^-1 g_{k,b} is
            # exactly 0 for ANY lambda > 0, whereas the formula gives lambda = 0 (singular). Use 1.
            warnings.warn(f"{blocks.labels[b]}: all-zero gradients over train; this block adds exactly 0 to "
                          "every score (its 'paper' damping would be 0, so 1 is used)", stacklevel=3)
            lam = 1.0
        out.append(lam)
    return check_damping(out, [blocks.labels[b] for b in which], dtype, n, "'paper' damping")


def check_damping(lams: Sequence[float], labels: Sequence[str], dtype, n: int, what: str = "damping") -> list[float]:
    """Each lambda (and n*lambda, Woodbury's diagonal) must be a finite, normal number of `dtype`:
    one that overflows to inf or rounds to 0 (or a subnormal) would make the solve meaningless."""
    info = torch.finfo(dtype)
    for lam, label in zip(lams, labels):
        for v in (lam, lam * n):
            if not (math.isfinite(v) and info.tiny <= v <= info.max):
                raise DampingRangeError(
                    f"{label}: {what} lambda={lam:.3g} (n*lambda={lam * n:.3g} with n={n}) is outside the range of "
                    f"{str(dtype).removeprefix('torch.')} (normal numbers {info.tiny:.3g} .. {info.max:.3g}); "
                    f"rescale the gradients, choose another damping, or solve in float64")
    return list(lams)


class _Rows:
    """Row chunks of train on the compute device, columns permuted so blocks are contiguous.

    Every row is checked for NaN/inf the first time it is read (passes read rows in order), so a
    bad row is reported with its index in the whole array, in whichever pass touches it first.
    """

    def __init__(self, x, n: int, k: int, chunk_rows: int, device, dtype, perm):
        self.x, self.n, self.k, self.chunk_rows = x, n, k, chunk_rows
        self.device, self.dtype = device, dtype
        self.itemsize = torch.finfo(dtype).bits // 8
        self.perm = None if perm is None else perm.to(device)
        self._checked = 0
        self.progress, self.label, self.passes = None, "influence", 0  # the bar of every pass (`chunks`)

    def read(self, a: int, b: int) -> torch.Tensor:
        c = _to_torch(self.x[a:b])
        if c.element_size() > self.itemsize:  # cast on the side where the data is narrower, then move
            c = c.to(self.dtype)
        c = c.to(self.device).to(self.dtype)
        if a <= self._checked < b:
            check_finite(c[self._checked - a:], "train", offset=self._checked)
            self._checked = b
        return c if self.perm is None else c.index_select(1, self.perm)

    def chunks(self, start: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
        self.passes += 1
        with bar(total=self.n - start, desc=f"{self.label} pass {self.passes}", unit="rows",
                 progress=self.progress) as shown:
            for a in range(start, self.n, self.chunk_rows):
                b = min(a + self.chunk_rows, self.n)
                yield a, b, self.read(a, b)
                shown.update(b - a)


# ----------------------------------------------------------------------------------------------
# Problem: what every solver gets
# ----------------------------------------------------------------------------------------------

@dataclass
class Problem:
    rows: _Rows
    blocks: _Blocks
    damping: Any  # "paper" or list of per-block floats
    options: dict = field(default_factory=dict)
    _lambdas: list[float] | None = None

    @property
    def n(self) -> int:
        return self.rows.n

    @property
    def k(self) -> int:
        return self.rows.k

    def lambdas(self) -> list[float]:
        """Per-block damping; 'paper' costs one pass over train (cached)."""
        if self._lambdas is None:
            if self.damping == "paper":
                sq = torch.zeros(self.k, dtype=self.rows.dtype, device=self.rows.device)
                for _, _, c in self.rows.chunks():
                    sq += c.square().sum(0)
                sums = [sq[lo:hi].sum().item() for lo, hi in self.blocks.bounds]
                self._lambdas = _paper(sums, self.n, self.blocks, range(len(self.blocks)), self.rows.dtype)
            else:
                self._lambdas = check_damping(self.damping, self.blocks.labels, self.rows.dtype, self.n)
        return self._lambdas

    def per_column(self, values: Sequence[float]) -> torch.Tensor:
        """(k, 1) tensor holding each block's value on its columns."""
        v = torch.tensor(list(values), dtype=self.rows.dtype, device=self.rows.device)
        return v[self.blocks.ids(self.rows.device)].unsqueeze(1)

    def hvp(self, S: torch.Tensor) -> torch.Tensor:
        """Block-diagonal H S = G^T (G S) / n, one streamed pass."""
        out = torch.zeros_like(S)
        for _, _, c in self.rows.chunks():
            for lo, hi in self.blocks.bounds:
                cb = c[:, lo:hi]
                out[lo:hi] += cb.T @ (cb @ S[lo:hi])
        return out / self.n

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """(n, m) = -G X on the CPU, one streamed pass."""
        out = torch.empty(self.n, X.shape[1], dtype=self.rows.dtype)
        for a, b, c in self.rows.chunks():
            out[a:b] = (c @ X).neg_().cpu()
        return out


def _cholesky(A: torch.Tensor, label: str, lam: float) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        raise NotPositiveDefiniteError(
            f"Cholesky failed for {label} with damping lambda={lam:.3g} (leading minor {info.item()} is not "
            f"positive definite in {A.dtype}); use a larger damping or dtype=torch.float64")
    return L


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------

class Solver:
    """One way to apply (H + lambda I)^{-1} to V (k, m). Subclasses register under `names`.

    Override `solve` (return X = (H + lambda I)^{-1} V, block by block, in the problem's permuted
    column order) or `scores` (return the (n, m) CPU scores directly).
    """

    names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.names:
            old = SOLVERS.get(name)
            if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise DropinfError(f"solver name {name!r} is already registered to {SOLVERS[name].__name__}")
            SOLVERS[name] = cls

    def __init__(self, problem: Problem):
        self.p = problem

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, V: torch.Tensor) -> torch.Tensor:
        return self.p.scores(self.solve(V))


class TracIn(Solver):
    """The paper's 'Hessian-free': -v^T g_k, no curvature, damping ignored."""

    names = ("tracin",)

    def solve(self, V):
        return V


class Exact(Solver):
    """Exact damped inverse by Cholesky, per block.

    A block with k_b <= n forms its k_b x k_b H in one pass, then one pass scores. A block with
    n < k_b (LoRA: many coordinates, few examples) uses Woodbury,
        (G^T G/n + lambda I)^{-1} = (1/lambda) (I - G^T (n lambda I + G G^T)^{-1} G),
    which collapses to scores_b = -n (n lambda I + K_b)^{-1} G_b V_b with K_b = G_b G_b^T, so only
    n x n matrices are held. K_b is built panel by panel: ceil(n / (4 chunk_rows)) sweeps.
    'paper' damping comes free from the trace of H_b or K_b.
    """

    names = ("orig", "exact")

    def split(self) -> tuple[list[int], list[int]]:
        """(dense blocks, Woodbury blocks) under the `woodbury` option."""
        p = self.p
        mode = p.options.get("woodbury", "auto")
        wood = [b for b, w in enumerate(p.blocks.widths) if mode is True or (mode == "auto" and p.n < w)]
        return sorted(set(range(len(p.blocks))) - set(wood)), wood

    def scores(self, V):
        p = self.p
        dense, wood = self.split()
        out = p.scores(self._dense(dense, V)) if dense else None
        if wood:
            w = self._woodbury(wood, V)
            out = w if out is None else out + w
        return out

    def _lambda(self, which, sumsq):
        if self.p.damping == "paper":
            return _paper(sumsq, self.p.n, self.p.blocks, which, self.p.rows.dtype)
        return check_damping([self.p.damping[b] for b in which], [self.p.blocks.labels[b] for b in which],
                             self.p.rows.dtype, self.p.n)

    def _dense(self, which, V):
        p, bounds = self.p, self.p.blocks.bounds
        H = [torch.zeros(bounds[b][1] - bounds[b][0], bounds[b][1] - bounds[b][0],
                         dtype=V.dtype, device=V.device) for b in which]
        for _, _, c in p.rows.chunks():
            for h, b in zip(H, which):
                cb = c[:, bounds[b][0]:bounds[b][1]]
                h.addmm_(cb.T, cb)
        lams = self._lambda(which, [h.diagonal().sum().item() for h in H])
        X = torch.zeros_like(V)  # rows of Woodbury blocks stay 0: they are scored separately
        for h, b, lam in zip(H, which, lams):
            lo, hi = bounds[b]
            h /= p.n
            h.diagonal().add_(lam)
            X[lo:hi] = torch.cholesky_solve(V[lo:hi], _cholesky(h, p.blocks.labels[b], lam))
        return X

    def _woodbury(self, which, V):
        p, n, bounds = self.p, self.p.n, self.p.blocks.bounds
        K = [torch.zeros(n, n, dtype=V.dtype, device=V.device) for _ in which]
        W = [torch.zeros(n, V.shape[1], dtype=V.dtype, device=V.device) for _ in which]
        panel = p.rows.chunk_rows * PANEL_CHUNKS
        for a in range(0, n, panel):  # panel rows [a, a2) against themselves and every later row
            a2 = min(a + panel, n)
            A = p.rows.read(a, a2)
            parts = [A[:, bounds[b][0]:bounds[b][1]] for b in which]
            for j, b in enumerate(which):
                K[j][a:a2, a:a2] = parts[j] @ parts[j].T
                W[j][a:a2] = parts[j] @ V[bounds[b][0]:bounds[b][1]]
            for c0, c1, c in p.rows.chunks(start=a2):
                for j, b in enumerate(which):
                    kb = parts[j] @ c[:, bounds[b][0]:bounds[b][1]].T
                    K[j][a:a2, c0:c1] = kb
                    K[j][c0:c1, a:a2] = kb.T
        lams = self._lambda(which, [k.diagonal().sum().item() for k in K])
        out = torch.zeros(n, V.shape[1], dtype=V.dtype, device=V.device)
        for k, w, b, lam in zip(K, W, which, lams):
            k.diagonal().add_(n * lam)
            out -= n * torch.cholesky_solve(w, _cholesky(k, p.blocks.labels[b] + " (Woodbury n x n system)", lam))
        return out.cpu()


class LiSSA(Solver):
    """s_0 = v, s_{t+1} = v + (I - (H + lambda I)/scale) s_t; returns s_T / scale ~ (H + lambda I)^{-1} v.

    Converges when scale > (lambda_max(H_b) + lambda_b) / 2. Default per-block scale is
    1.1 (lambda_max + lambda_b), lambda_max from a few streamed power-iteration passes (a lower
    bound, hence the margin). One streamed pass per iteration.
    """

    names = ("lissa",)

    def solve(self, V):
        p, opt = self.p, self.p.options
        lams = p.lambdas()
        scale = opt.get("lissa_scale")
        if scale is None:
            scale = [1.1 * (top + lam) for top, lam in zip(self._top_eigenvalues(opt.get("lissa_power_iters", 5)), lams)]
        lam_c, scale_c = p.per_column(lams), p.per_column(scale)
        S = V.clone()
        for _ in range(opt.get("lissa_iters", 10)):
            S = V + S - (p.hvp(S) + lam_c * S) / scale_c
        return S / scale_c

    def _top_eigenvalues(self, steps: int) -> list[float]:
        p = self.p
        ids = p.blocks.ids(p.rows.device)
        nb = len(p.blocks)
        gen = torch.Generator().manual_seed(0)  # fixed start: reproducible scores
        x = torch.randn(p.k, 1, generator=gen, dtype=p.rows.dtype).to(p.rows.device)
        top = torch.zeros(nb, dtype=x.dtype, device=x.device)
        for _ in range(steps):
            norms = torch.zeros(nb, dtype=x.dtype, device=x.device).index_add_(0, ids, x[:, 0].square()).sqrt()
            x = x / norms.clamp_min(torch.finfo(x.dtype).tiny)[ids].unsqueeze(1)
            x = p.hvp(x)
            # ||H x|| for unit x is a lower bound on lambda_max for PSD H
            top = torch.zeros(nb, dtype=x.dtype, device=x.device).index_add_(0, ids, x[:, 0].square()).sqrt()
        return top.tolist()


class DataInf(Solver):
    """Sherman-Morrison swap of inverse and average (DataInf; paper eq. 9-10), per block:
    (H + lambda I)^{-1} v ~ (1/(n lambda)) sum_i (v - g_i (g_i^T v) / (lambda + ||g_i||^2)).
    """

    names = ("datainf",)

    def solve(self, V):
        p = self.p
        lams = p.lambdas()
        acc = torch.zeros_like(V)
        for _, _, c in p.rows.chunks():
            for (lo, hi), lam in zip(p.blocks.bounds, lams):
                cb = c[:, lo:hi]
                coef = (cb @ V[lo:hi]) / (lam + cb.square().sum(1, keepdim=True))
                acc[lo:hi] += cb.T @ coef
        return (V - acc / p.n) / p.per_column(lams)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def _setup(train, blocks, damping, chunk_rows, device, dtype, layout=None):
    if dtype not in (torch.float32, torch.float64):
        raise DropinfError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    train, (n, k), tname = _matrix(train, "train")
    if n == 0 or k == 0:
        raise ShapeError(f"train has shape {(n, k)}: no examples or no coordinates")
    blk = _parse_blocks(resolve_blocks(train, blocks, layout), k)
    damp = _parse_damping(damping, len(blk))
    if damp != "paper":
        check_damping(damp, blk.labels, dtype, n)  # before reading train
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (k * torch.finfo(dtype).bits // 8))
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise DropinfError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if device is None:
        device = train.device if isinstance(train, torch.Tensor) else "cpu"
    rows = _Rows(train, n, k, chunk_rows, torch.device(device), dtype, blk.perm)
    return rows, blk, damp, tname


def damping_for(train, blocks="layer", damping="paper", *, layout=None, chunk_rows=None, device=None,
                dtype=torch.float64) -> list[float]:
    """Per-block damping: 'paper' -> 0.1 * mean_i ||g_{b,i}||^2 / d_b on each block's own columns
    (one pass over train); a float (or one float per block) is returned as-is. Blocks as `influence`."""
    rows, blk, damp, _ = _setup(train, blocks, damping, chunk_rows, device, dtype, layout)
    return Problem(rows, blk, damp).lambdas()


def influence(train, test, method: str, damping="paper", blocks="layer", reduce: bool = True, *,
              layout=None, chunk_rows: int | None = None, device=None, dtype: torch.dtype = torch.float64,
              lissa_iters: int = 10, lissa_scale=None, lissa_power_iters: int = 5,
              woodbury="auto", progress: bool | None = None) -> torch.Tensor:
    """Influence of every training example on the test loss; (n,) on the CPU, or (n, m) if not reduce.

    I(z_k) = -v^T (H + lambda I)^{-1} g_k with v the mean test row (reduce=False: each test row),
    H = train^T train / n, block-diagonal over `blocks`. Positive = harmful, negative = helpful.

    train: (n, k) tensor, numpy array or array-like with .shape, .dtype and row slicing (zarr);
        read in `chunk_rows` row chunks (default ~256 MB per chunk), never whole.
    test: (m, k), same dtype as train, loaded whole.
    method: a key of SOLVERS: 'orig'/'exact', 'lissa', 'datainf', 'tracin'.
    damping: 'paper' (per block 0.1 * mean ||g_b||^2 / d_b), a positive float, or one per block; a
        value the solve dtype cannot hold (inf, or 0 after rounding) raises DampingRangeError.
    blocks: 'layer' (default), 'tensor' or 'global': the curvature setting, resolved by `layout` or
        train's stored attributes (see the module doc; with neither, one block); None (one global
        block); or explicit blocks: a list of (start, stop) column ranges and/or 1-D integer index
        tensors, or a dict label -> index tensor; together they must cover each column exactly once.
    layout: what train's columns are: a `dropinf.layout.Layout` (raw gradients) or the Compressor
        that produced them (e.g. `Extractor(...).compressor`); used when blocks is a setting.
    device / dtype: where and in which precision (float64 or float32) the math runs.
    lissa_iters, lissa_scale (float or one per block; default 1.1 (lambda_max + lambda) per block),
    lissa_power_iters: LiSSA settings. woodbury: 'auto' (when n < block width), True, or False (orig).
    progress: a bar per pass over train (`dropinf.progress`): True, False, or None (default: shown
        unless the environment variable DROPINF_PROGRESS is 0).
    """
    solver, V = _solver_and_test(train, test, method, reduce, damping, blocks, layout, chunk_rows, device, dtype,
                                 lissa_iters, lissa_scale, lissa_power_iters, woodbury, progress)
    out = solver.scores(V).cpu()
    return out[:, 0] if reduce else out


def _check_method(method) -> None:
    if not isinstance(method, str) or method not in SOLVERS:
        raise DropinfError(f"unknown method {method!r}; known methods: {', '.join(sorted(SOLVERS))}")


def _solver(rows, blk, damp, method, lissa_iters, lissa_scale, lissa_power_iters, woodbury) -> Solver:
    """The `method` solver on `rows`, its options validated."""
    if isinstance(lissa_iters, bool) or not isinstance(lissa_iters, int) or lissa_iters < 1:
        raise DropinfError(f"lissa_iters must be a positive int, got {lissa_iters!r}")
    if lissa_scale is not None:
        lissa_scale = _per_block(lissa_scale, len(blk), "lissa_scale")
    if woodbury not in ("auto", True, False):
        raise DropinfError(f"woodbury must be 'auto', True or False, got {woodbury!r}")
    options = dict(lissa_iters=lissa_iters, lissa_scale=lissa_scale, lissa_power_iters=lissa_power_iters,
                   woodbury=woodbury)
    return SOLVERS[method](Problem(rows, blk, damp, options))


def _solver_and_test(train, test, method, reduce, damping, blocks, layout, chunk_rows, device, dtype,
                     lissa_iters, lissa_scale, lissa_power_iters, woodbury,
                     progress: bool | None = None) -> tuple[Solver, torch.Tensor]:
    """(solver, V): V (k, 1) the mean test row (reduce) or (k, m) every test row, columns permuted
    as the solver's problem; every input validated before train is read."""
    _check_method(method)
    train, tshape, _ = _matrix(train, "train")
    test, (m, kt), sname = _matrix(test, "test")
    if tshape[1] != kt:
        raise ShapeError(f"train has shape {tshape} and test has shape {(m, kt)}: column counts differ")
    rows, blk, damp, tname = _setup(train, blocks, damping, chunk_rows, device, dtype, layout)
    rows.progress, rows.label = progress, f"influence {method}"
    if tname != sname:
        raise ShapeError(f"train dtype {tname} differs from test dtype {sname}")
    if m == 0:
        raise ShapeError(f"test has shape {(m, kt)}: no examples")
    solver = _solver(rows, blk, damp, method, lissa_iters, lissa_scale, lissa_power_iters, woodbury)

    T = _to_torch(test[0:m]).to(rows.device).to(dtype)
    check_finite(T, "test")
    if blk.perm is not None:
        T = T.index_select(1, rows.perm)
    return solver, (T.mean(0, keepdim=True) if reduce else T).T.contiguous()  # (k, 1) or (k, m)


# ----------------------------------------------------------------------------------------------
# Pairwise and self-influence: the same solvers with other right-hand sides
# ----------------------------------------------------------------------------------------------

def _has_inverse(solver: Solver) -> bool:
    """Whether the solver forms X = (H + lambda I)^{-1} V in k-space: not Exact with a Woodbury
    block (it goes to scores through n x n systems), nor a solver that overrides only `scores`."""
    if isinstance(solver, Exact):
        return not solver.split()[1]
    return type(solver).solve is not Solver.solve


def _apply_inverse(solver: Solver, V: torch.Tensor) -> torch.Tensor:
    """X = (H + lambda I)^{-1} V (k, m) in the problem's column order (`_has_inverse` solvers)."""
    if isinstance(solver, Exact):
        return solver._dense(solver.split()[0], V)
    return solver.solve(V)


def _step(budget_rows: int, cap: int, align: int, total: int) -> int:
    """Rows per block: at most `budget_rows` and `cap`, a multiple of `align` (at least one)."""
    step = max(1, min(int(budget_rows), int(cap)))
    step = max(align, step - step % align)
    return min(step, total) if total > 0 else step


def pairwise_blocks(train, test, method: str, damping="paper", blocks="layer", *, layout=None,
                    chunk_rows: int | None = None, device=None, dtype: torch.dtype = torch.float64,
                    lissa_iters: int = 10, lissa_scale=None, lissa_power_iters: int = 5, woodbury="auto",
                    align: tuple[int, int] = (1, 1), block_bytes: int = PAIRWISE_BYTES,
                    progress: bool | None = None):
    """The (m, n) pairwise matrix P[j, k] = -g_test_j^T (H + lambda I)^{-1} g_k, block by block.

    Returns an iterator of (test_rows, train_rows, P_block): two slices and a CPU tensor of shape
    (len(test_rows), len(train_rows)); the blocks tile P exactly once, and P is
    `influence(train, test, method, reduce=False).T` (its mean over j is `influence(...)`).
    Positive = up-weighting train example k raises the loss of test example j (harmful).
    The solve runs once: X = (H + lambda I)^{-1} T^T (k, m), then one streamed pass over train yields
    column blocks (all m test rows, a few train rows). Exact with a Woodbury block (n < block width)
    has no k-space X: it yields row blocks (a few test rows, all n train rows), one solve each.
    A block holds about `block_bytes`; block boundaries are multiples of `align` = (test, train)
    (the chunk shape of the array they are written to). Arguments as `influence`; all are checked
    before the first block is computed.
    """
    solver, V = _solver_and_test(train, test, method, False, damping, blocks, layout, chunk_rows, device, dtype,
                                 lissa_iters, lissa_scale, lissa_power_iters, woodbury, progress)
    align = tuple(int(a) for a in align)
    if len(align) != 2 or min(align) < 1:
        raise DropinfError(f"align must be two positive ints (test, train), got {align!r}")
    return _pairwise(solver, V, align, int(block_bytes))


def _pairwise(solver: Solver, V: torch.Tensor, align: tuple[int, int], block_bytes: int):
    p = solver.p
    n, m, item = p.n, V.shape[1], p.rows.itemsize
    if _has_inverse(solver):
        X = _apply_inverse(solver, V)
        step = _step(block_bytes // (m * item), p.rows.chunk_rows, align[1], n)
        for a in range(0, n, step):
            b = min(n, a + step)
            yield slice(0, m), slice(a, b), (p.rows.read(a, b) @ X).neg_().T.cpu()  # a transposed view
        return
    step = _step(block_bytes // (n * item), m, align[0], m)
    for j in range(0, m, step):
        j2 = min(m, j + step)
        yield slice(j, j2), slice(0, n), solver.scores(V[:, j:j2].contiguous()).T.cpu()


def self_influence(train, method: str, damping="paper", blocks="layer", *, layout=None,
                   chunk_rows: int | None = None, device=None, dtype: torch.dtype = torch.float64,
                   lissa_iters: int = 10, lissa_scale=None, lissa_power_iters: int = 5, woodbury="auto",
                   block_bytes: int = CHUNK_BYTES, progress: bool | None = None) -> torch.Tensor:
    """(n,) self-influence S_k = g_k^T (H + lambda I)^{-1} g_k of every training example, on the CPU.

    The same curvature blocks, damping and solver as `influence` ('tracin': ||g_k||^2), so S_k is
    exactly -P[k, k] of the pairwise matrix with the training set as its own test set; S_k >= 0
    for the exact solver (H + lambda I is positive definite). High = the model fits z_k only by
    leaning on z_k itself: mislabeled and atypical examples score high.
    Training rows are taken as right-hand sides in groups of about `block_bytes`; each group costs
    one solve (orig/exact: one pass to form H, or the Woodbury sweeps; lissa: its iterations).
    Arguments as `influence`.
    """
    _check_method(method)
    rows, blk, damp, _ = _setup(train, blocks, damping, chunk_rows, device, dtype, layout)
    rows.progress, rows.label = progress, f"self-influence {method}"
    solver = _solver(rows, blk, damp, method, lissa_iters, lissa_scale, lissa_power_iters, woodbury)
    n, k = rows.n, rows.k
    inverse = _has_inverse(solver)
    step = _step(int(block_bytes) // ((k + (0 if inverse else n)) * rows.itemsize), n, 1, n)
    out = torch.empty(n, dtype=dtype)
    for a in range(0, n, step):
        b = min(n, a + step)
        c = rows.read(a, b)  # (rows, k), columns in block order like every right-hand side
        V = c.T.contiguous()
        s = (c * _apply_inverse(solver, V).T).sum(1) if inverse else -solver.scores(V)[a:b].diagonal()
        out[a:b] = s.cpu()
    return out
