"""Per-example gradient factors: the pieces hooks capture, before any gradient is formed.

A matrix parameter's per-example gradient is  g[b] = sum_t R[b, t, :] (outer) C[b, t, :]  where
R and C are factors of shape (B, T, n). Factors are lazy so compressors read only what they
keep: a one-hot factor (embedding lookups) gathers by comparing ids, an unfold factor (Conv2d)
reads only the sampled input taps; grouped convolutions spread positions over (group, position).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (reference checks), everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


class Factor:
    batch: int
    length: int  # T: positions summed over
    width: int   # n
    # True when `take_last` is as cheap as `take` (the factor's positions are contiguous in memory,
    # as in a convolution's (B, C, H, W) tensors): a compressor then reduces over the last dimension
    positions_last = False
    # what `index(idx)` depends on besides idx (a compressor caches `index` under this key per slot)
    index_key = None

    def index(self, idx: torch.Tensor):
        """What `take` needs to read columns `idx`; the same for every batch with this `index_key`,
        so a compressor computes it once per slot and each batch pays only the read."""
        return idx

    def take(self, index) -> torch.Tensor:
        """(B, T, k): the columns `index` was made for, in the input's dtype; a fresh tensor, which
        the caller may overwrite (so `take`, `take_last` and `gather` never return a view)."""
        return self.gather(index)

    def take_last(self, index) -> torch.Tensor:
        """(B, k, T): the same values with positions last (contiguous when `positions_last`)."""
        return self.take(index).transpose(1, 2)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, len(idx)) columns `idx`, in the input's dtype (callers reduce in float32)."""
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        """(B, T, n) in the accumulation dtype."""
        return acc(self.gather(torch.arange(self.width, device=self.device)))

    def project(self, P: torch.Tensor) -> torch.Tensor:
        """(B, T, k) = full() @ P.T for P of shape (k, n)."""
        full = self.full()
        return full @ P.T.to(full.dtype)


class Dense(Factor):
    def __init__(self, x: torch.Tensor):
        if x.dim() == 2:
            x = x.unsqueeze(1)
        self.x = x.flatten(1, -2) if x.dim() > 3 else x  # 3-D stays a view (δ is often non-contiguous)
        self.batch, self.length, self.width = self.x.shape
        self.device = x.device
        # a convolution's δ (B, C, L) seen as (B, L, C): its columns are contiguous rows
        self.positions_last = self.length > 1 and self.x.stride(1) == 1

    def gather(self, idx):
        return self.x.index_select(-1, idx)

    def take_last(self, idx):
        return self.x.transpose(1, 2).index_select(1, idx)

    def full(self):
        return acc(self.x)


class OneHot(Factor):
    """Rows of an embedding table selected by token ids (B, T)."""

    def __init__(self, ids: torch.Tensor, num: int, dtype: torch.dtype):
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.ids = ids.reshape(ids.shape[0], -1)
        self.batch, self.length = self.ids.shape
        self.width = num
        self.device = ids.device

    def gather(self, idx):
        return (self.ids.unsqueeze(-1) == idx.view(1, 1, -1)).to(self.dtype)

    def project(self, P):
        return P.T.to(self.dtype)[self.ids]


