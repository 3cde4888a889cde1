"""GraSS-style compression: a random mask to m coordinates, then a sparse Johnson-Lindenstrauss
transform (one ±1 per masked coordinate, into one of r buckets). Pure PyTorch; the fused path is
dropout's gather followed by a signed scatter-add."""
from __future__ import annotations

import torch

from .dropout import Dropout, permutation_prefix


class SJLT(Dropout):
    name = "sjlt"
    nests_in_r = False

    def __init__(self, dim, r, seed=0, layout=None, mask_factor: int = 8, chunk_elems: int = 1 << 26):
        self.r_out = int(r)
        self.mask_factor = int(mask_factor)
        super().__init__(dim, r, seed, layout, chunk_elems)
        # Re-draw the mask at m = min(dim, mask_factor * r) coordinates, then the hash.
        self.m = min(self.dim, self.mask_factor * self.r_out)
        self.indices = permutation_prefix(self.dim, self.m, self.seed)
        g = torch.Generator().manual_seed(int(self.seed) ^ 0x5EED)
        self.buckets = torch.randint(self.r_out, (self.m,), generator=g)
        self.signs = torch.randint(2, (self.m,), generator=g).float() * 2 - 1

    @property
    def out_dim(self):
        return self.r_out

    def _targets(self):
        return self.buckets

    def _weights(self):
        return self.signs

    def attrs(self):
        a = super().attrs()
        a.update(mask_size=self.m, mask_factor=self.mask_factor, hash_seed=int(self.seed) ^ 0x5EED)
        del a["indices"]  # reproducible from the seed; m can be large
        return a

    def nest(self, Y, r):
        raise NotImplementedError("sjlt does not nest in r: its buckets depend on r")
