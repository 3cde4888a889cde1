"""Influence solvers against dense references, streaming/chunking invariance, sign, and input errors."""
import pytest
import torch

from dropinf.errors import DropinfError, NonFiniteError, NotPositiveDefiniteError, ShapeError
from dropinf.influence import SOLVERS, Solver, damping_for, influence

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def data(n, k, m=5, seed=0, dtype=F64):
    g = gen(seed)
    return torch.randn(n, k, generator=g, dtype=dtype), torch.randn(m, k, generator=g, dtype=dtype)


def groups_of(blocks, k):
    """Blocks as lists of column index tensors (None -> one global group)."""
    if blocks is None:
        return [torch.arange(k)]
    return [b if isinstance(b, torch.Tensor) else torch.arange(*b) for b in blocks]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dense_ref(G, T, blocks, lams, reduce=True):
    """-G (H + Lambda)^{-1} V with a dense block-diagonal H and a plain inverse (reference only)."""
    n, k = G.shape
    A = torch.zeros(k, k, dtype=F64)
    for idx, lam in zip(groups_of(blocks, k), lams):
        A[idx.unsqueeze(1), idx] = G[:, idx].T @ G[:, idx] / n + lam * torch.eye(len(idx), dtype=F64)
    V = T.mean(0, keepdim=True).T if reduce else T.T
    out = -G @ torch.linalg.inv(A) @ V
    return out[:, 0] if reduce else out


def paper_lambdas(G, blocks):
    return [0.1 * G[:, idx].square().sum(1).mean().item() / len(idx) for idx in groups_of(blocks, G.shape[1])]


# ---------------------------------------------------------------------------------------------- orig

@pytest.mark.parametrize("n,k", [(80, 24), (12, 40)])  # n > k: dense H; n < k: Woodbury (block 1 in per-layer)
@pytest.mark.parametrize("blocks", [None, [(0, 10), (10, 40)]], ids=["global", "layers"])
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("woodbury", ["auto", True, False])
def test_orig_matches_dense_inverse(n, k, blocks, reduce, woodbury):
    if blocks is not None and k == 24:
        blocks = [(0, 10), (10, 24)]
    G, T = data(n, k, seed=n + k)
    out = influence(G, T, "orig", blocks=blocks, reduce=reduce, woodbury=woodbury)
    ref = dense_ref(G, T, blocks, paper_lambdas(G, blocks), reduce)
    assert out.shape == ((n,) if reduce else (n, T.shape[0])) and out.dtype == F64
    assert rel(out, ref) < 1e-10


def test_exact_alias_and_float_damping():
    G, T = data(30, 12, seed=1)
    out = influence(G, T, "exact", damping=0.37)
    assert rel(out, dense_ref(G, T, None, [0.37])) < 1e-10
    assert torch.equal(out, influence(G, T, "orig", damping=0.37))


def test_woodbury_path_is_taken_when_n_below_width(monkeypatch):
    from dropinf.influence import Exact

    calls = []
    orig_w = Exact._woodbury
    monkeypatch.setattr(Exact, "_woodbury", lambda self, which, V: calls.append(which) or orig_w(self, which, V))
    G, T = data(10, 30, seed=2)
    influence(G, T, "orig", blocks=[(0, 5), (5, 30)])
    assert calls == [[1]]  # the 25-wide block (> n = 10) only


def test_index_group_blocks_equal_permuted_ranges():
    # dropout blocks are index groups (columns not grouped by layer): scoring permuted columns with
    # index groups must equal scoring the un-permuted columns with ranges
    G, T = data(40, 18, seed=3)
    perm = torch.randperm(18, generator=gen(3))
    inv = torch.argsort(perm)  # column j of G is column inv[j] of G[:, perm]
    ranges = [(0, 5), (5, 11), (11, 18)]
    groups = [inv[lo:hi] for lo, hi in ranges]
    for method in ("orig", "lissa", "datainf"):
        a = influence(G, T, method, blocks=ranges)
        b = influence(G[:, perm], T[:, perm], method, blocks=groups)
        assert rel(b, a) < 1e-12, method
    Gp, Tp = G[:, perm], T[:, perm]
    assert rel(influence(Gp, Tp, "orig", blocks=groups), dense_ref(Gp, Tp, groups, paper_lambdas(Gp, groups))) < 1e-10


# ---------------------------------------------------------------------------------------------- lissa

