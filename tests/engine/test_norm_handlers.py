"""LayerNorm/RMSNorm handlers: weight sums formed on the kept channels only, against per-example
autograd (float64) for every layout, precision and compressor family."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropinf import modules
from dropinf.compressors.base import Compressor
from dropinf.extraction import Extractor
from dropinf.factors import PositionSums, position_sums

from .models import reference_grads


def rel_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm()).item()


def _llama_rms(dim, eps):
    """Hugging Face's Llama RMSNorm (`variance_epsilon`; normalizes in float32, casts back)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    return llama.LlamaRMSNorm(dim, eps=eps)


# name -> (norm layer, the input's dims between the batch and the normalized ones)
NORMS = {
    "layer": (lambda: nn.LayerNorm(6), (5,)),
    "layer_no_bias_eps": (lambda: nn.LayerNorm(6, eps=0.3, bias=False), (5,)),
    "layer_2d_vectors": (lambda: nn.LayerNorm((3, 4)), ()),
    "layer_2d_grid": (lambda: nn.LayerNorm((2, 3), eps=1e-3), (2, 3)),
    "rms_eps_none": (lambda: nn.RMSNorm(6), (5,)),
    "rms_eps": (lambda: nn.RMSNorm(6, eps=0.3), (5,)),
    "rms_2d_grid": (lambda: nn.RMSNorm((3, 4), eps=1e-6), (2, 3)),
    "rms_vectors": (lambda: nn.RMSNorm(7, eps=1e-5), ()),
    "hf_rms": (lambda: _llama_rms(6, 1e-6), (5,)),
    "hf_rms_eps": (lambda: _llama_rms(5, 0.3), (2, 3)),
}


class NormNet(nn.Module):
    """Untracked Linear (outputs shifted away from zero mean, unequal spreads) → the norm layer →
    tanh → mean over positions → head."""

    def __init__(self, norm, lead, dim_in=4, classes=3):
        super().__init__()
        shape = tuple(getattr(norm, "normalized_shape", None) or norm.weight.shape)
        self.shape, self.lead = shape, lead
        width = math.prod(shape)
        self.fc = nn.Linear(dim_in, width)
        self.norm = norm
        self.head = nn.Linear(width, classes)
        self.register_buffer("shift", 2.0 + torch.randn(width))
        self.register_buffer("spread", 0.5 + torch.rand(width))

    def forward(self, x):  # x: (B, *lead, dim_in)
        h = self.norm((self.fc(x) * self.spread + self.shift).unflatten(-1, self.shape))
        h = torch.tanh(h).reshape(x.shape[0], -1, math.prod(self.shape)).mean(1)
        return self.head(h)


def norm_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def setup(case, seed):
    """A float64 model with non-trivial norm weights/bias and its batches (sizes 3, 2, 1)."""
    make, lead = NORMS[case]
    torch.manual_seed(seed)
    model = NormNet(make(), lead).double()
    with torch.no_grad():
        for p in model.norm.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, dtype=p.dtype))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *lead, 4, generator=g, dtype=torch.float64)
    y = torch.randint(3, (6,), generator=g)
    batches = [{"x": x[s:e], "y": y[s:e]} for s, e in ((0, 3), (3, 5), (5, 6))]
    names = [f"norm.{n}" for n, _ in model.norm.named_parameters()]
    return model, batches, names


def cast(model, batches, dtype):
    return (copy.deepcopy(model).to(dtype),
            [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in b.items()} for b in batches])


def reference(model, batches, names, dtype):
    """Per-example autograd on a copy of the model and batches in `dtype`."""
    model, batches = cast(model, batches, dtype)
    return reference_grads(model, norm_loss, batches, names)


