"""Curvature settings (tensor / layer / global) for every method: the layout's grouping, each
compressor's column blocks, and the r-space solve against full-space references.

References are dense and obvious: a block-diagonal H built entry by entry and a plain inverse,
a per-block Gaussian matrix written out whole, the damping formula on a block's own columns.
"""
import math

import pytest
import torch
from torch import nn

import dropinf
from dropinf.compressors.base import column_blocks_from_attrs, split_columns
from dropinf.errors import DropinfError
from dropinf.influence import DampingRangeError, damping_for, influence
from dropinf.layout import Layout, layer_of

F64 = torch.float64
CURVATURES = ("tensor", "layer", "global")

# three layers, five tensors; 'b' has no bias, 'c' is a 1-D parameter of the root module
SHAPES = [("a.weight", (4, 3)), ("a.bias", (4,)), ("b.weight", (2, 4)), ("c.weight", (5, 2)), ("c.bias", (5,))]


def layout():
    return Layout.from_shapes(SHAPES)


def data(n, k, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=F64), torch.randn(m, k, generator=g, dtype=F64)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dense_ref(G, T, groups, lams):
    """-G (H + Lambda)^{-1} v, H block-diagonal over `groups` (lists of columns), built entry by entry."""
    n, k = G.shape
    A = torch.zeros(k, k, dtype=F64)
    for idx, lam in zip(groups, lams):
        idx = torch.as_tensor(idx)
        A[idx.unsqueeze(1), idx] = G[:, idx].T @ G[:, idx] / n + lam * torch.eye(len(idx), dtype=F64)
    return -G @ torch.linalg.inv(A) @ T.mean(0)


def paper(G, groups):
    return [0.1 * G[:, torch.as_tensor(i)].square().sum(1).mean().item() / len(i) for i in groups]


# ---------------------------------------------------------------------------------------------- grouping

def test_layer_is_the_owning_module_weight_and_bias_together():
    L = layout()
    assert [(lab, idx) for lab, idx in L.groups("layer")] == [("a", [0, 1]), ("b", [2]), ("c", [3, 4])]
    assert [idx for _, idx in L.groups("tensor")] == [[0], [1], [2], [3], [4]]
    assert L.groups("global") == [("all parameters", [0, 1, 2, 3, 4])]
    blocks = L.coordinate_blocks("layer")
    assert [b.tolist() for b in blocks.values()] == [list(range(0, 16)), list(range(16, 24)), list(range(24, 39))]
    with pytest.raises(DropinfError, match="curvature must be one of"):
        L.groups("per-layer")


def test_lora_pair_of_one_module_is_one_layer_and_root_parameters_group():
    assert layer_of("base_model.model.enc.0.attn.query.lora_A.default.weight") == "base_model.model.enc.0.attn.query"
    assert layer_of("base_model.model.enc.0.attn.query.lora_B.default.weight") == "base_model.model.enc.0.attn.query"
    assert layer_of("emb.lora_embedding_A.default") == layer_of("emb.lora_embedding_B.default") == "emb"
    assert layer_of("weight") == "(root)"
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(6, 6)
            self.value = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.query(x) + self.value(x))

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    L = Layout.from_model(model)  # tracks the LoRA matrices only
    groups = L.groups("layer")
    assert len(L) == 4 and len(groups) == 2
    assert all(len(idx) == 2 for _, idx in groups)
    assert [lab.rsplit(".", 1)[-1] for lab, _ in groups] == ["query", "value"]


def test_tied_weights_are_one_tensor_in_the_first_owner_layer():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3)
            self.head = nn.Linear(3, 7)
            self.head.weight = self.emb.weight  # tied: named_parameters lists it once, as emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    L = Layout.from_model(Tied())
    assert [s.name for s in L.slots] == ["emb.weight", "head.bias"]
    assert [lab for lab, _ in L.groups("layer")] == ["emb", "head"]


