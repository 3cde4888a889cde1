"""The compressor interface and its registry.

A compressor maps per-example gradients in the flat coordinate space (see `dropinf.layout`)
to `out_dim` columns. It has two paths that must agree:

* the matrix path `compress(G)`, given full gradients G of shape (n, dim);
* the fused path, called by the extraction engine once per (parameter, module call) with the
  *factors* of that parameter's per-example gradient, so the full gradient is never formed:
  - `add_outer(out, slot, rows, cols)`: the parameter's gradient viewed as a matrix
    (`slot.matrix_shape`) is  g[b] = sum_t rows[b, t, :] (outer) cols[b, t, :];
  - `add_vector(out, slot, values)`: a vector parameter, g[b] = sum_t values[b, t, :] (values: a
    tensor or `factors.PositionSums`, read through `factors.position_sums`);
  - `add_layer(out, rows, cols, outer=, diagonal=, row_sums=, col_sums=)`: a layer's parameters that
    share one pair of factors (a weight and its bias), in one call. By default it is one of the two
    calls above per parameter; dropout's kernel adds them all in one launch.
  All add the compressed contribution into `out` (B, out_dim), float32.
Compressors are linear, so a parameter used by several modules (tied weights) or called several
times simply accumulates contributions.

Adding a compressor = one new module with a subclass that sets `name`; `__init_subclass__`
registers it.

Column blocks: `column_blocks(curvature)` groups the output columns into the curvature blocks the
r-space solve uses (`dropinf.influence(..., blocks=...)`). It is derived from a `ColumnMap`: which
column group each output column belongs to and which parameter slots each group draws from.
A compressor with `.indices` whose column j is (a multiple of) coordinate indices[j] (dropout and
its relatives) maps each column to the slot of its coordinate; raw gradients likewise; compressors
that mix coordinates (Gaussian, SJLT, LoGra) say which slots each of their columns mixes. A curvature
block is then the columns whose slots lie in one block of the layout's grouping; a column group
spanning several such blocks (a global projection) merges them, so the solve is never finer than
what the compression kept apart. The same map is rebuilt from stored array attributes
(`column_blocks_from_attrs`), so the score stage needs no compressor object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import DropinfError, InvalidValueError, ShapeError
from ..factors import Dense, product_sums
from ..layout import Layout, Slot, check_curvature

COMPRESSORS: dict[str, type["Compressor"]] = {}
#: seeds feed torch/numpy generators: non-negative and below 2**63
SEED_MAX = 2**63 - 1


def strict_int(value, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int when it is an integer (an int, a numpy integer, or an integral float such
    as 16.0); a bool, a fractional number or a non-number raises InvalidValueError naming `what`."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        out = int(value)
    elif float(value).is_integer():
        out = int(value)
    else:
        raise InvalidValueError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and out < minimum:
        raise InvalidValueError(f"{what} must be >= {minimum}, got {out}")
    if maximum is not None and out > maximum:
        raise InvalidValueError(f"{what} must be <= {maximum}, got {out}")
    return out


@dataclass
class ColumnMap:
    """owner[j]: the column group of output column j; groups[g]: the slot indices group g draws from."""

    owner: torch.Tensor
    groups: list[list[int]]

    @classmethod
    def per_slot(cls, layout: Layout, coordinates: torch.Tensor) -> "ColumnMap":
        """Column j is coordinate coordinates[j] (up to a weight): its group is its slot."""
        return cls(layout.locate(coordinates), [[i] for i in range(len(layout))])

    @classmethod
    def from_ranges(cls, layout: Layout, columns: dict, out_dim: int) -> "ColumnMap":
        """Slot name -> its (start, stop) output columns (LoGra)."""
        owner = torch.full((out_dim,), -1, dtype=torch.long)
        for i, s in enumerate(layout.slots):
            lo, hi = columns[s.name]
            owner[lo:hi] = i
        if (owner < 0).any():
            raise DropinfError(f"column ranges leave output columns {torch.nonzero(owner < 0).flatten()[:5].tolist()} "
                               f"without a parameter")
        return cls(owner, [[i] for i in range(len(layout))])

    @classmethod
    def single(cls, layout: Layout, out_dim: int) -> "ColumnMap":
        return cls(torch.zeros(out_dim, dtype=torch.long), [list(range(len(layout)))])

    def blocks(self, layout: Layout, curvature: str = "layer") -> dict[str, torch.Tensor]:
        """label -> output columns (1-D int64, ascending) of each curvature block, in layout order."""
        check_curvature(curvature)
        grouping = layout.groups(curvature)
        block_of_slot = torch.empty(len(layout), dtype=torch.long)
        for b, (_, slots) in enumerate(grouping):
            block_of_slot[slots] = b
        parent = list(range(len(grouping)))  # union-find over layout blocks joined by one column group

        def root(b):
            while parent[b] != b:
                parent[b] = parent[parent[b]]
                b = parent[b]
            return b

        for slots in self.groups:
            bs = sorted({int(block_of_slot[i]) for i in slots})
            for b in bs[1:]:
                parent[root(b)] = root(bs[0])
        roots = torch.tensor([root(b) for b in range(len(grouping))], dtype=torch.long)
        group_root = torch.tensor([int(roots[block_of_slot[g[0]]]) if g else -1 for g in self.groups],
                                  dtype=torch.long)
        col_root = group_root[self.owner]
        out = {}
        for r in sorted(set(roots.tolist())):
            cols = torch.nonzero(col_root == r).flatten()
            if cols.numel() == 0:
                continue  # no kept column comes from this block (dropout at small r)
            members = [grouping[b][0] for b in range(len(grouping)) if int(roots[b]) == r]
            if len(members) == len(grouping) and len(grouping) > 1:
                label = "all parameters"
            elif len(members) <= 3:
                label = " + ".join(members)
            else:
                label = f"{members[0]} + {len(members) - 1} more"
            out[label] = cols
        return out


def split_columns(widths, r: int) -> torch.Tensor:
    """Block of each of r output columns, r split across blocks in proportion to their widths.

    Every block gets one column, then each further column goes to the block with the highest
    width / (columns + 1/2) (Webster / Sainte-Lague highest averages; ties to the earlier block),
    never more columns than a block is wide. The columns come in that order, so the split at r' < r
    is the first r' columns of the split at r: projections built on it nest in r.
    """
    import heapq

    widths = [int(w) for w in widths]
    if r < len(widths):
        raise DropinfError(f"r={r} is smaller than the {len(widths)} curvature blocks, and each block needs at "
                           f"least one column; raise r or use blocks='global' (one projection of all parameters; workflow: "
                           f"extract.compressor_options.<compressor>.blocks: global)")
    if r > sum(widths):
        raise DropinfError(f"r={r} exceeds the {sum(widths)} coordinates of the blocks")
    order, seats = list(range(len(widths))), [1] * len(widths)
    heap = [(-w / 1.5, b) for b, w in enumerate(widths) if w > 1]
    heapq.heapify(heap)
    while len(order) < r:
        _, b = heapq.heappop(heap)
        order.append(b)
        seats[b] += 1
        if seats[b] < widths[b]:
            heapq.heappush(heap, (-widths[b] / (seats[b] + 0.5), b))
    return torch.tensor(order, dtype=torch.long)


@dataclass
class ProjectionBlocks:
    """Per-block projections: block b projects the concatenation of its slots (width d_b) to the
    output columns `columns[b]` (r_b of them, split by `split_columns`)."""

    mode: str
    labels: list[str]
    slots: list[list[int]]
    widths: list[int]
    owner: torch.Tensor            # (r,) block of each output column
    columns: list[torch.Tensor]    # block -> its output columns, ascending
    where: dict[str, tuple[int, int]]  # slot name -> (block, offset of the slot inside its block)

    @classmethod
    def build(cls, layout: Layout, mode: str, r: int, who: str) -> "ProjectionBlocks | None":
        """None when the mode gives one block (then the compressor's single projection applies)."""
        check_curvature(mode, f"{who} blocks")
        grouping = layout.groups(mode)
        if len(grouping) == 1:
            return None
        widths, where = [], {}
        for b, (_, idx) in enumerate(grouping):
            off = 0
            for i in idx:
                where[layout.slots[i].name] = (b, off)
                off += layout.slots[i].numel
            widths.append(off)
        try:
            owner = split_columns(widths, r)
        except DropinfError as e:
            raise DropinfError(f"{who} with blocks={mode!r}: {e}") from None
        return cls(mode, [g[0] for g in grouping], [g[1] for g in grouping], widths, owner,
                   [torch.nonzero(owner == b).flatten() for b in range(len(grouping))], where)

    def counts(self, r: int | None = None) -> list[int]:
        """Columns per block at r (default: all of them)."""
        own = self.owner if r is None else self.owner[:r]
        return torch.bincount(own, minlength=len(self.widths)).tolist()

    def column_map(self) -> ColumnMap:
        return ColumnMap(self.owner, self.slots)

    def attrs(self, layout: Layout) -> dict:
        return {"blocks": self.mode, "block_labels": self.labels, "block_widths": self.widths,
                "block_columns": self.counts(),
                "column_map": {"owner": self.owner.tolist(),
                               "groups": [[layout.slots[i].name for i in g] for g in self.slots]}}


def column_map_from_attrs(attrs: dict) -> tuple[Layout, ColumnMap]:
    """The layout and column map of a stored array from its attributes (the extract stage writes
    `layout`, `dim`, `out_dim` and `compressor_attrs`)."""
    if "layout" not in attrs or "compressor_attrs" not in attrs:
        raise DropinfError("the array's attributes hold no 'layout'/'compressor_attrs': cannot tell which "
                           "curvature block its columns belong to (written by `dropinf extract`?)")
    layout = Layout.from_json(attrs["layout"])
    ca = attrs["compressor_attrs"]
    out_dim = int(ca.get("out_dim", attrs.get("out_dim")))
    if "column_map" in ca:  # compressors that mix coordinates record their map
        names = {s.name: i for i, s in enumerate(layout.slots)}
        cm = ca["column_map"]
        return layout, ColumnMap(torch.tensor(cm["owner"], dtype=torch.long),
                                 [[names[n] for n in g] for g in cm["groups"]])
    if isinstance(ca.get("columns"), dict):  # LoGra: a column range per slot
        return layout, ColumnMap.from_ranges(layout, ca["columns"], out_dim)
    if ca.get("indices") is not None and len(ca["indices"]) == out_dim:
        return layout, ColumnMap.per_slot(layout, torch.tensor(ca["indices"], dtype=torch.long))
    if ca.get("compressor") == "identity" and out_dim == layout.dim:
        return layout, ColumnMap.per_slot(layout, torch.arange(layout.dim))
    return layout, ColumnMap.single(layout, out_dim)


def column_blocks_from_attrs(attrs: dict, curvature: str = "layer") -> dict[str, torch.Tensor]:
    """Curvature blocks of a stored gradient array's columns (see `Compressor.column_blocks`)."""
    layout, cmap = column_map_from_attrs(attrs)
    return cmap.blocks(layout, curvature)


class Compressor:
    name: ClassVar[str] = ""
    #: True when the first r' columns at r are exactly the output at r' < r (same seed).
    nests_in_r: ClassVar[bool] = False
    #: True when the output is a linear map of the gradient (`compress(G)` exists): the extraction's
    #: self-check compares it against autograd. Accumulators that are not (a probe's squares) say False.
    linear: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # only a class naming itself registers: a subclass that inherits "dropout" must not replace it
        if cls.__dict__.get("name"):
            COMPRESSORS[cls.name] = cls

    def __init__(self, dim: int, r: int, seed: int = 0, layout: Layout | None = None):
        dim = strict_int(dim, f"{self.name}: dim", minimum=1)
        r = strict_int(r, f"{self.name}: r")
        seed = strict_int(seed, f"{self.name}: seed", minimum=0, maximum=SEED_MAX)
        if layout is not None and layout.dim != dim:
            raise ShapeError(f"{self.name}: layout covers {layout.dim} coordinates but dim={dim}")
        self.dim, self.r, self.seed, self.layout = dim, r, seed, layout
        self._check_r()

    def _check_r(self) -> None:
        if self.r <= 0 or self.r > self.dim:
            raise InvalidValueError(f"{self.name}: r must be in [1, dim={self.dim}], got r={self.r}")

    # ---- description -------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        return self.r

    def attrs(self) -> dict:
        """JSON-able description stored next to compressed arrays (provenance)."""
        return {"compressor": self.name, "dim": self.dim, "r": self.r, "seed": self.seed,
                "out_dim": self.out_dim}

    # ---- curvature blocks of the output columns -------------------------------------------
    def column_map(self) -> ColumnMap:
        """Which slots each output column draws from. Default: column j is coordinate indices[j]
        when the compressor keeps coordinates (`.indices`, one per column), raw coordinates when
        out_dim == dim, else one group drawing from every slot (solved as one block)."""
        layout = self.require_layout()
        idx = getattr(self, "indices", None)
        if isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.numel() == self.out_dim:
            return ColumnMap.per_slot(layout, idx)
        if self.name == "identity" and self.out_dim == self.dim:
            return ColumnMap.per_slot(layout, torch.arange(self.dim))
        return ColumnMap.single(layout, self.out_dim)

    def column_blocks(self, curvature: str = "layer") -> dict[str, torch.Tensor]:
        """label -> output columns of each curvature block ('tensor', 'layer' or 'global'), for
        `dropinf.influence(..., blocks=...)`. Never finer than the compression keeps apart."""
        return self.column_map().blocks(self.require_layout(), curvature)

    def slot_columns(self, slot: Slot) -> slice:
        """The output columns `add_outer`/`add_vector` may write for `slot` (default: all of them).
        The self-check keeps per-slot records on these columns only: with raw gradients a record of
        every column per slot would cost (number of slots) x dim values."""
        return slice(0, self.out_dim)

    def reads(self, slot: Slot) -> bool:
        """Whether any output column depends on `slot`'s coordinates (default: yes). Where not (a
        tensor none of whose coordinates dropout keeps), the fused step does not hook its module, and
        its backward stops below the lowest module that is read."""
        return True

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

    def add_layer(self, out: torch.Tensor, rows, cols, *, outer: Slot | None = None, diagonal: Slot | None = None,
                  row_sums: Slot | None = None, col_sums: Slot | None = None) -> None:
        """The parameters of one layer call whose gradients all come from one pair of factors:
        `outer` g = Σ_t rows ⊗ cols (a weight); `diagonal` g = Σ_t rows · cols, column by column (a
        norm layer's weight against x̂); `row_sums` g = Σ_t rows and `col_sums` g = Σ_t cols (a
        bias: then that factor is `Dense`). Slots left None are not added."""
        add_layer_terms(self, out, rows, cols, layer_terms(outer, diagonal, row_sums, col_sums))

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


#: `add_layer`'s terms, in the order a layer's slots are added
LAYER_TERMS = ("outer", "diagonal", "row_sums", "col_sums")


def layer_terms(outer=None, diagonal=None, row_sums=None, col_sums=None) -> tuple[tuple[str, Slot], ...]:
    """`add_layer`'s slots as ((term, slot), ...), without the ones left None."""
    return tuple((k, s) for k, s in zip(LAYER_TERMS, (outer, diagonal, row_sums, col_sums)) if s is not None)


def add_layer_term(comp, out: torch.Tensor, rows, cols, term: str, slot: Slot) -> None:
    """One of `add_layer`'s terms through `add_outer` / `add_vector` (the reference for a fused one)."""
    if term == "outer":
        comp.add_outer(out, slot, rows, cols)
    elif term == "diagonal":
        comp.add_vector(out, slot, product_sums(rows, cols))
    else:
        factor = rows if term == "row_sums" else cols
        if type(factor) is not Dense:
            raise TypeError(f"add_layer: {term} needs a Dense factor, got {type(factor).__name__}")
        comp.add_vector(out, slot, factor.x)


def add_layer_terms(comp, out: torch.Tensor, rows, cols, terms) -> None:
    for term, slot in terms:
        add_layer_term(comp, out, rows, cols, term, slot)


def compressor(name: str, dim: int, r: int, seed: int = 0, **opts) -> Compressor:
    """Build a registered compressor by name (see `COMPRESSORS`)."""
    try:
        cls = COMPRESSORS[name]
    except KeyError:
        raise InvalidValueError(f"unknown compressor {name!r}; known: {sorted(COMPRESSORS)}") from None
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "dim", "r", "seed")]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise InvalidValueError(f"compressor {name}: unknown option(s) {unknown}; allowed: {accepted}")
    if r is not None:
        r = strict_int(r, f"compressor {name}: r")
    return cls(dim=dim, r=r, seed=strict_int(seed, f"compressor {name}: seed", minimum=0, maximum=SEED_MAX), **opts)
