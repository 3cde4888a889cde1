"""A compressor defined outside dropinf, registered by being imported (config `plugins: [toy_strided]`).

It keeps r evenly spaced coordinates, shifted by the seed and by its option `phase`: a plain
subsample, so the fused paths of `Dropout` (which it extends) apply unchanged.
"""
from __future__ import annotations

import torch

from dropinf.compressors.dropout import Dropout


class ToyStrided(Dropout):
    name = "toy_strided"
    nests_in_r = False

    def __init__(self, dim, r, seed=0, layout=None, phase: int = 0):
        self.phase = int(phase)
        super().__init__(dim, r, seed, layout)

    def _draw(self) -> torch.Tensor:
        step = max(1, self.dim // self.r)
        return (self.seed + self.phase + torch.arange(self.r) * step) % self.dim
