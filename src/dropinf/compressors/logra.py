"""LoGra: per layer, project the gradient matrix from both sides, P_row g P_colᵀ.

For a linear layer g = Σ_t δ_t a_tᵀ, so P_row g P_colᵀ = Σ_t (P_row δ_t)(P_col a_t)ᵀ: the fused path
projects the output gradients and the inputs (k each) and never forms g. `r` is the per-layer
budget k_row·k_col: k_col = the largest divisor of r not above √r, k_row = r / k_col
(16 → 4×4, 64 → 8×8, 512 → 32×16, 4096 → 64×64), each clipped to the layer's size; vectors
(biases, norms) are n×1 matrices. Output width = Σ over layers of k_row·k_col. Factors are
seeded N(0, 1/k) drawn on the CPU, so they are identical on every device.
"""
from __future__ import annotations

import math

import torch

from ..errors import DropinfError
from ..factors import position_sums
from ..layout import Slot
from .base import ColumnMap, Compressor


def split_budget(r: int) -> tuple[int, int]:
    k_col = max(d for d in range(1, math.isqrt(r) + 1) if r % d == 0)
    return r // k_col, k_col


class LoGra(Compressor):
    name = "logra"
    nests_in_r = False

    def __init__(self, dim, r, seed=0, layout=None):
        if layout is None:
            raise DropinfError("logra needs the parameter layout (layout=, a dropinf.layout.Layout): "
                               "it projects each layer's gradient matrix from both sides")
        super().__init__(dim, r, seed, layout)
        self.k_row, self.k_col = split_budget(self.r)
        self._factors: dict = {}
        self.columns: dict[str, tuple[int, int]] = {}
        start = 0
        for slot in layout.slots:
            nrow, ncol = slot.matrix_shape
            width = min(self.k_row, nrow) * min(self.k_col, ncol)
            self.columns[slot.name] = (start, start + width)
            start += width
        self._out_dim = start

    def _check_r(self):
        if self.r <= 0:
            raise DropinfError(f"logra: r must be positive, got {self.r}")

    @property
    def out_dim(self):
        return self._out_dim

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return list(self.columns.values())

    def column_map(self) -> ColumnMap:
        """Each layer's columns come from its own factors: one column group per parameter tensor."""
        return ColumnMap.from_ranges(self.layout, self.columns, self.out_dim)

    def attrs(self):
        return {**super().attrs(), "k_row": self.k_row, "k_col": self.k_col,
                "factor_seed": "seed*1000003 + slot index (CPU generator)", "columns": self.columns}

    def factors(self, slot: Slot, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (slot.name, str(device), dtype)
        if key not in self._factors:
            i = [s.name for s in self.layout.slots].index(slot.name)
            g = torch.Generator().manual_seed(int(self.seed) * 1000003 + i)
            nrow, ncol = slot.matrix_shape
            kr, kc = min(self.k_row, nrow), min(self.k_col, ncol)
            P_row = torch.randn(kr, nrow, generator=g, dtype=torch.float64) / math.sqrt(kr)
            P_col = torch.randn(kc, ncol, generator=g, dtype=torch.float64) / math.sqrt(kc)
            self._factors[key] = (P_row.to(device, dtype), P_col.to(device, dtype))
        return self._factors[key]

    def _project_matrix(self, g: torch.Tensor, slot: Slot) -> torch.Tensor:
        """g (n, numel) → (n, kr*kc) = P_row · g · P_colᵀ for each row of g."""
        P_row, P_col = self.factors(slot, g.device, g.dtype)
        m = g.reshape(g.shape[0], *slot.matrix_shape)
        return (P_row @ m @ P_col.T).flatten(1)

    def _compress(self, G):
        out = torch.empty(G.shape[0], self.out_dim, dtype=G.dtype, device=G.device)
        for slot in self.layout.slots:
            c0, c1 = self.columns[slot.name]
            out[:, c0:c1] = self._project_matrix(G[:, slot.offset:slot.stop], slot)
        return out

    def slot_columns(self, slot):
        return slice(*self.columns[slot.name])

    def add_outer(self, out, slot, rows, cols):
        P_row, P_col = self.factors(slot, out.device, out.dtype)
        pr, pc = rows.project(P_row), cols.project(P_col)
        c0, c1 = self.columns[slot.name]
        out[:, c0:c1] += torch.einsum("bti,btj->bij", pr, pc).reshape(out.shape[0], -1).to(out.dtype)

    def add_vector(self, out, slot, values):
        c0, c1 = self.columns[slot.name]
        out[:, c0:c1] += self._project_matrix(position_sums(values, out.dtype), slot)