# ---------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("n", [60, 10])  # dense blocks, and Woodbury (n < block width)
def test_dropout_at_r_equal_d_is_orig(curvature, n):
    L = layout()
    G, T = data(n, L.dim, seed=n)
    comp = dropinf.compressor("dropout", dim=L.dim, r=L.dim, seed=3, layout=L)
    C, CT = comp.compress(G), comp.compress(T)
    full = influence(G, T, "orig", blocks=curvature, layout=L)
    drop = influence(C, CT, "exact", blocks=curvature, layout=comp)
    assert rel(drop, full) < 1e-10
    ref = dense_ref(G, T, list(L.coordinate_blocks(curvature).values()),
                    paper(G, list(L.coordinate_blocks(curvature).values())))
    assert rel(full, ref) < 1e-10


@pytest.mark.parametrize("curvature", CURVATURES)
def test_dropout_is_the_restriction_of_block_diagonal_h(curvature):
    """r < d: the r-space system equals H restricted to the kept coordinates, block by block, with
    each block's damping from the formula on its own kept columns."""
    L = layout()
    G, T = data(30, L.dim, seed=5)
    comp = dropinf.compressor("dropout", dim=L.dim, r=11, seed=1, layout=L)
    blocks = comp.column_blocks(curvature)
    kept = comp.indices
    block_of = {}  # the layout block of each coordinate
    for b, cols in enumerate(L.coordinate_blocks(curvature).values()):
        for c in cols.tolist():
            block_of[c] = b
    # by hand: column j goes with every other kept column of the same layout block
    expect = {}
    for j, c in enumerate(kept.tolist()):
        expect.setdefault(block_of[c], []).append(j)
    assert sorted(sorted(v.tolist()) for v in blocks.values()) == sorted(expect.values())
    C, CT = G[:, kept], T[:, kept]
    groups = list(expect.values())
    lams = [0.1 * C[:, g].square().sum(1).mean().item() / len(g) for g in groups]
    assert damping_for(C, blocks=blocks) == pytest.approx(
        [lams[list(expect.values()).index(sorted(v.tolist()))] for v in blocks.values()], rel=1e-12)
    assert rel(influence(C, CT, "exact", blocks=curvature, layout=comp), dense_ref(C, CT, groups, lams)) < 1e-10


def test_any_compressor_with_indices_gets_per_block_columns():
    """A compressor that only keeps (weighted) coordinates, exposing `.indices`: grouped like dropout."""

    class Weighted(dropinf.Compressor):
        name = ""  # not registered

        def __init__(self, dim, r, seed=0, layout=None):
            super().__init__(dim, r, seed, layout)
            self.indices = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))[:r]
            self.w = torch.linspace(0.5, 2.0, r, dtype=F64)

        def _compress(self, G):
            return G[:, self.indices] * self.w.to(G.dtype)

    L = layout()
    comp = Weighted(L.dim, 9, seed=4, layout=L)
    slot_of = L.locate(comp.indices)
    for cols in comp.column_blocks("tensor").values():
        assert slot_of[cols].unique().numel() == 1
    attrs = {"layout": L.to_json(), "compressor_attrs": {**comp.attrs(), "indices": comp.indices.tolist()}}
    got = column_blocks_from_attrs(attrs, "layer")
    assert [v.tolist() for v in got.values()] == [v.tolist() for v in comp.column_blocks("layer").values()]


# ---------------------------------------------------------------------------------------------- Gaussian

def dense_block_projection(comp, L):
    """The per-block Gaussian P (r x d) written out whole, one column at a time through the matrix path."""
    return comp.compress(torch.eye(L.dim, dtype=F64)).T


def test_split_is_proportional_at_least_one_each_and_nests():
    order = split_columns([100, 10, 1000, 1], 40)
    counts = torch.bincount(order, minlength=4).tolist()
    assert sum(counts) == 40 and min(counts) >= 1 and counts[3] == 1
    assert counts[2] > counts[0] > counts[1]
    share = [c / 40 for c in counts]
    assert abs(share[2] - 1000 / 1111) < 0.1
    for r in range(4, 40):
        assert torch.equal(split_columns([100, 10, 1000, 1], r), order[:r])
    assert torch.bincount(split_columns([2, 3], 5)).tolist() == [2, 3]  # capped at each width
    with pytest.raises(DropinfError, match="smaller than the 4 curvature blocks"):
        split_columns([100, 10, 1000, 1], 3)


