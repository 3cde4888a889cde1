"""Lazy gradient factors against dense references: a convolution's sampled taps against F.unfold of
the zero-padded input, and BatchNorm's per-channel sums on some channels against all of them."""
import pytest
import torch
import torch.nn.functional as F

from dropinf import modules
from dropinf.compressors.base import Compressor
from dropinf.factors import Dense, PositionSums, Unfold, position_sums

GEOMETRIES = [  # kernel, stride, dilation, padding (top, bottom, left, right), groups
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1),
    ((4, 2), (1, 1), (1, 1), (1, 2, 0, 1), 1),   # "same" with an even extent: one more at the end
    ((3, 3), (2, 2), (2, 1), (2, 2, 1, 1), 2),
    ((1, 5), (1, 3), (1, 1), (0, 0, 3, 0), 3),
    ((2, 2), (1, 1), (1, 1), (0, 0, 0, 0), 1),
]


@pytest.mark.parametrize("kernel,stride,dilation,padding,groups", GEOMETRIES)
def test_sampled_taps_equal_unfold_of_the_padded_input(kernel, stride, dilation, padding, groups):
    g = torch.Generator().manual_seed(sum(kernel) + groups)
    x = torch.randn(3, 6, 7, 9, generator=g, dtype=torch.float64)
    f = Unfold(x, kernel, stride, dilation, padding, groups=groups)
    top, bottom, left, right = padding
    xp = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(xp, kernel, dilation=dilation, stride=stride)  # (B, C·kh·kw, L)
    want = cols.view(3, groups, f.width, -1).transpose(2, 3).reshape(3, f.length, f.width)
    idx = torch.randperm(f.width, generator=g)[: max(1, f.width // 2)]
    assert torch.equal(f.gather(idx), want[:, :, idx])
    assert torch.equal(f.full(), want)
    assert f.x.data_ptr() == x.data_ptr()  # no padded copy is kept



@pytest.mark.parametrize("kernel,stride,dilation,padding,groups", GEOMETRIES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_an_index_made_once_reads_the_taps_of_every_batch(kernel, stride, dilation, padding, groups, layout):
    """`index` is computed for one batch and reused for others of the same geometry (as a
    compressor caches it); `take` and `take_last` agree with F.unfold on each, whatever the strides."""
    g = torch.Generator().manual_seed(7 * sum(kernel) + groups)
    first = Unfold(torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64), kernel, stride, dilation, padding,
                   groups=groups)
    idx = torch.randperm(first.width, generator=g)[: max(1, first.width // 2)]
    index = first.index(idx)
    top, bottom, left, right = padding
    for _ in range(3):
        x = torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        f = Unfold(x, kernel, stride, dilation, padding, groups=groups)
        assert f.index_key == first.index_key
        cols = F.unfold(F.pad(x, (left, right, top, bottom)), kernel, dilation=dilation, stride=stride)
        want = cols.view(2, groups, f.width, -1).transpose(2, 3).reshape(2, f.length, f.width)[:, :, idx]
        assert torch.equal(f.take(index), want)
        last = f.take_last(index)
        assert torch.equal(last, want.transpose(1, 2))
        assert f.positions_last == (groups == 1)
        if f.positions_last:
            assert last.is_contiguous()


def test_dense_positions_last_only_when_positions_are_contiguous():
    g = torch.Generator().manual_seed(5)
    conv_delta = torch.randn(3, 4, 10, generator=g)  # (B, C, L), as a convolution's δ
    idx = torch.tensor([3, 0])
    d = Dense(conv_delta.transpose(1, 2))  # seen as (B, L, C)
    assert d.positions_last
    assert torch.equal(d.take_last(idx), conv_delta[:, idx])
    assert d.take_last(idx).is_contiguous()
    tokens = Dense(torch.randn(3, 10, 4, generator=g))  # a transformer's (B, T, n)
    assert not tokens.positions_last
    assert torch.equal(tokens.take_last(idx), tokens.x[:, :, idx].transpose(1, 2))
    assert not Dense(torch.randn(3, 4, generator=g)).positions_last  # one position

def test_batchnorm_sums_on_some_channels_equal_those_of_all():
    torch.manual_seed(3)
    bn = torch.nn.BatchNorm2d(5).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    x, delta = torch.randn(4, 5, 3, 3, dtype=torch.float64), torch.randn(4, 5, 3, 3, dtype=torch.float64)
    got = {}

    class Recorder:
        add_layer = Compressor.add_layer  # a layer's tensors, one `add_vector` each

        def add_vector(self, out, slot, values):
            assert isinstance(values, PositionSums if slot == "w" else torch.Tensor)  # bias: δ itself
            got[slot] = values

    modules.BatchNormHandler.emit(bn, modules.BatchNormHandler.capture(bn, x), delta,
                                  {"weight": "w", "bias": "b"}, Recorder(), None)
    xhat = (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    want = {"w": (delta * xhat).sum((2, 3)), "b": delta.sum((2, 3))}
    idx = torch.tensor([4, 1])
    for slot in ("w", "b"):
        torch.testing.assert_close(position_sums(got[slot], torch.float64), want[slot], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(position_sums(got[slot], torch.float64, idx), want[slot][:, idx],
                                   rtol=1e-12, atol=1e-12)
    plain = torch.randn(4, 6, 5, dtype=torch.float64)  # a tensor (B, T, width) is summed over T
    torch.testing.assert_close(position_sums(plain, torch.float64, idx), plain.sum(1)[:, idx])


def test_every_factor_returns_fresh_tensors_that_a_compressor_may_overwrite():
    """Dropout multiplies in place into the first gather: no factor may hand out a view of its input."""
    from dropinf.factors import GroupRows, OneHot

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 5, generator=g)
    delta = torch.randn(2, 6, 4, generator=g)
    factors = [Dense(delta), Dense(delta.transpose(1, 2).contiguous().transpose(1, 2)),
               Unfold(x, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), Unfold(x, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
               GroupRows(delta, 2), OneHot(torch.randint(0, 7, (2, 6), generator=g), 7, torch.float32)]
    for f in factors:
        idx = torch.arange(min(3, f.width))
        before = [t.clone() for t in (x, delta)]
        for got in (f.take(f.index(idx)), f.take_last(f.index(idx)), f.gather(idx)):
            got.mul_(0.0).add_(7.0)
        assert all(torch.equal(b, t) for b, t in zip(before, (x, delta))), type(f).__name__