def fused(model, batches, names, name, r, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = Extractor(model, norm_loss, name, r=r, seed=seed, params=names, self_check=False)
        return ex, ex.run(batches)


COMPRESSORS = [("identity", None), ("dropout", 5), ("sjlt", 4), ("gaussian", 3)]


@pytest.mark.parametrize("case", sorted(NORMS))
@pytest.mark.parametrize("name,r", COMPRESSORS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_weights_match_float64_autograd(case, name, r, dtype):
    seed = torch.seed() % 10_000
    model64, batches64, names = setup(case, seed)
    model, batches = cast(model64, batches64, dtype)
    # the reference: float64 per-example autograd on the same weights and inputs (HF's RMSNorm
    # normalizes in float32 even then, and the handler repeats its arithmetic)
    ref = reference(model, batches, names, torch.float64)
    ex, got = fused(model, batches, names, name, r, seed)
    want = ex.compressor.compress(ref)
    assert got.shape == want.shape == (6, ex.compressor.out_dim)
    assert rel_err(got, want) < (1e-10 if dtype == torch.float64 else 1e-5), f"seed {seed}"


@pytest.mark.parametrize("case", sorted(NORMS))
@pytest.mark.parametrize("name,r", COMPRESSORS)
def test_bfloat16_norm_weights_match_float32_autograd(case, name, r):
    """bf16 rows against float32 autograd on the same (bf16-rounded) weights and inputs. The bf16
    forward rounds δ in every layer (median error about 0.6%, up to 2.5% in the seeds tried); the
    handler's own rounding is checked tightly against the module's x̂ below."""
    seed = torch.seed() % 10_000
    model64, batches64, names = setup(case, seed)
    model, batches = cast(model64, batches64, torch.bfloat16)
    ref = reference(model, batches, names, torch.float32)
    ex, got = fused(model, batches, names, name, r, seed)
    want = ex.compressor.compress(ref.double())
    assert rel_err(got, want) < 5e-2, f"seed {seed}"


class Record:
    """A compressor stand-in that keeps what the handler passes to `add_vector`."""

    def __init__(self):
        self.values = {}

    add_layer = Compressor.add_layer  # a layer's tensors, one `add_vector` each

    def add_vector(self, out, slot, values):
        self.values[slot] = values


def _emit(norm, x, delta):
    handler = modules.handler_for(norm)
    slots = {role: role for role in handler.claims(norm)}
    rec = Record()
    handler.emit(norm, handler.capture(norm, x), delta, slots, rec, None)
    return rec.values


def _unit_affine_output(norm, x):
    """The module's own x̂, as it rounds it: its forward with weight 1 (and bias 0), exact products."""
    unit = copy.deepcopy(norm)
    with torch.no_grad():
        for p in unit.parameters():
            p.fill_(1.0 if p is unit.weight else 0.0)
    return unit(x)


@pytest.mark.parametrize("case", sorted(NORMS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 5e-3)])
def test_weight_sums_on_kept_channels_equal_the_full_sums_columns(case, dtype, tol):
    """The handler hands a lazy PositionSums for the weight: its sums on channels idx are the columns
    idx of the sums over all channels, and those are Σ δ·x̂ with x̂ as the module itself rounds it."""
    make, lead = NORMS[case]
    torch.manual_seed(3)
    norm = make().to(dtype)
    shape = tuple(norm.weight.shape)
    x = (3.0 + 2.0 * torch.randn(4, *lead, *shape)).to(dtype)
    delta = torch.randn(4, *lead, *shape).to(dtype)
    values = _emit(norm, x, delta)
    sums = values["weight"]
    assert isinstance(sums, PositionSums) and sums.dtype == dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    full = position_sums(sums, acc)
    width = math.prod(shape)
    want = (delta * _unit_affine_output(norm, x)).reshape(4, -1, width).sum(1, dtype=acc)
    assert full.shape == (4, width) and rel_err(full, want) < tol
    idx = torch.tensor([width - 1, 0, 2])
    assert torch.allclose(position_sums(sums, acc, idx), full[:, idx], rtol=1e-6 if acc == torch.float32 else 1e-12)
    if "bias" in values:  # LayerNorm's bias: Σ δ over positions
        assert torch.allclose(position_sums(values["bias"], acc), delta.reshape(4, -1, width).sum(1, dtype=acc))


@pytest.mark.parametrize("case", sorted(NORMS))
def test_no_statistics_are_computed_for_a_layer_where_nothing_is_kept(case, monkeypatch):
    """At r far below the number of coordinates most norm layers keep no channel: their per-row
    statistics (a pass over the whole input) must then not run at all."""
    make, lead = NORMS[case]
    norm = make()
    shape = tuple(norm.weight.shape)
    x, delta = 1.0 + torch.randn(3, *lead, *shape), torch.randn(3, *lead, *shape)
    calls = []
    for name in ("var_mean", "rsqrt"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    values = _emit(norm, x, delta)  # what the handler hands over, not yet asked for any channel
    assert calls == []
    position_sums(values["weight"], torch.float32, torch.tensor([0]))
    assert "rsqrt" in calls  # asked for a channel: the statistics run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_eps_none_is_the_computation_dtypes_epsilon(dtype):
    """nn.RMSNorm(eps=None): F.rms_norm adds the machine epsilon of the dtype it computes in, which
    for reduced precision is float32's. Inputs this small make eps a visible part of the rms."""
    norm = nn.RMSNorm(8).to(dtype)
    torch.manual_seed(4)
    x = (3e-4 * torch.randn(2, 3, 8)).to(dtype)
    delta = torch.randn(2, 3, 8).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = position_sums(_emit(norm, x, delta)["weight"], acc)
    want = (delta * F.rms_norm(x, (8,))).sum(1, dtype=acc)
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("make", [nn.LayerNorm, lambda w: nn.RMSNorm(w, eps=1e-6), lambda w: _llama_rms(w, 1e-6)],
                         ids=["layer", "rms", "hf_rms"])
def test_kept_channel_sums_allocate_no_whole_activation(make):
    """float32: the handler and the sums on a dropout's few kept channels form neither x̂ nor δ·x̂
    over the whole activation: all they allocate is a small fraction of one activation."""
    from torch.profiler import ProfilerActivity, profile

    width = 256
    norm = make(width)
    x, delta = 1.0 + torch.randn(8, 64, width), torch.randn(8, 64, width)
    activation = x.numel() * x.element_size()
    idx = torch.tensor([3, 100, 255])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        values = _emit(norm, x, delta)
        sums = position_sums(values["weight"], torch.float32, idx)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert sums.shape == (8, 3)
    assert allocated < activation / 8, (allocated, activation)