def lissa_ref(G, T, blocks, lams, scales, iters, reduce):
    n, k = G.shape
    out = torch.zeros(n, 1 if reduce else T.shape[0], dtype=F64)
    V = T.mean(0, keepdim=True).T if reduce else T.T
    for idx, lam, c in zip(groups_of(blocks, k), lams, scales):
        A = G[:, idx].T @ G[:, idx] / n + lam * torch.eye(len(idx), dtype=F64)
        v = V[idx]
        s = v.clone()
        for _ in range(iters):
            s = v + s - A @ s / c
        out -= G[:, idx] @ (s / c)
    return out[:, 0] if reduce else out


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("blocks", [None, [(0, 6), (6, 16)]], ids=["global", "layers"])
def test_lissa_matches_dense_recurrence(blocks, reduce):
    G, T = data(50, 16, seed=4)
    nb = 1 if blocks is None else 2
    scales = [7.0, 9.5][:nb]
    out = influence(G, T, "lissa", blocks=blocks, reduce=reduce, lissa_iters=7, lissa_scale=scales)
    ref = lissa_ref(G, T, blocks, paper_lambdas(G, blocks), scales, 7, reduce)
    assert rel(out, ref) < 1e-12


def test_lissa_default_scale_converges_to_orig():
    # default scale = 1.1 (power-iteration lambda_max + lambda) must make the iteration contract
    G, T = data(60, 20, seed=5)
    blocks = [(0, 8), (8, 20)]
    exact = influence(G, T, "orig", damping=1.0, blocks=blocks)
    assert rel(influence(G, T, "lissa", damping=1.0, blocks=blocks, lissa_iters=150), exact) < 1e-9
    assert rel(influence(G, T, "lissa", damping=1.0, blocks=blocks), exact) < 0.2  # 10 iterations: rough


# ---------------------------------------------------------------------------------------------- datainf, tracin

@pytest.mark.parametrize("reduce", [True, False])
def test_datainf_matches_loop(reduce):
    G, T = data(25, 9, m=3, seed=6)
    blocks = [(0, 4), (4, 9)]
    lams = paper_lambdas(G, blocks)
    out = influence(G, T, "datainf", blocks=blocks, reduce=reduce)
    n = G.shape[0]
    cols = [T.mean(0)] if reduce else list(T)
    ref = torch.zeros(n, len(cols), dtype=F64)
    for j, t in enumerate(cols):
        for (lo, hi), lam in zip(blocks, lams):
            v = t[lo:hi]
            x = torch.zeros(hi - lo, dtype=F64)
            for i in range(n):  # the formula, one example at a time
                g = G[i, lo:hi]
                x += v - g * (g @ v) / (lam + g @ g)
            x /= n * lam
            ref[:, j] -= G[:, lo:hi] @ x
    assert rel(out, ref[:, 0] if reduce else ref) < 1e-12


def test_tracin_is_minus_dot_with_mean_test():
    G, T = data(20, 7, seed=7)
    G[:, 3:] = 0  # all-zero block: 'paper' damping would be 0, but tracin ignores damping
    assert rel(influence(G, T, "tracin", blocks=[(0, 3), (3, 7)]), -G @ T.mean(0)) < 1e-14
    assert rel(influence(G, T, "tracin", reduce=False), -G @ T.T) < 1e-14


# ---------------------------------------------------------------------------------------------- damping

