"""Gaussian random projection P (r x dim), i.i.d. N(0, 1/r), seeded, never stored whole.

P is defined tile by tile: rows in groups of ROW_GROUP, columns in blocks of COL_BLOCK; each
tile comes from its own generator seeded by (seed, row group, column block), so any column range
can be produced alone (fused path: one layer at a time) and rows nest: P at r' < r is the first
r' rows of P at r (up to the 1/sqrt(r) scale, which `nest` undoes).
Tiles are drawn on the device that computes; CPU and CUDA generators differ, so a projection
is reproducible per device type (recorded in attrs).
"""
from __future__ import annotations

import math

import torch

from ..factors import acc
from .base import Compressor

ROW_GROUP = 64
COL_BLOCK = 1 << 15


def _tile_seed(seed: int, group: int, block: int) -> int:
    return (int(seed) * 0x9E3779B1 + group * 0x85EBCA77 + block * 0xC2B2AE3D) % (1 << 62)


class Gaussian(Compressor):
    name = "gaussian"
    nests_in_r = True
    graph_safe = False  # draws its projection tiles per batch unless they all fit in the cache

    def __init__(self, dim, r, seed=0, layout=None, cache_bytes: int = 2 << 30, chunk_elems: int = 1 << 26):
        super().__init__(dim, r, seed, layout)
        self.cache_bytes, self.chunk_elems = int(cache_bytes), int(chunk_elems)
        self._cache: dict = {}
        self._cached = 0

    def attrs(self):
        return {**super().attrs(), "projection": "N(0, 1/r) tiles", "row_group": ROW_GROUP,
                "col_block": COL_BLOCK, "tile_seed": "(seed*0x9E3779B1 + g*0x85EBCA77 + b*0xC2B2AE3D) mod 2^62"}

    def nest(self, Y, r):
        return Y[:, :r] * math.sqrt(self.r / r)

    def _block(self, b: int, device, dtype) -> torch.Tensor:
        """Columns [b*COL_BLOCK, ...) of P, shape (r, width), scaled by 1/sqrt(r)."""
        key = (b, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        c0 = b * COL_BLOCK
        width = min(COL_BLOCK, self.dim - c0)
        gen = torch.Generator(device=device)
        tiles = []
        for g in range(math.ceil(self.r / ROW_GROUP)):
            gen.manual_seed(_tile_seed(self.seed, g, b))
            tiles.append(torch.randn(ROW_GROUP, width, generator=gen, device=device, dtype=torch.float32))
        P = torch.cat(tiles)[: self.r].to(dtype) / math.sqrt(self.r)
        nbytes = P.numel() * P.element_size()
        if self._cached + nbytes <= self.cache_bytes:
            self._cache[key] = P
            self._cached += nbytes
        return P

    def project_range(self, X: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """X (n, stop-start) holds coordinates [start, stop); returns X @ P[:, start:stop].T."""
        out = torch.zeros(X.shape[0], self.r, dtype=X.dtype, device=X.device)
        b = start // COL_BLOCK
        while b * COL_BLOCK < stop:
            c0, c1 = max(start, b * COL_BLOCK), min(stop, (b + 1) * COL_BLOCK)
            P = self._block(b, X.device, X.dtype)
            out += X[:, c0 - start:c1 - start] @ P[:, c0 - b * COL_BLOCK:c1 - b * COL_BLOCK].T
            b += 1
        return out

    def _compress(self, G):
        return self.project_range(G, 0, self.dim)

    def add_outer(self, out, slot, rows, cols):
        nrow, ncol = slot.matrix_shape
        # Form this layer's per-example gradient a few rows at a time, project, discard.
        step = max(1, self.chunk_elems // max(1, rows.batch * ncol))
        for r0 in range(0, nrow, step):
            r1 = min(nrow, r0 + step)
            ri = torch.arange(r0, r1, device=out.device)
            g = torch.einsum("bti,btj->bij", acc(rows.gather(ri)), cols.full()).reshape(rows.batch, -1)
            out += self.project_range(g.to(out.dtype), slot.offset + r0 * ncol, slot.offset + r1 * ncol)

    def add_vector(self, out, slot, values):
        g = values.flatten(2).sum(1, dtype=out.dtype)
        out += self.project_range(g, slot.offset, slot.stop)
