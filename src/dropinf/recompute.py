"""Raw per-example gradients as a lazy (n, d) array, recomputed on demand instead of stored.

Storing raw gradients costs n * d * 4 bytes (ResNet-9 on 10,000 images: 245 GiB), but the
full-space solvers of `dropinf.influence` only ever read the training matrix in row chunks, a fixed
number of passes each (tracin 1; datainf 3; lissa 2 + power iterations + iterations; orig's Woodbury
blocks one sweep per panel). `RecomputedGradients` answers each row slice `[a:b]` with one fused
identity pass of the model over examples a..b-1, so those solvers run exactly, in the memory of one
chunk, at the price of one gradient pass per solver pass. Rows are bitwise those of the stored
identity extraction when batches line up, and equal up to float32 summation order otherwise.

`passes` and `seconds` record what the recomputation cost, for honest timings.
"""
from __future__ import annotations

import time

import torch

from .errors import DropinfError
from .extraction import Extractor
from .progress import bar


class RecomputedGradients:
    """(n, d) per-example gradients of `loss_fn(model, batch)` over the rows of `split`.

    split: dict of equally long tensors (model inputs), as the workflow's `model_inputs` gives.
    batch_size: examples per fused pass; a slice is computed in batches of this size.
    Slicing returns a tensor on the extractor's device (float32, float64 for a float64 model).
    """

    def __init__(self, model, loss_fn, split: dict, *, params=None, device=None, batch_size: int = 64):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DropinfError(f"recompute batch_size must be a positive int, got {batch_size!r}")
        lengths = {k: int(v.shape[0]) for k, v in split.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise DropinfError(f"recompute: split tensors must be non-empty and equally long, got lengths {lengths}")
        self.split, self.batch_size = split, batch_size
        # the budget guards storing all n rows; here at most one slice is held at a time
        self.extractor = Extractor(model, loss_fn, "identity", params=params, device=device,
                                   budget_bytes=1 << 62)
        self.layout = self.extractor.layout
        self.n, self.d = next(iter(lengths.values())), self.layout.dim
        self.shape = (self.n, self.d)
        self.dtype = torch.float64 if self.extractor.named[0][1].dtype == torch.float64 else torch.float32
        self.device = self.extractor.device
        self.rows_computed = 0
        self.seconds = 0.0

    @property
    def passes(self) -> float:
        """Rows computed so far, in units of the whole split."""
        return self.rows_computed / self.n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> torch.Tensor:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise DropinfError(f"RecomputedGradients supports contiguous row slices [a:b] only, got {key!r}")
        a, b, _ = key.indices(self.n)
        b = max(a, b)
        return self.rows(a, b)

    def rows(self, a: int, b: int) -> torch.Tensor:
        from .pipeline.train import Batches

        out = torch.empty(b - a, self.d, dtype=self.dtype, device=self.device)
        if b == a:
            return out

        def sink(start, rows):
            out[start:start + rows.shape[0]] = rows

        t0 = time.perf_counter()
        # a slice of one batch is a step of its reader's pass (whose bar counts it): no bar of its own
        self.extractor.run(Batches(self.split, self.batch_size, indices=torch.arange(a, b)), sink=sink,
                           progress=None if b - a > self.batch_size else False, desc="recompute gradients")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.rows_computed += b - a
        return out

    def mean(self, chunk_rows: int | None = None) -> torch.Tensor:
        """(1, d) float64 mean row, accumulated chunk by chunk (the test vector v of the solvers)."""
        step = chunk_rows or self.batch_size
        acc = torch.zeros(self.d, dtype=torch.float64, device=self.device)
        for a in bar(range(0, self.n, step), desc="recompute gradients (mean row)", unit="chunk"):
            acc += self.rows(a, min(self.n, a + step)).sum(0, dtype=torch.float64)
        return (acc / self.n).unsqueeze(0)