@pytest.mark.parametrize("curvature", ["tensor", "layer"])
def test_gaussian_per_block_with_full_width_equals_dense_reference(curvature):
    L = layout()
    G, T = data(50, L.dim, seed=9)
    comp = dropinf.compressor("gaussian", dim=L.dim, r=L.dim, seed=2, layout=L, blocks=curvature)
    P = dense_block_projection(comp, L)  # (r, d)
    blocks = comp.column_blocks(curvature)
    coord = L.coordinate_blocks(curvature)
    assert len(blocks) == len(coord)
    # block-diagonal: each block's columns read only its own coordinates, r_b = d_b here
    for (cols, coords) in zip(blocks.values(), coord.values()):
        assert len(cols) == len(coords)
        other = torch.ones(L.dim, dtype=torch.bool)
        other[coords] = False
        assert P[cols][:, other].abs().max() == 0
        assert torch.linalg.matrix_rank(P[cols][:, coords]) == len(coords)
    C, CT = G @ P.T, T @ P.T
    assert rel(comp.compress(G), C) < 1e-12
    groups = [v.tolist() for v in blocks.values()]
    ref = dense_ref(C, CT, groups, paper(C, groups))
    assert rel(influence(C, CT, "exact", blocks=curvature, layout=comp), ref) < 1e-10
    # same blocks from the stored attributes as from the object
    stored = column_blocks_from_attrs({"layout": L.to_json(), "compressor_attrs": comp.attrs()}, curvature)
    assert [v.tolist() for v in stored.values()] == groups


def test_gaussian_per_block_variance_nesting_and_global_mode():
    L = Layout.from_shapes([("x.weight", (300,)), ("y.weight", (700,))])
    big = dropinf.compressor("gaussian", dim=1000, r=40, seed=5, layout=L)
    assert big.blocks == "layer" and big.attrs()["block_columns"] == [12, 28]
    small = dropinf.compressor("gaussian", dim=1000, r=10, seed=5, layout=L)
    G = torch.randn(3, 1000, dtype=F64)
    assert rel(big.nest(big.compress(G), 10), small.compress(G)) < 1e-12
    P = dense_block_projection(big, L)
    cols = big.column_blocks("layer")
    for c, (lo, hi) in zip(cols.values(), [(0, 300), (300, 1000)]):
        assert abs(P[c][:, lo:hi].var().item() * len(c) - 1) < 0.15  # N(0, 1/r_b)
    glob = dropinf.compressor("gaussian", dim=1000, r=40, seed=5, layout=L, blocks="global")
    unlaid = dropinf.compressor("gaussian", dim=1000, r=40, seed=5)
    assert glob.blocks == "global" and torch.equal(glob.compress(G), unlaid.compress(G))
    # a global projection is one block under any curvature; a per-layer one merges under 'global'
    assert [len(v) for v in glob.column_blocks("layer").values()] == [40]
    assert [len(v) for v in big.column_blocks("global").values()] == [40]
    with pytest.raises(DropinfError, match="blocks='global'"):
        dropinf.compressor("gaussian", dim=1000, r=1, seed=0, layout=L)


def test_sjlt_per_block_buckets_mix_only_their_block():
    L = layout()
    comp = dropinf.compressor("sjlt", dim=L.dim, r=9, seed=1, layout=L, mask_factor=2)
    P = comp.compress(torch.eye(L.dim, dtype=F64)).T  # (r, d)
    blocks = comp.column_blocks("layer")
    coord = list(L.coordinate_blocks("layer").values())
    assert len(blocks) == 3 and comp.attrs()["block_columns"] == [len(v) for v in blocks.values()]
    for cols, coords in zip(blocks.values(), coord):
        other = torch.ones(L.dim, dtype=torch.bool)
        other[coords] = False
        assert P[cols][:, other].abs().max() == 0 and P[cols][:, coords].abs().sum() > 0
    stored = column_blocks_from_attrs({"layout": L.to_json(), "compressor_attrs": comp.attrs()}, "layer")
    assert [v.tolist() for v in stored.values()] == [v.tolist() for v in blocks.values()]
    # m == r in global mode: still one block (buckets mix), never dropout's per-coordinate map
    glob = dropinf.compressor("sjlt", dim=L.dim, r=5, seed=1, layout=L, mask_factor=1, blocks="global")
    assert [len(v) for v in glob.column_blocks("tensor").values()] == [5]


