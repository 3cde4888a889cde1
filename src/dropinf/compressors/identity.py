"""Raw per-example gradients (for the full-space methods orig/LiSSA/DataInf/TracIn)."""
from __future__ import annotations

import torch

from ..errors import BudgetError, DropinfError
from ..factors import position_sums
from .base import Compressor


class Identity(Compressor):
    name = "identity"

    def __init__(self, dim, r=None, seed=0, layout=None, budget_bytes: int = 4 << 30):
        super().__init__(dim, dim if r is None else r, seed, layout)
        self.budget_bytes = int(budget_bytes)

    def _check_r(self):
        if self.r != self.dim:
            raise DropinfError(f"identity: r must equal dim={self.dim} (got {self.r})")

    def check_budget(self, n: int) -> None:
        need = int(n) * self.dim * 4
        if need > self.budget_bytes:
            raise BudgetError(
                f"identity: {n} examples x {self.dim} coordinates x 4 bytes = {need / 2**30:.2f} GiB "
                f"exceeds the budget of {self.budget_bytes / 2**30:.2f} GiB (budget_bytes); "
                "use a compressor (dropout, gaussian, logra, sjlt) or raise the budget")

    def nest(self, Y, r):
        raise NotImplementedError("identity has no r to nest")

    def _compress(self, G):
        self.check_budget(G.shape[0])
        return G.clone()

    def slot_columns(self, slot):
        return slice(slot.offset, slot.stop)

    def add_outer(self, out, slot, rows, cols):
        g = torch.einsum("bti,btj->bij", rows.full(), cols.full())
        out[:, slot.offset:slot.stop] += g.reshape(g.shape[0], -1).to(out.dtype)

    def add_vector(self, out, slot, values):
        out[:, slot.offset:slot.stop] += position_sums(values, out.dtype)
