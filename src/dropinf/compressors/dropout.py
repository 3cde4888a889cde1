"""Dropout compression: keep r coordinates drawn uniformly without replacement.

The kept coordinates are the first r entries of one seeded permutation of all tracked
coordinates, so dropout at r' < r is the first r' columns of dropout at r (an r-sweep extracts
once). The fused path reads only the sampled (row, column) entries of each layer's factors:
O(B·T·r) work on top of the batched backward, in one kernel per layer on CUDA (`gather_dot`).
"""
from __future__ import annotations

import functools

import torch

from .. import gather_dot
from ..factors import position_sums, vector_factors
from ..layout import Slot
from .base import Compressor, add_layer_terms, layer_terms

# Above this many coordinates a full randperm would cost too much host memory (Pythia-1.4B has
# 1.4e9); draws then come from a seeded stream, keeping first occurrences: still a uniformly
# random permutation's prefix, and still nested in r. The switch depends on dim only.
_RANDPERM_MAX_DIM = 1 << 24
_STREAM_CHUNK = 1 << 16
# Products per chunk of `add_outer`: its transients (both gathers, 16 MiB each in float32) stay a
# small part of the peak; a larger chunk saves no launches on transformers (a layer keeps far fewer
# columns), and ResNet-9's deep layers at r = 4,096 otherwise held 3 x 44 MiB at its peak.
CHUNK_ELEMS = 1 << 22