def test_logra_blocks_are_its_layers():
    L = layout()
    comp = dropinf.compressor("logra", dim=L.dim, r=4, seed=0, layout=L)
    tensor = comp.column_blocks("tensor")
    assert [tuple(v.tolist()) for v in tensor.values()] == [tuple(range(*comp.columns[s.name])) for s in L.slots]
    layer = comp.column_blocks("layer")
    assert list(layer) == ["a", "b", "c"]
    assert layer["a"].tolist() == list(range(comp.columns["a.weight"][0], comp.columns["a.bias"][1]))
    stored = column_blocks_from_attrs({"layout": L.to_json(), "compressor_attrs": comp.attrs()}, "layer")
    assert [v.tolist() for v in stored.values()] == [v.tolist() for v in layer.values()]


# ---------------------------------------------------------------------------------------------- API

def test_api_default_is_layer_from_layout_or_attrs_and_one_block_without_either():
    L = layout()
    G, T = data(40, L.dim, seed=2)
    layer = influence(G, T, "orig", layout=L)
    assert torch.equal(layer, influence(G, T, "orig", blocks="layer", layout=L))
    assert rel(layer, influence(G, T, "orig", blocks=list(L.coordinate_blocks("layer").values()))) < 1e-13
    assert torch.equal(influence(G, T, "orig"), influence(G, T, "orig", blocks=None))  # nothing recorded

    class Stored:  # what a zarr array of the extract stage offers: shape, dtype, rows, attrs
        def __init__(self, x):
            self.x, self.shape, self.dtype = x, x.shape, x.dtype
            self.attrs = {"layout": L.to_json(), "compressor_attrs": {"compressor": "identity", "out_dim": L.dim}}

        def __getitem__(self, s):
            return self.x[s]

    assert rel(influence(Stored(G), T, "orig"), layer) < 1e-13
    assert rel(influence(Stored(G), T, "orig", blocks="global"), influence(G, T, "orig", blocks=None)) < 1e-13
    with pytest.raises(DropinfError, match="covers 39 coordinates"):
        influence(G[:, :10], T[:, :10], "orig", layout=L)


@pytest.mark.parametrize("dtype,lam", [(torch.float32, 1e300), (torch.float32, 1e-60), (torch.float64, 1e-320)])
def test_damping_outside_the_solve_dtype_is_one_clear_error(dtype, lam):
    L = layout()
    G, T = data(20, L.dim, seed=1)
    with pytest.raises(DampingRangeError, match=r"block 0 \(a, 16 columns\).*lambda=.*outside the range") as e:
        influence(G, T, "orig", damping=lam, dtype=dtype, layout=L)
    assert isinstance(e.value, ValueError)


def test_paper_damping_that_overflows_float32_names_the_block():
    L = layout()
    G, T = data(20, L.dim, seed=1)
    G[:, 16:24] *= 1e25  # block 'b': mean ||g||^2 ~ 1e51 overflows float32
    with pytest.raises(DampingRangeError, match=r"\(b, 8 columns\).*'paper' damping"):
        influence(G, T, "datainf", dtype=torch.float32, layout=L)
    assert math.isfinite(influence(G, T, "datainf", layout=L).sum().item())  # float64 holds it


# ---------------------------------------------------------------------------------------------- extraction

def _mlp_and_batches(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=g, dtype=F64), torch.randint(3, (40,), generator=g)
    batches = [{"x": x[s:s + 16], "y": y[s:s + 16]} for s in range(0, 40, 16)]
    return model, batches


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