def test_damping_paper_formula_and_floats():
    G, _ = data(33, 10, seed=8)
    G[:, 7:] *= 5  # blocks of very different scale get different lambdas
    blocks = [(0, 3), (3, 7), (7, 10)]
    hand = [0.1 * (G[:, lo:hi] ** 2).sum().item() / 33 / (hi - lo) for lo, hi in blocks]
    assert damping_for(G, blocks) == pytest.approx(hand, rel=1e-13)
    assert damping_for(G, blocks, chunk_rows=4) == pytest.approx(hand, rel=1e-13)
    assert damping_for(G, None) == pytest.approx([0.1 * (G ** 2).sum().item() / 33 / 10], rel=1e-13)
    assert damping_for(G, blocks, 0.25) == [0.25, 0.25, 0.25]
    assert damping_for(G, blocks, [0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]


def test_per_block_float_damping_used_as_is():
    G, T = data(30, 10, seed=9)
    blocks, lams = [(0, 4), (4, 10)], [0.3, 2.0]
    assert rel(influence(G, T, "orig", damping=lams, blocks=blocks), dense_ref(G, T, blocks, lams)) < 1e-10


# ---------------------------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("method", ["orig", "lissa", "datainf", "tracin"])
@pytest.mark.parametrize("n,k", [(23, 11), (9, 30)])  # (9, 30): orig takes the Woodbury path
def test_chunking_does_not_change_results(method, n, k):
    G, T = data(n, k, seed=10)
    blocks = [(0, 5), (5, k)]
    outs = [influence(G, T, method, blocks=blocks, reduce=False, chunk_rows=c) for c in (1, 7, n)]
    for o in outs[:2]:
        assert (o - outs[2]).abs().max().item() <= 1e-12 * outs[2].abs().max().item()


@pytest.mark.parametrize("method", ["orig", "lissa", "datainf", "tracin"])
def test_zarr_and_numpy_train_match_tensor(method, tmp_path):
    zarr = pytest.importorskip("zarr")
    G, T = data(31, 12, seed=11)
    z = zarr.create_array(store=str(tmp_path / "g.zarr"), shape=G.shape, chunks=(7, 12), dtype="float64")
    z[:] = G.numpy()
    ref = influence(G, T, method, blocks=[(0, 4), (4, 12)])
    assert torch.equal(influence(z, T, method, blocks=[(0, 4), (4, 12)], chunk_rows=7), influence(
        G, T, method, blocks=[(0, 4), (4, 12)], chunk_rows=7))
    assert rel(influence(z, T.numpy(), method, blocks=[(0, 4), (4, 12)]), ref) < 1e-13
    assert rel(influence(G.numpy(), T.numpy(), method, blocks=[(0, 4), (4, 12)]), ref) < 1e-13


def test_float32_inputs_and_float32_math():
    G, T = data(40, 16, seed=12, dtype=torch.float32)
    ref = influence(G, T, "orig")  # float32 storage, float64 math
    assert ref.dtype == F64
    assert rel(ref, dense_ref(G.double(), T.double(), None, paper_lambdas(G.double(), None))) < 1e-10
    out = influence(G, T, "orig", dtype=torch.float32)
    assert out.dtype == torch.float32 and rel(out.double(), ref) < 1e-4


# ---------------------------------------------------------------------------------------------- sign

def test_sign_toy_mean_estimation():
    # Model: one parameter theta, loss l(theta; z) = (theta - z)^2 / 2, gradient g = theta - z.
    # Train points {-1, +1, -3, +3, 0} have mean 0, so theta* = 0 and g_i = -z_i. One test point at
    # z = +1: v = theta* - 1 = -1. Up-weighting z = -3 pulls theta toward -3, away from the test
    # point, so the test loss rises: harmful, influence must be POSITIVE. Up-weighting z = +3 pulls
    # theta toward the test point: helpful, NEGATIVE. Indeed I = -v (H + lambda)^{-1} g = -(-1)(-z)/c
    # = -z/c with c > 0. (A training gradient equal to v itself, g_k = v, i.e. z = +1, is helpful:
    # -v^T A^{-1} v < 0 for any positive definite A.)
    z = torch.tensor([-1.0, 1.0, -3.0, 3.0, 0.0], dtype=F64)
    G = (0.0 - z).unsqueeze(1)
    T = torch.tensor([[0.0 - 1.0]], dtype=F64)
    scores = influence(G, T, "orig")
    assert scores[2] > 0 and scores[0] > 0  # z = -3, -1: harmful
    assert scores[3] < 0 and scores[1] < 0  # z = +3, +1: helpful
    assert scores[4] == 0
    assert scores[2] == pytest.approx(3 * scores[0])
    # same convention in gradient space: a train gradient along -v is harmful, along +v helpful
    Gr, Tr = data(50, 8, seed=13)
    v = Tr.mean(0)
    Gr[0], Gr[1] = -v, v
    for method in ("orig", "lissa", "datainf", "tracin"):
        s = influence(Gr, Tr, method)
        assert s[0] > 0 > s[1], method


# ---------------------------------------------------------------------------------------------- registry

def test_registry_and_new_solver():
    assert {"orig", "exact", "lissa", "datainf", "tracin"} <= set(SOLVERS)
    assert SOLVERS["orig"] is SOLVERS["exact"]
    try:
        class Identity(Solver):  # (H + lambda I)^{-1} := lambda^{-1} I, just to show registration
            names = ("test-identity",)

            def solve(self, V):
                return V / self.p.per_column(self.p.lambdas())

        G, T = data(20, 6, seed=14)
        out = influence(G, T, "test-identity", damping=2.0)
        assert rel(out, -G @ T.mean(0) / 2.0) < 1e-14
        with pytest.raises(DropinfError, match="already registered"):
            class Clash(Solver):
                names = ("test-identity",)
    finally:
        SOLVERS.pop("test-identity", None)


# ---------------------------------------------------------------------------------------------- errors

class CountingRows:
    """Array-like that counts row reads, to show validation happens before any pass over train."""

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, 0

    def __getitem__(self, s):
        self.reads += 1
        return self.x[s]


def _raises(exc, *fragments, train=None, test=None, method="orig", **kw):
    G, T = data(12, 6, seed=15)
    train = CountingRows(G if train is None else train)
    with pytest.raises(exc) as info:
        influence(train, T if test is None else test, method, **kw)
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))
    return train.reads


