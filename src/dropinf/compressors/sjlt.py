"""GraSS-style compression: a random mask to m coordinates, then a sparse Johnson-Lindenstrauss
transform (one ±1 per masked coordinate, into one of r buckets). The fused path is dropout's: on
CUDA the gather-dot kernel adding signed products into the buckets atomically, else gathers
followed by a signed scatter-add.

`blocks` ('layer' default, 'tensor', 'global'): with more than one curvature block, block b gets
r_b of the r buckets (split in proportion to width, at least one each: `split_columns`) and its own
mask of min(d_b, mask_factor * r_b) of its coordinates, hashed only into its own buckets, so each
bucket mixes coordinates of one block and the r-space curvature can be block-diagonal.
"""
from __future__ import annotations

import torch

from .base import ColumnMap, ProjectionBlocks
from .dropout import CHUNK_ELEMS, Dropout, permutation_prefix


class SJLT(Dropout):
    name = "sjlt"
    nests_in_r = False

    def __init__(self, dim, r, seed=0, layout=None, mask_factor: int = 8, blocks: str = "layer",
                 chunk_elems: int = CHUNK_ELEMS):
        self.r_out = int(r)
        self.mask_factor = int(mask_factor)
        super().__init__(dim, r, seed, layout, chunk_elems)
        self.blocks_requested = blocks
        self.proj = ProjectionBlocks.build(self.require_layout(), blocks, self.r_out, "sjlt")
        g = torch.Generator().manual_seed(int(self.seed) ^ 0x5EED)
        if self.proj is None:
            # Re-draw the mask at m = min(dim, mask_factor * r) coordinates, then the hash.
            self.m = min(self.dim, self.mask_factor * self.r_out)
            self.indices = permutation_prefix(self.dim, self.m, self.seed)
            self.buckets = torch.randint(self.r_out, (self.m,), generator=g)
            self.signs = torch.randint(2, (self.m,), generator=g).float() * 2 - 1
            return
        idx, buckets, signs = [], [], []
        for b, (slots, width, cols) in enumerate(zip(self.proj.slots, self.proj.widths, self.proj.columns)):
            coords = torch.cat([torch.arange(self.layout.slots[i].offset, self.layout.slots[i].stop) for i in slots])
            m_b = min(width, self.mask_factor * cols.numel())
            idx.append(coords[permutation_prefix(width, m_b, self.seed * 1000003 + b)])
            buckets.append(cols[torch.randint(cols.numel(), (m_b,), generator=g)])
            signs.append(torch.randint(2, (m_b,), generator=g).float() * 2 - 1)
        self.indices, self.buckets, self.signs = torch.cat(idx), torch.cat(buckets), torch.cat(signs)
        self.m = int(self.indices.numel())

    @property
    def blocks(self) -> str:
        return "global" if self.proj is None else self.proj.mode

    def column_map(self) -> ColumnMap:
        # buckets mix coordinates: never the per-coordinate map of dropout, even when m == r
        return ColumnMap.single(self.layout, self.r_out) if self.proj is None else self.proj.column_map()

    @property
    def out_dim(self):
        return self.r_out

    def _targets(self):
        return self.buckets

    def _weights(self):
        return self.signs

    def attrs(self):
        a = super().attrs()
        a.update(mask_size=self.m, mask_factor=self.mask_factor, hash_seed=int(self.seed) ^ 0x5EED,
                 blocks="global", blocks_requested=self.blocks_requested)
        del a["indices"]  # reproducible from the seed; m can be large
        if self.proj is not None:
            a.update(self.proj.attrs(self.layout), mask_seed="seed*1000003 + block (per block)")
        return a

    def nest(self, Y, r):
        raise NotImplementedError("sjlt does not nest in r: its buckets depend on r")
