"""Self-influence and the blockwise pairwise matrix against float64 direct inverses and against
`influence(reduce=False)`, for every solver, dense and Woodbury blocks, chunked and streamed."""
import numpy as np
import pytest
import torch

import dropinf
from dropinf.errors import DropinfError, NonFiniteError
from dropinf.influence import SOLVERS, influence, pairwise_blocks, self_influence

F64 = torch.float64
METHODS = ("orig", "lissa", "datainf", "tracin")


def data(n, k, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=F64), torch.randn(m, k, generator=g, dtype=F64)


def groups(blocks, k):
    return [torch.arange(k)] if blocks is None else [torch.arange(a, b) for a, b in blocks]


def inverse_ref(G, blocks, lams):
    """(H + Lambda)^{-1}, block-diagonal, by a plain dense inverse (reference only)."""
    n, k = G.shape
    A = torch.zeros(k, k, dtype=F64)
    for idx, lam in zip(groups(blocks, k), lams):
        A[idx.unsqueeze(1), idx] = G[:, idx].T @ G[:, idx] / n + lam * torch.eye(len(idx), dtype=F64)
    return torch.linalg.inv(A)


def paper(G, blocks):
    return [0.1 * G[:, idx].square().sum(1).mean().item() / len(idx) for idx in groups(blocks, G.shape[1])]


def assemble(blocks_iter, m, n):
    out = torch.full((m, n), float("nan"), dtype=F64)
    seen = torch.zeros(m, n, dtype=torch.int64)
    for ts, tr, block in blocks_iter:
        assert block.shape == (ts.stop - ts.start, tr.stop - tr.start) and block.device.type == "cpu"
        out[ts, tr] = block
        seen[ts, tr] += 1
    assert (seen == 1).all()  # the blocks tile the matrix exactly once
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n,k", [(60, 20), (10, 30)])  # dense H / Woodbury (n < block width)
@pytest.mark.parametrize("blocks", [None, [(0, 8), (8, 20)]], ids=["global", "layers"])
def test_exact_self_and_pairwise_match_direct_inverse(n, k, blocks):
    if blocks is not None:
        blocks = [(0, 8), (8, k)]
    G, T = data(n, k, seed=n * k)
    Hinv = inverse_ref(G, blocks, paper(G, blocks))
    s = self_influence(G, "orig", blocks=blocks, chunk_rows=7, block_bytes=5 * k * 8)  # several groups
    assert s.shape == (n,) and s.dtype == F64
    assert rel(s, torch.einsum("ik,kl,il->i", G, Hinv, G)) < 1e-10
    assert (s > 0).all()  # positive definite H + lambda I
    P = assemble(pairwise_blocks(G, T, "orig", blocks=blocks, chunk_rows=7, block_bytes=3 * max(n, T.shape[0]) * 8),
                 T.shape[0], n)
    assert rel(P, -T @ Hinv @ G.T) < 1e-10


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,k", [(50, 12), (9, 25)])
def test_every_solver_agrees_with_influence_reduce_false(method, n, k):
    G, T = data(n, k, seed=3 + n)
    blocks = [(0, 5), (5, k)]
    ref = influence(G, T, method, blocks=blocks, reduce=False)  # (n, m)
    P = assemble(pairwise_blocks(G, T, method, blocks=blocks, chunk_rows=4, block_bytes=2 * 8 * max(n, 7),
                                 align=(2, 3)), T.shape[0], n)
    assert rel(P, ref.T) < 1e-12
    # mean over the test rows is the workflow's per-method score
    assert rel(P.mean(0), influence(G, T, method, blocks=blocks)) < 1e-12
    # self-influence = minus the diagonal of the pairwise matrix with train as its own test set
    s = self_influence(G, method, blocks=blocks, chunk_rows=4, block_bytes=3 * 8 * (k + n))
    assert rel(s, -influence(G, G, method, blocks=blocks, reduce=False).diagonal()) < 1e-10


def test_tracin_self_is_squared_norm_and_float_damping_and_explicit_lambdas():
    G, _ = data(40, 10, seed=5)
    assert rel(self_influence(G, "tracin"), G.square().sum(1)) < 1e-14
    lams = [0.3, 2.0]
    blocks = [(0, 4), (4, 10)]
    Hinv = inverse_ref(G, blocks, lams)
    assert rel(self_influence(G, "exact", damping=lams, blocks=blocks), torch.einsum("ik,kl,il->i", G, Hinv, G)) < 1e-10


def test_blocks_from_permuted_index_groups_and_float32():
    G, T = data(30, 9, seed=8)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    blocks = {"a": perm[:4], "b": perm[4:]}
    A = torch.zeros(9, 9, dtype=F64)
    for idx in blocks.values():
        lam = 0.1 * G[:, idx].square().sum(1).mean().item() / len(idx)
        A[idx.unsqueeze(1), idx] = G[:, idx].T @ G[:, idx] / 30 + lam * torch.eye(len(idx), dtype=F64)
    Hinv = torch.linalg.inv(A)
    assert rel(self_influence(G, "orig", blocks=blocks), torch.einsum("ik,kl,il->i", G, Hinv, G)) < 1e-10
    P = assemble(pairwise_blocks(G, T, "orig", blocks=blocks), 7, 30)
    assert rel(P, -T @ Hinv @ G.T) < 1e-10
    s32 = self_influence(G.float(), "orig", blocks=blocks, dtype=torch.float32)
    assert s32.dtype == torch.float32 and rel(s32.double(), torch.einsum("ik,kl,il->i", G, Hinv, G)) < 1e-4


def test_layout_and_stored_attributes_give_the_same_blocks_as_influence():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(40, 5), torch.randint(3, (40,))

    def loss_fn(mod, batch):
        return torch.nn.functional.cross_entropy(mod(batch["x"]), batch["y"], reduction="none")

    ex = dropinf.extraction.Extractor(model, loss_fn, "dropout", r=20, seed=1)
    G = ex.run([{"x": x, "y": y}]).double()
    layered = self_influence(G, "exact", layout=ex.compressor)
    assert rel(layered, -influence(G, G, "exact", layout=ex.compressor, reduce=False).diagonal()) < 1e-10
    assert not torch.allclose(layered, self_influence(G, "exact", blocks="global"))


def test_streams_a_zarr_array_and_names_bad_rows_and_inputs(tmp_path):
    zarr = pytest.importorskip("zarr")
    G, T = data(25, 6, seed=2)
    z = zarr.create_array(store=str(tmp_path / "g.zarr"), shape=G.shape, chunks=(4, 6), dtype="float64")
    z[...] = G.numpy()
    assert rel(self_influence(z, "orig", chunk_rows=4), self_influence(G, "orig")) < 1e-14
    P = assemble(pairwise_blocks(z, T, "orig", chunk_rows=4), 7, 25)
    assert rel(P, influence(G, T, "orig", reduce=False).T) < 1e-14
    bad = G.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="17"):
        self_influence(bad, "orig")
    with pytest.raises(DropinfError, match="unknown method"):
        self_influence(G, "nope")
    with pytest.raises(DropinfError, match="align"):
        pairwise_blocks(G, T, "orig", align=(0, 1))  # checked at the call, before any block
    with pytest.raises(DropinfError, match="damping"):
        self_influence(G, "orig", damping=0.0)
    assert set(METHODS) | {"exact"} <= set(SOLVERS)
    assert dropinf.self_influence is self_influence
    assert np.isfinite(self_influence(G, "lissa", lissa_iters=3).numpy()).all()