@functools.lru_cache(maxsize=None)
def _holds_product(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether a product of dtypes a and b is of dtype a (so it may be formed in place in a); cached,
    because torch.promote_types is a dispatched op and this is asked once per layer per batch."""
    return torch.promote_types(a, b) == a


def permutation_prefix(dim: int, r: int, seed: int) -> torch.Tensor:
    """First r entries of a seeded uniformly random permutation of range(dim) (int64, CPU)."""
    g = torch.Generator().manual_seed(int(seed))
    if dim <= _RANDPERM_MAX_DIM:
        return torch.randperm(dim, generator=g)[:r]
    kept: list[int] = []
    seen: set[int] = set()
    while len(kept) < r:
        for v in torch.randint(dim, (_STREAM_CHUNK,), generator=g).tolist():
            if v not in seen:
                seen.add(v)
                kept.append(v)
                if len(kept) == r:
                    break
    return torch.tensor(kept, dtype=torch.long)


class Dropout(Compressor):
    name = "dropout"
    nests_in_r = True

    def __init__(self, dim, r, seed=0, layout=None, chunk_elems: int = CHUNK_ELEMS):
        super().__init__(dim, r, seed, layout)
        self.indices = self._draw()
        self.chunk_elems = int(chunk_elems)
        self._plans: dict = {}
        self._layer_plans: dict = {}
        self._chunk_cache: dict = {}
        self._reads: dict = {}

    def _draw(self) -> torch.Tensor:
        """The kept coordinates, in output-column order (importance dropout overrides this)."""
        return permutation_prefix(self.dim, self.r, self.seed)

    # Sampled coordinate j lands in output column targets[j] with weight weights[j];
    # dropout: column j, weight 1. SJLT (buckets, signs) and importance dropout (rescale) override.
    def _targets(self) -> torch.Tensor:
        return torch.arange(self.indices.numel())

    def _weights(self) -> torch.Tensor | None:
        return None

    def attrs(self):
        return {**super().attrs(), "indices": self.indices.tolist()}

    def nest(self, Y: torch.Tensor, r: int) -> torch.Tensor:
        """Output at r from the output Y at a larger r (same seed)."""
        return Y[:, :r]

    def _compress(self, G):
        out = torch.zeros(G.shape[0], self.out_dim, dtype=G.dtype, device=G.device)
        w = self._weights()
        kept = G[:, self.indices.to(G.device)]
        if w is not None:
            kept = kept * w.to(G.device, G.dtype)
        return out.index_add_(1, self._targets().to(G.device), kept)

    def reads(self, slot: Slot) -> bool:
        key = (slot.name, slot.offset, slot.stop)
        if key not in self._reads:
            self._reads[key] = bool(((self.indices >= slot.offset) & (self.indices < slot.stop)).any())
        return self._reads[key]

    def _plan(self, slot: Slot, device):
        """For the sampled coordinates inside `slot`: output column, weight (or None), the (row, col)
        in the slot's matrix view and the flat index, kept on `device` so batches trigger no host
        copies; and whether two of them share an output column (SJLT's buckets: the gather-dot
        kernel then adds atomically), known on the host so that no batch syncs."""
        key = (slot.name, slot.offset, device)
        if key not in self._plans:
            idx = self.indices
            pos = torch.nonzero((idx >= slot.offset) & (idx < slot.stop)).flatten()
            local = idx[pos] - slot.offset
            ncol = slot.matrix_shape[1]
            w = self._weights()
            tgt = self._targets()[pos]
            self._plans[key] = (tgt.to(device), None if w is None else w[pos].to(device),
                                (local // ncol).to(device), (local % ncol).to(device), local.to(device),
                                tgt.unique().numel() < tgt.numel())
        return self._plans[key]

    def _layer_plan(self, terms, device):
        """`_plan` for several of a layer's slots at once, as the gather-dot kernel reads them: (output
        columns, weights or None, rows' index, columns' index, whether output columns repeat). A term
        summing one factor over positions (a bias) reads the other factor at index -1, as ones."""
        key = (tuple((term, slot.name, slot.offset) for term, slot in terms), device)
        if key not in self._layer_plans:
            parts = []
            for term, slot in terms:  # built on the host, so that no batch (and no graph capture) syncs
                tgt, w, ri, ci, local, _ = self._plan(slot, torch.device("cpu"))
                ones = torch.full_like(local, -1)
                parts.append((tgt, w, *{"outer": (ri, ci), "diagonal": (local, local),
                                        "row_sums": (local, ones), "col_sums": (ones, local)}[term]))
            tgt, w, ri, ci = (list(p) for p in zip(*parts))
            tgt = torch.cat(tgt)
            self._layer_plans[key] = (tgt.to(device), None if w[0] is None else torch.cat(w).to(device),
                                      torch.cat(ri).to(device), torch.cat(ci).to(device),
                                      tgt.unique().numel() < tgt.numel())
        return self._layer_plans[key]

    def add_layer(self, out, rows, cols, *, outer=None, diagonal=None, row_sums=None, col_sums=None):
        terms = layer_terms(outer, diagonal, row_sums, col_sums)
        # a layer's kept weight and bias (or norm weight and bias) in one gather-dot launch, not two:
        # eager on bf16 models every launch is host time; one term takes `add_outer`/`add_vector`'s path
        if len(terms) > 1 and gather_dot.enabled(out) and gather_dot.reads(out, rows, cols):
            tgt, w, ri, ci, shared = self._layer_plan(terms, out.device)
            if not (shared and torch.are_deterministic_algorithms_enabled()) and \
                    gather_dot.add(out, rows, cols, tgt, w, ri, ci, atomic=shared, ones=True):
                return
        add_layer_terms(self, out, rows, cols, terms)

    @staticmethod
    def _add(out, cols, w, vals):
        if w is not None:
            vals = vals * w.to(vals.dtype)
        out.index_add_(1, cols, vals.to(out.dtype))

    def _chunks(self, slot: Slot, device, rows, cols) -> list:
        """`add_outer`'s work for `slot` in chunks of at most `chunk_elems` products: (output columns,
        weights, rows' index, columns' index) each. Cached per slot and factor geometry, so a batch
        pays only for its reads (a convolution's tap positions are computed once, not per batch)."""
        step = max(1, self.chunk_elems // max(1, rows.batch * rows.length))
        key = (slot.name, slot.offset, device, step, rows.index_key, cols.index_key)
        if key not in self._chunk_cache:
            tgt, w, ri, ci, _, _ = self._plan(slot, device)
            self._chunk_cache[key] = [
                (tgt[s:s + step], None if w is None else w[s:s + step], rows.index(ri[s:s + step]),
                 cols.index(ci[s:s + step])) for s in range(0, tgt.numel(), step)]
        return self._chunk_cache[key]

    def _gather_dot(self, out, slot, rows, cols, vector: bool) -> bool:
        """Add the slot's kept coordinates with the gather-dot kernel (already `enabled` for out)
        where it reads these factors (True), else leave it to the PyTorch path (False)."""
        if not gather_dot.reads(out, rows, cols):
            return False
        tgt, w, ri, ci, local, shared = self._plan(slot, out.device)
        if shared and torch.are_deterministic_algorithms_enabled():  # atomics: their order varies
            return False
        return gather_dot.add(out, rows, cols, tgt, w, local if vector else ri, local if vector else ci, atomic=shared)

    def add_outer(self, out, slot, rows, cols):
        if gather_dot.enabled(out) and self._gather_dot(out, slot, rows, cols, vector=False):
            return
        # positions contiguous in both factors (convolutions): reduce over the last dimension,
        # so neither gather is transposed into a copy
        last = rows.positions_last and cols.positions_last
        for tgt, w, r_index, c_index in self._chunks(slot, out.device, rows, cols):
            R, C = (rows.take_last(r_index), cols.take_last(c_index)) if last else \
                (rows.take(r_index), cols.take(c_index))
            # product in the activations' dtype, in place on the fresh gather when that loses no
            # precision; sum over positions in out's dtype (float32/64)
            prod = R.mul_(C) if _holds_product(R.dtype, C.dtype) else R * C
            self._add(out, tgt, w, prod.sum(-1 if last else 1, dtype=out.dtype))

    def add_vector(self, out, slot, values):
        tgt, w, _, _, local, _ = self._plan(slot, out.device)
        if tgt.numel() == 0:
            return
        if gather_dot.enabled(out):  # (only then are the factors built: a ones tensor for a bias)
            pair = vector_factors(values)
            if pair is not None and self._gather_dot(out, slot, *pair, vector=True):
                return
        self._add(out, tgt, w, position_sums(values, out.dtype, local))