@pytest.mark.parametrize("name,blocks", [("gaussian", "layer"), ("gaussian", "tensor"), ("gaussian", "global"),
                                         ("sjlt", "layer"), ("sjlt", "global")])
def test_fused_per_block_projection_equals_matrix_path_and_scores_by_its_blocks(name, blocks):
    from dropinf.extraction import Extractor

    model, batches = _mlp_and_batches()
    raw = Extractor(model, _loss, "identity")
    G = raw.run(batches)
    ex = Extractor(model, _loss, name, r=12, seed=3, blocks=blocks)
    C = ex.run(batches)
    assert ex.compressor.blocks == blocks
    assert rel(C, ex.compressor.compress(G)) < 1e-10
    T = C[:8]
    groups = [v.tolist() for v in ex.compressor.column_blocks(blocks).values()]
    assert len(groups) == {"layer": 3, "tensor": 6, "global": 1}[blocks]
    ref = dense_ref(C, T, groups, paper(C, groups))
    assert rel(influence(C, T, "exact", blocks=blocks, layout=ex.compressor), ref) < 1e-10


@pytest.mark.parametrize("curvature", CURVATURES)
def test_extracted_dropout_at_full_width_is_orig_through_the_documented_api(curvature):
    from dropinf.extraction import Extractor

    model, batches = _mlp_and_batches(1)
    raw = Extractor(model, _loss, "identity")
    G = raw.run(batches)
    ex = Extractor(model, _loss, "dropout", r=raw.layout.dim, seed=2)
    C = ex.run(batches)
    full = influence(G, G[:8], "orig", blocks=curvature, layout=raw.layout)
    kept = influence(C, C[:8], "exact", blocks=curvature, layout=ex.compressor)
    assert rel(kept, full) < 1e-10


def test_blocks_of_dropinf_extract_output_from_a_rebuilt_compressor():
    """`dropinf.extract` returns a plain tensor; the same compressor, rebuilt from the model's layout and
    the seed, gives the blocks of its columns."""
    model, batches = _mlp_and_batches(2)
    C = dropinf.extract(model, _loss, batches, "gaussian", r=9, seed=4)
    L = Layout.from_model(model)
    comp = dropinf.compressor("gaussian", dim=L.dim, r=9, seed=4, layout=L)
    raw = dropinf.extract(model, _loss, batches, "identity")
    assert rel(C, comp.compress(raw)) < 1e-10
    groups = [v.tolist() for v in comp.column_blocks().values()]
    assert len(groups) == 3
    assert rel(influence(C, C[:5], "exact", layout=comp), dense_ref(C, C[:5], groups, paper(C, groups))) < 1e-10


@pytest.mark.parametrize("method", ["exact", "datainf", "lissa"])
def test_a_block_with_all_zero_train_gradients_adds_exactly_nothing(method):
    """Dropout can keep a coordinate no training example touches (an unused embedding row): the
    paper's damping of that block is 0, yet its term is 0 for any damping, so scores equal those
    without the block (instead of a singular solve)."""
    g = torch.Generator().manual_seed(7)
    G = torch.randn(30, 9, generator=g, dtype=torch.float64)
    T = torch.randn(5, 9, generator=g, dtype=torch.float64)
    G[:, 3:5] = 0.0  # block 1: zero over train, not over test
    blocks = [(0, 3), (3, 5), (5, 9)]
    keep = torch.tensor([0, 1, 2, 5, 6, 7, 8])
    with pytest.warns(UserWarning, match="all-zero gradients over train"):
        got = dropinf.influence(G, T, method, blocks=blocks)
    if method != "lissa":
        want = dropinf.influence(G[:, keep], T[:, keep], method, blocks=[(0, 3), (3, 7)])
    else:  # LiSSA's power-iteration start depends on the column layout: same columns, any damping there
        lam = [0.1 * float(G[:, lo:hi].square().sum()) / (30 * (hi - lo)) for lo, hi in blocks]
        want = dropinf.influence(G, T, method, blocks=blocks, damping=[lam[0], 123.0, lam[2]])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