class GroupRows(Factor):
    """Output gradients of a grouped convolution, δ (B, L, out), spread over (group, position) pairs:
    the row of output channel o at position (j, t) is δ[b, t, o] when o belongs to group j, else 0.
    With `Unfold(..., groups)` as the columns, Σ over (j, t) gives exactly the block-diagonal
    per-example weight gradient (out, in/groups·k)."""

    def __init__(self, delta: torch.Tensor, groups: int):
        self.d, self.groups = delta, int(groups)
        self.batch, L, self.width = delta.shape
        self.length = self.groups * L
        self.per_group = self.width // self.groups
        self.device = delta.device

    def gather(self, idx):
        vals = self.d.index_select(-1, idx)                                           # (B, L, k)
        own = torch.arange(self.groups, device=idx.device)[:, None] == (idx // self.per_group)[None, :]
        return (vals[:, None] * own[None, :, None, :].to(vals.dtype)).reshape(self.batch, self.length, -1)

    def project(self, P):
        d = acc(self.d).view(self.batch, -1, self.groups, self.per_group)
        Pg = P.to(d.dtype).view(P.shape[0], self.groups, self.per_group)
        return torch.einsum("blgo,kgo->bglk", d, Pg).reshape(self.batch, self.length, P.shape[0])


class Unfold(Factor):
    """im2col of a convolution input x (B, C, H, W), columns ordered (channel, ky, kx) as in the
    weight's flattening (a 1-d convolution is H = 1, kernel (1, k)). With groups g the positions are
    (group, output position) pairs and the columns the group's own C/g channels; pair it with
    `GroupRows`. `padding` is (top, bottom, left, right)."""

    def __init__(self, x: torch.Tensor, kernel, stride, dilation, padding, groups: int = 1):
        self.kernel, self.stride, self.dilation, self.groups = tuple(kernel), tuple(stride), tuple(dilation), int(groups)
        # x stays unpadded: a padded copy is a whole activation per layer (ResNet-9: 12% of the peak),
        # and `gather` reads the few taps it needs, treating the margin as zeros
        self.x, self.padding = x, tuple(padding)
        top, bottom, left, right = padding
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        H, W = x.shape[-2] + top + bottom, x.shape[-1] + left + right
        self.oh = (H - dh * (kh - 1) - 1) // sh + 1
        self.ow = (W - dw * (kw - 1) - 1) // sw + 1
        self.per_group = x.shape[1] // self.groups
        self.batch, self.length = x.shape[0], self.groups * self.oh * self.ow
        self.width = self.per_group * kh * kw
        self.device = x.device
        self.positions_last = self.groups == 1
        self.index_key = (tuple(x.shape[1:]), x.dtype, self.kernel, self.stride, self.dilation, self.padding,
                          self.groups)

    def _by_group(self, t: torch.Tensor) -> torch.Tensor:
        """(B, g, k, L) → (B, g·L, k): positions ordered (group, output position)."""
        return t.transpose(2, 3).reshape(self.batch, self.length, -1)

    def padded(self) -> torch.Tensor:
        """The input with its zero margin (for the dense paths, which read every tap)."""
        top, bottom, left, right = self.padding
        return F.pad(self.x, (left, right, top, bottom)) if any(self.padding) else self.x

    def index(self, idx):
        """Where columns `idx` read the unpadded input: (channels (g, k), rows (k, oh), columns
        (k, ow), the same as one flat index into a contiguous x (g·k·oh·ow), and the zero margin
        as a (k, oh·ow) mask in x's dtype, or None without padding)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, _, left, _ = self.padding
        H, W = self.x.shape[-2:]
        c, rem = idx // (kh * kw), idx % (kh * kw)
        ky, kx = rem // kw, rem % kw
        # rows and columns of the unpadded input; those outside it are the zero margin
        ys = ky[:, None] * dh + sh * torch.arange(self.oh, device=idx.device)[None, :] - top  # (k, oh)
        xs = kx[:, None] * dw + sw * torch.arange(self.ow, device=idx.device)[None, :] - left  # (k, ow)
        ch = c[None, :] + self.per_group * torch.arange(self.groups, device=idx.device)[:, None]  # (g, k)
        yc, xc = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
        flat = (ch[:, :, None, None] * H + yc[None, :, :, None]) * W + xc[None, :, None, :]  # (g, k, oh, ow)
        inside = None
        if any(self.padding):
            inside = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
            inside = inside.flatten(1).to(self.x.dtype)
        return ch, yc, xc, flat.flatten(), inside

    def _taps(self, index) -> torch.Tensor:
        """(B, g, k, oh·ow): the sampled taps, zero in the margin."""
        ch, yc, xc, flat, inside = index
        if self.x.is_contiguous():  # one index_select over the flattened input
            taps = self.x.flatten(1).index_select(1, flat).view(self.batch, self.groups, -1, self.oh * self.ow)
        else:
            taps = self.x[:, ch[:, :, None, None], yc[None, :, :, None], xc[None, :, None, :]].flatten(3)
        return taps.mul_(inside) if inside is not None else taps

    def take(self, index):
        return self._by_group(self._taps(index))

    def take_last(self, index):
        taps = self._taps(index)
        if self.groups == 1:
            return taps[:, 0]
        return taps.transpose(1, 2).reshape(self.batch, taps.shape[2], -1)

    def gather(self, idx):
        return self.take(self.index(idx))

    def full(self):
        cols = F.unfold(self.padded(), self.kernel, dilation=self.dilation, stride=self.stride)  # (B, C·kh·kw, L)
        return acc(self._by_group(cols.view(self.batch, self.groups, self.width, -1)))

    def project(self, P):
        kh, kw = self.kernel
        w = P.to(self.x.dtype).view(P.shape[0], self.per_group, kh, kw).repeat(self.groups, 1, 1, 1)
        y = F.conv2d(self.padded(), w, stride=self.stride, dilation=self.dilation, groups=self.groups)
        return acc(self._by_group(y.view(self.batch, self.groups, P.shape[0], -1)))


class Normalized(Factor):
    """Columns of a norm layer's x̂ = (x - shift) · scale for x (B, T, n), as the layer computes it:
    in the statistics' dtype, then rounded to `round_to` where given (LayerNorm and RMSNorm round x̂
    to the input's dtype before the weight multiplies it). `stats()` gives (shift or None, scale),
    each broadcastable to x: per row (LayerNorm, RMSNorm: (B, T, 1)) or per channel (BatchNorm:
    (n,)). It runs on first use only, so a layer where a compressor keeps nothing computes none."""

    def __init__(self, x: torch.Tensor, stats, round_to: torch.dtype | None = None):
        self.x, self._stats_fn, self._stats, self.round_to = x, stats, None, round_to
        self.batch, self.length, self.width = x.shape
        self.device = x.device

    def stats(self):
        if self._stats is None:
            self._stats = self._stats_fn()
        return self._stats

    def values(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """x̂ on columns `idx` (None: all)."""
        shift, scale = self.stats()
        pick = (lambda t: t) if idx is None else (lambda t: t if t.shape[-1] == 1 else t.index_select(-1, idx))
        xs = self.x if idx is None else self.x.index_select(-1, idx)
        xs = xs if xs.dtype == scale.dtype else xs.to(scale.dtype)
        xhat = (xs if shift is None else xs - pick(shift)) * pick(scale)
        return xhat if self.round_to in (None, xhat.dtype) else xhat.to(self.round_to)

    def gather(self, idx):
        return self.values(idx)


def product_sums(rows: Dense, cols: Normalized) -> "PositionSums":
    """Σ over positions of rows·cols column by column (a norm layer's weight: δ·x̂), formed only on
    the columns asked for: the product in the promoted dtype, the sum in the dtype asked for."""
    def sums(idx, dtype):
        ds = rows.x if idx is None else rows.x.index_select(-1, idx)
        return (ds * cols.values(idx)).sum(1, dtype=dtype)

    return PositionSums(sums, cols.x.dtype, factors=(rows, cols))


class PositionSums:
    """A slot's per-example values summed over positions, (B, width), formed only on the columns a
    compressor asks for. A handler whose values cost a pass over a whole activation (BatchNorm's
    x̂·δ) passes this to `add_vector`, so that dropout reads just its sampled channels.
    `fn(idx, dtype)` gives the sums on columns `idx` (None: all) in `dtype`; `dtype` is that of
    the values summed (the activations'). `factors`, where given, is (rows, cols) with the sums
    equal to Σ_t rows[:, t, c] · cols[:, t, c]: what the gather-dot kernel reads instead of `fn`."""

    def __init__(self, fn, dtype: torch.dtype, factors: tuple[Factor, Factor] | None = None):
        self.fn, self.dtype, self.factors = fn, dtype, factors


def vector_factors(values) -> tuple[Factor, Factor] | None:
    """`add_vector`'s values as (rows, cols) factors whose column-wise dot over positions gives its
    sums: a (B, T, n) tensor against ones, or the factors a `PositionSums` names (else None)."""
    if isinstance(values, PositionSums):
        return values.factors
    if values.dim() != 3:
        return None
    return Dense(values), Dense(_one(values.device, values.dtype).expand(values.shape))


_ONES: dict = {}


def _one(device, dtype) -> torch.Tensor:
    """A cached one-element tensor of ones (expanded, it is a ones factor with no memory)."""
    key = (device, dtype)
    if key in _ONES:
        return _ONES[key]
    one = torch.ones(1, device=device, dtype=dtype)
    # never cached from a graph's private pool (which outlives no graph) or inside a torch.func
    # transform (whose tensors are wrapped for its level only)
    if not ((device.type == "cuda" and torch.cuda.is_current_stream_capturing())
            or torch._C._are_functorch_transforms_active()):
        _ONES[key] = one
    return one


def position_sums(values, dtype: torch.dtype, idx: torch.Tensor | None = None) -> torch.Tensor:
    """(B, width), or (B, len(idx)): `add_vector`'s values, a (B, T, ...) tensor or `PositionSums`,
    summed over positions in `dtype`."""
    if isinstance(values, PositionSums):
        return values.fn(idx, dtype)
    v = values.flatten(2)
    return (v if idx is None else v.index_select(-1, idx)).sum(1, dtype=dtype)
