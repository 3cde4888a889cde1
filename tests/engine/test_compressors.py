"""Compressor matrix paths: nesting, reproducibility, bad input."""
import math

import pytest
import torch

import dropinf
from dropinf.compressors.dropout import permutation_prefix
from dropinf.layout import Layout


def test_dropout_nests_in_r_and_is_reproducible():
    big = dropinf.compressor("dropout", dim=1000, r=64, seed=7)
    small = dropinf.compressor("dropout", dim=1000, r=16, seed=7)
    assert torch.equal(small.indices, big.indices[:16])
    assert torch.equal(big.indices, dropinf.compressor("dropout", dim=1000, r=64, seed=7).indices)
    assert not torch.equal(big.indices, dropinf.compressor("dropout", dim=1000, r=64, seed=8).indices)
    assert big.indices.unique().numel() == 64 and big.indices.dtype == torch.long
    G = torch.randn(5, 1000)
    assert torch.equal(big.compress(G), G[:, big.indices])
    assert torch.equal(big.nest(big.compress(G), 16), small.compress(G))


def test_dropout_stream_sampler_for_huge_dim_nests_and_is_distinct():
    dim = (1 << 24) + 12345  # above the randperm switch: seeded stream of first occurrences
    a, b = permutation_prefix(dim, 3000, 5), permutation_prefix(dim, 1000, 5)
    assert torch.equal(a[:1000], b) and a.unique().numel() == 3000 and int(a.max()) < dim


def test_dropout_is_uniform():
    counts = torch.zeros(20)
    for s in range(2000):
        counts[dropinf.compressor("dropout", dim=20, r=5, seed=s).indices] += 1
    expected = 2000 * 5 / 20
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


def test_gaussian_nests_and_has_right_variance():
    G = torch.randn(3, 70000, dtype=torch.float64)  # spans several column blocks
    big = dropinf.compressor("gaussian", dim=70000, r=80, seed=3)
    small = dropinf.compressor("gaussian", dim=70000, r=16, seed=3)
    assert torch.allclose(big.nest(big.compress(G), 16), small.compress(G), rtol=1e-12, atol=1e-12)
    # E||P g||^2 = ||g||^2 for N(0, 1/r) entries
    e = torch.zeros(400, 70000, dtype=torch.float64)
    e[torch.arange(400), torch.arange(400) * 170] = 1.0  # unit vectors across the column blocks
    ratio = big.compress(e).pow(2).sum(1).mean()
    assert abs(ratio.item() - 1) < 0.05


def test_logra_blocks_and_budget_split():
    layout = Layout.from_shapes([("w", (10, 6)), ("b", (10,)), ("e", (3, 2))])
    c = dropinf.compressor("logra", dim=layout.dim, r=16, seed=0, layout=layout)
    assert (c.k_row, c.k_col) == (4, 4)
    assert c.blocks == [(0, 16), (16, 20), (20, 26)] and c.out_dim == 26  # 4x4, 4x1, 3x2
    with pytest.raises(dropinf.DropinfError, match="layout"):
        dropinf.compressor("logra", dim=10, r=4)


def test_sjlt_is_signed_bucket_sum_of_mask():
    c = dropinf.compressor("sjlt", dim=500, r=8, seed=1, mask_factor=4)
    G = torch.randn(4, 500, dtype=torch.float64)
    want = torch.zeros(4, 8, dtype=torch.float64)
    for j in range(c.m):
        want[:, c.buckets[j]] += c.signs[j] * G[:, c.indices[j]]
    assert torch.allclose(c.compress(G), want)


@pytest.mark.parametrize("name", ["dropout", "gaussian", "sjlt"])
@pytest.mark.parametrize("r", [0, -1, 101])
def test_bad_r_is_refused(name, r):
    with pytest.raises(dropinf.DropinfError, match="r must"):
        dropinf.compressor(name, dim=100, r=r)


def test_compress_shape_and_dtype_errors():
    c = dropinf.compressor("dropout", dim=10, r=3)
    with pytest.raises(dropinf.errors.ShapeError, match=r"\(n, 10\)"):
        c.compress(torch.randn(4, 11))
    with pytest.raises(dropinf.errors.ShapeError, match="floating"):
        c.compress(torch.ones(4, 10, dtype=torch.long))
    with pytest.raises(dropinf.DropinfError, match="unknown compressor"):
        dropinf.compressor("bogus", dim=10, r=3)


def test_identity_budget():
    c = dropinf.compressor("identity", dim=1000, r=1000, budget_bytes=1000)
    with pytest.raises(dropinf.errors.BudgetError, match="budget"):
        c.compress(torch.randn(3, 1000))


def test_an_unnamed_subclass_does_not_take_over_its_parents_registry_name():
    from dropinf.compressors import COMPRESSORS
    from dropinf.compressors.dropout import Dropout

    class Variant(Dropout):  # inherits name = "dropout"
        pass

    assert COMPRESSORS["dropout"] is Dropout and Variant not in COMPRESSORS.values()
