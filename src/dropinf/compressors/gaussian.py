"""Gaussian random projection P (r x dim), i.i.d. N(0, 1/r), seeded, never stored whole.

P is defined tile by tile: rows in groups of ROW_GROUP, columns in blocks of COL_BLOCK; each
tile comes from its own generator seeded by (seed, row group, column block), so any column range
can be produced alone (fused path: one layer at a time) and rows nest: P at r' < r is the first
r' rows of P at r (up to the 1/sqrt(r) scale, which `nest` undoes).
Tiles are drawn on the device that computes; CPU and CUDA generators differ, so a projection
is reproducible per device type (recorded in attrs).

`blocks` ('layer' default, 'tensor' or 'global'): with more than one curvature block of the layout,
each block gets its own projection P_b (r_b x d_b, N(0, 1/r_b), its own tiles), r split across
blocks in proportion to width (`split_columns`, at least one each, recorded in attrs), so the
r-space curvature can be block-diagonal like the full-space one. The split is a prefix-stable
order, so per-block projections still nest in r (`nest` rescales each block's columns).
'global' (or a layout of one block) is the single projection above.
"""
from __future__ import annotations

import math

import torch

from ..factors import acc, position_sums
from .base import ColumnMap, Compressor, ProjectionBlocks

ROW_GROUP = 64
COL_BLOCK = 1 << 15


def _tile_seed(seed: int, group: int, block: int, curvature_block: int | None = None) -> int:
    extra = 0 if curvature_block is None else (curvature_block + 1) * 0x27D4EB2F
    return (int(seed) * 0x9E3779B1 + group * 0x85EBCA77 + block * 0xC2B2AE3D + extra) % (1 << 62)


class Gaussian(Compressor):
    name = "gaussian"
    nests_in_r = True
    graph_safe = False  # draws its projection tiles per batch unless they all fit in the cache

    def __init__(self, dim, r, seed=0, layout=None, blocks: str = "layer", cache_bytes: int = 2 << 30,
                 chunk_elems: int = 1 << 26):
        super().__init__(dim, r, seed, layout)
        self.cache_bytes, self.chunk_elems = int(cache_bytes), int(chunk_elems)
        self.blocks_requested = blocks
        self.proj = ProjectionBlocks.build(self.require_layout(), blocks, self.r, "gaussian")
        self._cache: dict = {}
        self._cached = 0

    @property
    def blocks(self) -> str:
        """The projection's structure actually used: 'global' when there is one block."""
        return "global" if self.proj is None else self.proj.mode

    def attrs(self):
        a = {**super().attrs(), "projection": "N(0, 1/r) tiles", "row_group": ROW_GROUP,
             "col_block": COL_BLOCK, "tile_seed": "(seed*0x9E3779B1 + g*0x85EBCA77 + b*0xC2B2AE3D) mod 2^62",
             "blocks": "global", "blocks_requested": self.blocks_requested}
        if self.proj is not None:
            a.update(self.proj.attrs(self.layout), projection="per block: N(0, 1/r_b) tiles of its own",
                     tile_seed="(seed*0x9E3779B1 + g*0x85EBCA77 + b*0xC2B2AE3D + (block+1)*0x27D4EB2F) mod 2^62")
        return a

    def column_map(self) -> ColumnMap:
        return super().column_map() if self.proj is None else self.proj.column_map()

    def nest(self, Y, r):
        if self.proj is None:
            return Y[:, :r] * math.sqrt(self.r / r)
        if r < len(self.proj.widths):
            raise ValueError(f"gaussian: r={r} is below the {len(self.proj.widths)} blocks of blocks={self.blocks!r}")
        big = torch.tensor(self.proj.counts(), dtype=Y.dtype, device=Y.device)
        small = torch.tensor(self.proj.counts(r), dtype=Y.dtype, device=Y.device)
        own = self.proj.owner[:r].to(Y.device)
        return Y[:, :r] * (big / small).sqrt()[own]

    def _block(self, b: int, device, dtype, cblock: int | None = None) -> torch.Tensor:
        """Columns [b*COL_BLOCK, ...) of P (or of curvature block `cblock`'s own P_b), shape
        (rows, width), scaled by 1/sqrt(rows)."""
        key = (b, cblock, str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        rows = self.r if cblock is None else len(self.proj.columns[cblock])
        full = self.dim if cblock is None else self.proj.widths[cblock]
        c0 = b * COL_BLOCK
        width = min(COL_BLOCK, full - c0)
        gen = torch.Generator(device=device)
        tiles = []
        for g in range(math.ceil(rows / ROW_GROUP)):
            gen.manual_seed(_tile_seed(self.seed, g, b, cblock))
            tiles.append(torch.randn(ROW_GROUP, width, generator=gen, device=device, dtype=torch.float32))
        P = torch.cat(tiles)[:rows].to(dtype) / math.sqrt(rows)
        nbytes = P.numel() * P.element_size()
        if self._cached + nbytes <= self.cache_bytes:
            self._cache[key] = P
            self._cached += nbytes
        return P

    def _columns(self, blk: int, device) -> torch.Tensor:
        """Output columns of curvature block `blk`, kept on `device` (no host copy per batch)."""
        key = ("columns", blk, str(device))
        if key not in self._cache:
            self._cache[key] = self.proj.columns[blk].to(device)
        return self._cache[key]

    def _project_local(self, X, start: int, stop: int, cblock: int | None) -> torch.Tensor:
        """X (n, stop-start) holds columns [start, stop) of P (or of P_cblock); returns X @ those.T."""
        rows = self.r if cblock is None else len(self.proj.columns[cblock])
        out = torch.zeros(X.shape[0], rows, dtype=X.dtype, device=X.device)
        b = start // COL_BLOCK
        while b * COL_BLOCK < stop:
            c0, c1 = max(start, b * COL_BLOCK), min(stop, (b + 1) * COL_BLOCK)
            P = self._block(b, X.device, X.dtype, cblock)
            out += X[:, c0 - start:c1 - start] @ P[:, c0 - b * COL_BLOCK:c1 - b * COL_BLOCK].T
            b += 1
        return out

    def project_range(self, X: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """X (n, stop-start) holds coordinates [start, stop); returns X @ P[:, start:stop].T (n, r)."""
        if self.proj is None:
            return self._project_local(X, start, stop, None)
        out = torch.zeros(X.shape[0], self.r, dtype=X.dtype, device=X.device)
        for slot in self.layout.slots:
            a, b = max(start, slot.offset), min(stop, slot.stop)
            if a >= b:
                continue
            blk, off = self.proj.where[slot.name]
            local = off + a - slot.offset
            y = self._project_local(X[:, a - start:b - start], local, local + b - a, blk)
            out.index_add_(1, self._columns(blk, X.device), y)
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
        g = position_sums(values, out.dtype)
        out += self.project_range(g, slot.offset, slot.stop)
