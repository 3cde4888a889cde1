"""The compressor interface and its registry.

A compressor maps per-example gradients in the flat coordinate space (see `dropinf.layout`)
to `out_dim` columns. It has two paths that must agree:

* the matrix path `compress(G)`, given full gradients G of shape (n, dim);
* the fused path, called by the extraction engine once per (parameter, module call) with the
  *factors* of that parameter's per-example gradient, so the full gradient is never formed:
  - `add_outer(out, slot, rows, cols)`: the parameter's gradient viewed as a matrix
    (`slot.matrix_shape`) is  g[b] = sum_t rows[b, t, :] (outer) cols[b, t, :];
  - `add_vector(out, slot, values)`: a vector parameter, g[b] = sum_t values[b, t, :].
  Both add the compressed contribution into `out` (B, out_dim), float32.
Compressors are linear, so a parameter used by several modules (tied weights) or called several
times simply accumulates contributions.

Adding a compressor = one new module with a subclass that sets `name`; `__init_subclass__`
registers it.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import DropinfError, ShapeError
from ..layout import Layout, Slot

COMPRESSORS: dict[str, type["Compressor"]] = {}


class Compressor:
    name: ClassVar[str] = ""
    #: True when the first r' columns at r are exactly the output at r' < r (same seed).
    nests_in_r: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            COMPRESSORS[cls.name] = cls

    def __init__(self, dim: int, r: int, seed: int = 0, layout: Layout | None = None):
        dim, r = int(dim), int(r)
        if dim <= 0:
            raise DropinfError(f"{self.name}: dim must be positive, got {dim}")
        if layout is not None and layout.dim != dim:
            raise ShapeError(f"{self.name}: layout covers {layout.dim} coordinates but dim={dim}")
        self.dim, self.r, self.seed, self.layout = dim, r, int(seed), layout
        self._check_r()

    def _check_r(self) -> None:
        if self.r <= 0 or self.r > self.dim:
            raise DropinfError(f"{self.name}: r must be in [1, dim={self.dim}], got r={self.r}")

    # ---- description -------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        return self.r

    def attrs(self) -> dict:
        """JSON-able description stored next to compressed arrays (provenance)."""
        return {"compressor": self.name, "dim": self.dim, "r": self.r, "seed": self.seed,
                "out_dim": self.out_dim}

    # ---- matrix path ---------------------------------------------------------------------
    def compress(self, G: torch.Tensor) -> torch.Tensor:
        if G.dim() != 2 or G.shape[1] != self.dim:
            raise ShapeError(f"{self.name}.compress: expected a tensor of shape (n, {self.dim}), got {tuple(G.shape)}")
        if not G.is_floating_point():
            raise ShapeError(f"{self.name}.compress: expected a floating-point tensor, got {G.dtype}")
        return self._compress(G)

    def _compress(self, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- fused path ----------------------------------------------------------------------
    def add_outer(self, out: torch.Tensor, slot: Slot, rows, cols) -> None:
        raise NotImplementedError

    def add_vector(self, out: torch.Tensor, slot: Slot, values: torch.Tensor) -> None:
        raise NotImplementedError

    def require_layout(self) -> Layout:
        if self.layout is None:
            self.layout = Layout.from_shapes([("flat", (self.dim,))])
        return self.layout

    @classmethod
    def prepare_options(cls, options: dict, *, model, loss_fn, train_loader, params=None, device=None) -> dict:
        """Options completed from the model and the training split, once per extraction job, before
        the per-seed compressors are built (default: unchanged). Every seed and both splits of a job
        are then built from the same returned options (e.g. data-dependent sampling weights)."""
        return dict(options)


def compressor(name: str, dim: int, r: int, seed: int = 0, **opts) -> Compressor:
    """Build a registered compressor by name (see `COMPRESSORS`)."""
    try:
        cls = COMPRESSORS[name]
    except KeyError:
        raise DropinfError(f"unknown compressor {name!r}; known: {sorted(COMPRESSORS)}") from None
    return cls(dim=dim, r=r, seed=seed, **opts)