def test_shape_errors():
    G, T = data(12, 6, seed=16)
    _raises(ShapeError, "(12,)", train=G[:, 0])
    _raises(ShapeError, "(2, 3, 6)", test=torch.zeros(2, 3, 6, dtype=F64))
    _raises(ShapeError, "(12, 6)", "(5, 4)", test=T[:, :4])
    _raises(ShapeError, "float32", "float64", test=T.float())
    _raises(ShapeError, "int64", "float", train=torch.ones(12, 6, dtype=torch.long), test=torch.ones(2, 6, dtype=torch.long))
    _raises(ShapeError, "(0, 6)", "no examples", train=G[:0])
    _raises(ShapeError, "test", "no examples", test=T[:0])


def test_nonfinite_errors_name_global_rows():
    G, T = data(12, 6, seed=17)
    G[5, 2] = float("nan")
    G[9, 0] = float("inf")
    for chunk in (1, 2, 4, None):  # the index is the row in the whole array, whatever the chunking
        with pytest.raises(NonFiniteError, match=r"train.*\[5") as info:
            influence(G, T, "orig", chunk_rows=chunk)
        assert "[5" in str(info.value)
    G[5, 2] = 0.0
    with pytest.raises(NonFiniteError, match=r"\[9\]"):
        influence(G, T, "lissa", chunk_rows=2)
    T[3, 1] = float("-inf")
    assert _raises(NonFiniteError, "test", "[3]", test=T) == 0  # before any read of train


@pytest.mark.parametrize("kw,fragments", [
    (dict(method="influence2"), ["influence2", "orig", "lissa", "datainf", "tracin"]),
    (dict(blocks=[(0, 3), (3, 7)]), ["block 1", "[0, 6)"]),
    (dict(blocks=[(0, 4), (3, 6)]), ["block 1", "overlaps block 0", "column 3"]),
    (dict(blocks=[(0, 2), (3, 6)]), ["[2]", "no block"]),
    (dict(blocks=[(3, 3), (0, 6)]), ["block 0", "non-empty"]),
    (dict(blocks=[(0, 3), torch.tensor([3, 4, 4, 5])]), ["block 1", "more than once"]),
    (dict(blocks=[(0, 3), torch.tensor([3.0, 4.0, 5.0])]), ["block 1", "integer"]),
    (dict(blocks=[(0, 3), torch.tensor([3, 4, 9])]), ["block 1", "column 9"]),
    (dict(blocks=[(0, 3), (3, 4, 6)]), ["block 1", "(start, stop)"]),
    (dict(blocks=[]), ["empty"]),
    (dict(damping=0.0), ["damping", "positive"]),
    (dict(damping=-1.0), ["damping", "positive"]),
    (dict(damping=float("nan")), ["damping", "positive"]),
    (dict(damping="fisher"), ["'paper'", "fisher"]),
    (dict(damping=[0.1, 0.2]), ["2 values", "1 blocks"]),
    (dict(method="lissa", lissa_scale=-2.0), ["lissa_scale", "positive"]),
    (dict(lissa_iters=0), ["lissa_iters"]),
    (dict(chunk_rows=0), ["chunk_rows"]),
    (dict(dtype=torch.float16), ["float16"]),
    (dict(woodbury="yes"), ["woodbury"]),
])
def test_bad_arguments_fail_before_reading_train(kw, fragments):
    assert _raises(DropinfError, *fragments, **kw) == 0


@pytest.mark.parametrize("method", ["orig", "lissa", "datainf"])
def test_zero_block_with_paper_damping_names_block(method):
    # its term is exactly 0 for any damping (test_curvature checks the scores); it is named, not fatal
    G, T = data(12, 6, seed=18)
    G[:, 2:4] = 0
    with pytest.warns(UserWarning, match=r"block 1 \(columns 2:4\).*all-zero"):
        scores = influence(G, T, method, blocks=[(0, 2), (2, 4), (4, 6)])
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("woodbury", [False, True])
def test_cholesky_failure_names_block_and_damping(woodbury):
    # two identical all-ones columns: H = [[1, 1], [1, 1]] exactly, and lambda = 1e-300 vanishes
    # next to 1 in float64, so the damped system is exactly singular for both code paths
    G = torch.ones(4, 2, dtype=F64)
    T = torch.ones(1, 2, dtype=F64)
    with pytest.raises(NotPositiveDefiniteError, match=r"block 0.*1e-300.*larger damping"):
        influence(G, T, "orig", damping=1e-300, woodbury=woodbury)
