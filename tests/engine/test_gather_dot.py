"""The gather-dot kernel (one launch per layer for dropout, SJLT and importance dropout) against
float64 references: the kernel on random factors of every stride and convolution geometry, and
whole extractions through it against per-example autograd. On the CPU the kernel runs through
Triton's interpreter; DROPINF_TEST_DEVICE=cuda runs the compiled kernel."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the gather-dot kernel is written in Triton: pip install triton")

from dropinf import gather_dot  # noqa: E402
from dropinf.extraction import Extractor  # noqa: E402
from dropinf.factors import Dense, GroupRows, Normalized, OneHot, Unfold, vector_factors  # noqa: E402

from .models import (ConvNet, TextNet, TiedLM, conv_batches, conv_loss, lm_batches, lm_loss,  # noqa: E402
                     randomize, reference_grads, text_batches, text_loss)

DEVICE = torch.device(os.environ.get("DROPINF_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def kernel_on():
    """The kernel on this device (the interpreter on the CPU), whatever DROPINF_GATHER_DOT says."""
    saved = os.environ.pop("DROPINF_GATHER_DOT", None)
    try:
        if DEVICE.type == "cpu":
            with gather_dot.interpreted():
                yield
        else:
            yield
    finally:
        if saved is not None:
            os.environ["DROPINF_GATHER_DOT"] = saved


def reference(rows_full, cols_full, tgt, w, ri, ci, width):
    """float64: out[b, tgt] += w · Σ_t R[b, t, ri] C[b, t, ci], by index_add on the CPU; an index of
    -1 reads a column of ones appended to its factor (a bias in its weight's launch)."""
    R, C = (torch.cat([f.double().cpu(), torch.ones(*f.shape[:2], 1, dtype=torch.float64)], -1)
            for f in (rows_full, cols_full))
    vals = (R[:, :, ri.cpu()] * C[:, :, ci.cpu()]).sum(1)
    if w is not None:
        vals = vals * w.double().cpu()
    return torch.zeros(R.shape[0], width, dtype=torch.float64).index_add_(1, tgt.cpu(), vals)


def kept(g, K, n_rows, n_cols, width, shared, ones=False):
    """K random kept entries; with `ones`, a third of them read the rows as ones (index -1) and a
    third the columns, as a bias of either side does."""
    tgt = torch.randint(width, (K,), generator=g) if shared else torch.randperm(width, generator=g)[:K]
    ri, ci = torch.randint(n_rows, (K,), generator=g), torch.randint(n_cols, (K,), generator=g)
    if ones:
        side = torch.randint(3, (K,), generator=g)
        ri, ci = ri.masked_fill(side == 1, -1), ci.masked_fill(side == 2, -1)
    return tgt.to(DEVICE), (torch.randn(K, generator=g)).to(DEVICE), ri.to(DEVICE), ci.to(DEVICE)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shared,weighted", [(False, False), (True, True)])
@pytest.mark.parametrize("ones", [False, True])
def test_dense_factors_equal_the_float64_reference(dtype, tol, layout, shared, weighted, ones):
    g = torch.Generator().manual_seed(hash((str(dtype), layout, shared, ones)) % 2**31)
    B, T, n_rows, n_cols, K, width = 3, 37, 11, 9, 23, 29
    R = torch.randn(B, T, n_rows, generator=g).to(DEVICE, dtype)
    C = torch.randn(B, T, n_cols, generator=g).to(DEVICE, dtype)
    if layout == "transposed":  # a convolution's δ (B, C, L) seen as (B, L, C)
        R = R.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":  # a view into a wider activation
        C = torch.randn(B, T, 2 * n_cols, generator=g).to(DEVICE, dtype)[:, :, 1::2]
    tgt, w, ri, ci = kept(g, K, n_rows, n_cols, width, shared, ones)
    w = w if weighted else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.randn(B, width, generator=g, dtype=acc).to(DEVICE)
    start = out.clone()
    rows, cols = Dense(R), Dense(C)
    assert gather_dot.applies(out, rows, cols)
    gather_dot.add(out, rows, cols, tgt, w, ri, ci, atomic=shared, ones=ones)
    want = start.double().cpu() + reference(R, C, tgt, w, ri, ci, width)
    err = ((out.double().cpu() - want).norm() / want.norm()).item()
    assert err < tol


GEOMETRIES = [  # kernel, stride, dilation, padding (top, bottom, left, right)
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    ((4, 2), (1, 1), (1, 1), (1, 2, 0, 1)),
    ((3, 3), (2, 2), (2, 1), (2, 2, 1, 1)),
    ((1, 5), (1, 3), (1, 1), (0, 0, 3, 0)),
    ((2, 2), (1, 1), (1, 1), (0, 0, 0, 0)),
]


@pytest.mark.parametrize("kernel,stride,dilation,padding", GEOMETRIES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("ones", [False, True])
def test_convolution_taps_equal_unfold_of_the_padded_input(kernel, stride, dilation, padding, layout, dtype, tol,
                                                           ones):
    g = torch.Generator().manual_seed(sum(kernel) + sum(padding))
    B, Cin, O = 2, 5, 4
    x = torch.randn(B, Cin, 7, 9, generator=g).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    cols = Unfold(x, kernel, stride, dilation, padding)
    delta = torch.randn(B, O, cols.oh, cols.ow, generator=g).to(DEVICE, dtype)
    rows = Dense(delta.flatten(2).transpose(1, 2))  # as ConvHandler passes it
    top, bottom, left, right = padding
    unfolded = F.unfold(F.pad(x.double().cpu(), (left, right, top, bottom)), kernel, dilation=dilation,
                        stride=stride).transpose(1, 2)  # (B, L, Cin·kh·kw), the slow reference
    width = 17
    tgt, w, ri, ci = kept(g, 15, O, cols.width, width, shared=False, ones=ones)
    out = torch.zeros(B, width, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    assert gather_dot.applies(out, rows, cols)
    gather_dot.add(out, rows, cols, tgt, w, ri, ci, atomic=False, ones=ones)
    want = reference(rows.x, unfolded, tgt, w, ri, ci, width)
    assert ((out.double().cpu() - want).norm() / want.norm()).item() < tol


@pytest.mark.parametrize("stats_kind", ["per_row", "per_row_no_shift", "per_channel"])
@pytest.mark.parametrize("dtype,round_to", [(torch.float64, None), (torch.float32, "x"), (torch.bfloat16, "x"),
                                            (torch.bfloat16, None)])
@pytest.mark.parametrize("ones", [False, True])
def test_norm_layer_columns_are_formed_as_the_layer_rounds_them(stats_kind, dtype, round_to, ones):
    """x̂ = (x - shift)·scale in the statistics' dtype, rounded to x's dtype where the layer does:
    the kernel's sums equal float64 sums of the layer's own x̂ (`Normalized.values`)."""
    g = torch.Generator().manual_seed(len(stats_kind) + dtype.itemsize)
    B, T, n, K, width = 3, 21, 10, 7, 12
    x = (3 * torch.randn(B, T, n, generator=g) + 1).to(DEVICE, dtype)
    R = torch.randn(B, T, n, generator=g).to(DEVICE, dtype)
    h = torch.float64 if dtype == torch.float64 else torch.float32
    if stats_kind == "per_channel":
        stats = (torch.randn(n, generator=g).to(DEVICE, h), torch.rand(n, generator=g).to(DEVICE, h) + 0.5)
    else:
        var, mean = torch.var_mean(x.to(h), -1, correction=0, keepdim=True)
        stats = (None if stats_kind == "per_row_no_shift" else mean, torch.rsqrt(var + 1e-5))
    calls = []
    cols = Normalized(x, lambda: (calls.append(1), stats)[1], round_to=dtype if round_to else None)
    rows = Dense(R)
    tgt, w, local, _ = kept(g, K, n, n, width, shared=False)
    # with ones: the layer's bias entries (Σ_t δ) in its weight's launch, as LayerNorm adds them
    bias = local.masked_fill(torch.arange(K, device=DEVICE) % 2 == 1, -1) if ones else local
    out = torch.zeros(B, width, dtype=h, device=DEVICE)
    assert gather_dot.applies(out, rows, cols) and not calls  # statistics only when read
    gather_dot.add(out, rows, cols, tgt, w, local, bias, atomic=False, ones=ones)
    want = reference(R, cols.values(), tgt, w, local, bias, width)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert ((out.double().cpu() - want).norm() / want.norm()).item() < tol


def test_a_bias_is_summed_against_ones_that_take_no_memory():
    v = torch.randn(3, 5, 4, device=DEVICE, dtype=torch.float64)
    rows, cols = vector_factors(v)
    assert cols.x.stride() == (0, 0, 0) and cols.x.shape == v.shape
    out = torch.zeros(3, 4, dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([2, 0, 3], device=DEVICE)
    gather_dot.add(out, rows, cols, torch.arange(3, device=DEVICE), None, idx, idx, atomic=False)
    torch.testing.assert_close(out[:, :3].cpu(), v.sum(1)[:, idx].cpu(), rtol=1e-12, atol=1e-12)


def test_the_kernel_is_not_asked_for_factors_it_does_not_read():
    B, T = 2, 4
    out = torch.zeros(B, 3, device=DEVICE)
    d = Dense(torch.randn(B, T, 6, device=DEVICE))
    ids = torch.randint(5, (B, T), device=DEVICE)
    x = torch.randn(B, 4, 5, 5, device=DEVICE)
    assert not gather_dot.applies(out, OneHot(ids, 5, torch.float32), d)
    assert not gather_dot.applies(out, d, OneHot(ids, 5, torch.float32))
    assert not gather_dot.applies(out, GroupRows(torch.randn(B, 9, 4, device=DEVICE), 2),
                                  Unfold(x, (3, 3), (1, 1), (1, 1), (0, 0, 0, 0), groups=2))
    assert not gather_dot.applies(out.half(), d, d)  # accumulation is float32 or float64


def test_off_turns_it_off_and_a_bad_value_names_the_variable(monkeypatch):
    d = Dense(torch.randn(2, 4, 6, device=DEVICE))
    out = torch.zeros(2, 3, device=DEVICE)
    assert gather_dot.applies(out, d, d)
    monkeypatch.setenv("DROPINF_GATHER_DOT", "off")
    assert not gather_dot.applies(out, d, d)
    monkeypatch.setenv("DROPINF_GATHER_DOT", "fast")
    with pytest.raises(ValueError, match="DROPINF_GATHER_DOT='fast'"):
        gather_dot.applies(out, d, d)


def test_cpu_tensors_take_the_pytorch_path_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(gather_dot, "_interpret", False)
    d = Dense(torch.randn(2, 4, 6))
    assert not gather_dot.applies(torch.zeros(2, 3), d, d)


CASES = {
    "text": (TextNet, text_loss, text_batches),
    "conv": (ConvNet, conv_loss, conv_batches),
    "tied": (TiedLM, lm_loss, lm_batches),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name,r,opts", [("dropout", 9, {}), ("sjlt", 6, {}),
                                         ("importance_dropout", 9, {"rescale": True})])
def test_extraction_through_the_kernel_equals_per_example_autograd(case, name, r, opts):
    cls, loss, batches = CASES[case]
    seed = torch.seed() % 10_000
    torch.manual_seed(seed)
    model = randomize(cls(), seed).to(DEVICE, torch.float64)
    data = [{k: (v.to(DEVICE, torch.float64) if v.is_floating_point() else v.to(DEVICE)) for k, v in b.items()}
            for b in batches(seed=seed)]
    names = [n for n, _ in model.named_parameters()]
    ref = reference_grads(model, loss, data, names)
    if name == "importance_dropout":  # per-coordinate sampling weights, as the probe would give
        g = torch.Generator().manual_seed(seed)
        opts = {**opts, "weights": torch.rand(ref.shape[1], generator=g, dtype=torch.float64) + 0.1}
    kinds = set()
    real = gather_dot.add

    def add(out, rows, cols, tgt, w, ri, ci, *a, **k):
        kinds.add("ones" if cols.x.stride() == (0, 0, 0) else type(cols).__name__)
        if k.get("ones") and bool((ri < 0).any() or (ci < 0).any()):
            kinds.add("ones")  # a bias in its weight's launch
        return real(out, rows, cols, tgt, w, ri, ci, *a, **k)

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        mp.setattr(gather_dot, "add", add)
        ex = Extractor(model, loss, name, r=r, seed=seed, **opts)
        got = ex.run(data)
    if name == "sjlt":  # every tensor keeps coordinates: matrices, norm weights and biases all read here
        assert {"text": {"Dense", "Normalized", "ones"}, "conv": {"Unfold", "Dense", "Normalized", "ones"},
                "tied": {"Dense"}}[case] <= kinds, kinds
    assert kinds, "no layer went through the kernel"
    want = ex.compressor.compress(ref)
    err = ((got.double().cpu() - want.double().cpu()).norm() / want.norm().cpu()).item()
    assert err < 1e-10, f"seed {seed}"


def _architectures():
    from . import test_architectures as A
    return A


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(n for n in _architectures().BUILDERS if n not in _architectures().WAITING))
def test_every_architecture_through_the_kernel_equals_batch_size_1_autograd(arch):
    """Dropout and SJLT on every architecture of the suite (transformers, convolutions, norms,
    attention, recurrent layers, LoRA), each layer the kernel applies to going through it."""
    A = _architectures()
    case = A.BUILDERS[arch](1234)
    if case.refused:
        pytest.skip("refused by the extraction engine (tests/engine/test_architectures.py checks the message)")
    if DEVICE.type == "cuda" and arch.startswith(("lstm", "gru")):
        pytest.skip("cuDNN's RNN backward needs training mode, so the eval-mode reference cannot run on CUDA")
    model = case.model.to(DEVICE)
    batches = [{k: v.to(DEVICE) for k, v in b.items()} for b in case.batches]
    ref = A.M.reference_bs1(model, case.loss, batches, case.names)
    kinds = []
    real = gather_dot.add
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")  # fallback notices
        mp.setattr(gather_dot, "add", lambda out, rows, cols, *a, **k: (kinds.append(type(cols).__name__),
                                                                          real(out, rows, cols, *a, **k))[1])
        for name, r in (("dropout", max(1, ref.shape[1] // 3)), ("sjlt", min(64, ref.shape[1]))):
            ex = Extractor(model, case.loss, name, r=r, seed=7, params=case.names)
            got = ex.run(batches)
            want = ex.compressor.compress(ref.cpu())
            assert A.rel_err(got, want) < 1e-10, name
    assert kinds, "no layer went through the kernel"


def test_not_inside_a_torch_func_transform():
    d = torch.randn(2, 4, 6, device=DEVICE)
    out = torch.zeros(2, 3, device=DEVICE)
    seen = []
    torch.func.vmap(lambda t: (seen.append(gather_dot.applies(out, Dense(t[None]), Dense(t[None]))), t)[1])(d)
    assert seen == [False] and gather_dot.applies(out, Dense(d), Dense(d))


def test_a_kernel_that_cannot_be_built_warns_once_and_the_pytorch_path_takes_over(monkeypatch):
    """As in a slim container with no C compiler for Triton's launcher: the extraction is still
    exact, one warning names the reason, and the kernel is not tried again in the process."""
    tries = []

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tries.append(1)
                raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
            return launch

    monkeypatch.setattr(gather_dot, "_kernel", lambda: Unbuildable())
    monkeypatch.setattr(gather_dot, "_failed", None)
    monkeypatch.setattr(gather_dot, "_compiled", {})  # a process where no launch has compiled it
    model, loss, batches = CASES["conv"]
    torch.manual_seed(0)
    net = randomize(model(), 0).to(DEVICE, torch.float64)
    data = [{k: (v.to(DEVICE, torch.float64) if v.is_floating_point() else v.to(DEVICE)) for k, v in b.items()}
            for b in batches(seed=0)]
    names = [n for n, _ in net.named_parameters()]
    ref = reference_grads(net, loss, data, names)
    with pytest.warns(RuntimeWarning, match="cannot run here.*Failed to find C compiler") as rec:
        ex = Extractor(net, loss, "sjlt", r=6, seed=0)
        got = ex.run(data)
    assert len([w for w in rec if "gather-dot" in str(w.message)]) == 1 and tries == [1]
    assert "failed (RuntimeError: Failed to find C compiler" in gather_dot.status(True)
    want = ex.compressor.compress(ref)
    assert ((got.double().cpu() - want.cpu()).norm() / want.norm().cpu()).item() < 1e-10


def test_a_layers_weight_and_bias_take_one_launch():
    """TextNet at r = dim (every tensor read): LayerNorm, Linear and HF Conv1D each add their weight
    and bias in one launch (RMSNorm and the embedding have one tensor each; the head's Linear, one
    launch too), and the rows still equal per-example autograd."""
    seed = torch.seed() % 10_000
    model = randomize(TextNet(), seed).to(DEVICE, torch.float64)
    data = [{k: (v.to(DEVICE, torch.float64) if v.is_floating_point() else v.to(DEVICE)) for k, v in b.items()}
            for b in text_batches(seed=seed)]
    names = [n for n, _ in model.named_parameters()]
    dim = sum(p.numel() for p in model.parameters())
    launches = []
    real = gather_dot.add

    def add(out, rows, cols, *a, **k):
        launches.append(k.get("ones", False))
        return real(out, rows, cols, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gather_dot, "add", add)
        ex = Extractor(model, text_loss, "dropout", r=dim, seed=seed, self_check=False)
        got = ex.run(data)
    # per batch: ln, fc, conv1d and head with their biases (4, `ones`), rms (1); the embedding's
    # one-hot rows take their own gathers
    assert sorted(launches[:5]) == [False, True, True, True, True], launches
    assert len(launches) == 5 * len(data)
    want = ex.compressor.compress(reference_grads(model, text_loss, data, names))
    err = ((got.double().cpu() - want.double().cpu()).norm() / want.norm().cpu()).item()
    assert err < 1e-10, f"seed {seed}"


def test_the_constexprs_are_the_kernels_trailing_parameters_in_order():
    """Direct launches pass the runtime arguments, then `_CONSTEXPRS`, by position."""
    import inspect

    from dropinf import _gather_dot_kernel as source

    params = list(inspect.signature(source.gather_dot).parameters.values())
    constexpr = [p.name for p in params if p.annotation is source.tl.constexpr]
    assert tuple(constexpr) == gather_dot._CONSTEXPRS
    assert [p.name for p in params[-len(constexpr):]] == constexpr


@pytest.fixture
def fresh_launches(monkeypatch):
    monkeypatch.setattr(gather_dot, "_compiled", {})
    monkeypatch.setattr(gather_dot, "_direct", {"launches": 0, "checked": 0, "off": None})


@pytest.mark.skipif(DEVICE.type != "cuda", reason="direct launches are of compiled kernels (DROPINF_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("shared", [False, True])
def test_repeated_launches_reuse_the_compiled_kernel_and_equal_the_reference(fresh_launches, shared):
    g = torch.Generator().manual_seed(11 + shared)
    B, T, n_rows, n_cols, K, width = 4, 33, 12, 10, 40, 64
    for step in range(4):  # fresh values each step, one signature: the first is checked, then direct
        R = torch.randn(B, T, n_rows, generator=g).to(DEVICE, torch.bfloat16)
        C = torch.randn(B, T, n_cols, generator=g).to(DEVICE, torch.bfloat16)
        tgt, w, ri, ci = kept(g, K, n_rows, n_cols, width, shared, ones=True)
        out = torch.zeros(B, width, device=DEVICE)
        assert gather_dot.add(out, Dense(R), Dense(C), tgt, w, ri, ci, atomic=shared, ones=True)
        want = reference(R, C, tgt, w, ri, ci, width)
        assert ((out.double().cpu() - want).norm() / want.norm()).item() < 1e-5, step
    assert gather_dot._direct == {"launches": 3, "checked": 1, "off": None}


@pytest.mark.skipif(DEVICE.type != "cuda", reason="direct launches are of compiled kernels (DROPINF_TEST_DEVICE=cuda)")
def test_a_direct_launch_that_disagrees_turns_them_off_with_a_warning(fresh_launches):
    g = torch.Generator().manual_seed(5)
    R, C = (torch.randn(2, 9, 6, generator=g).to(DEVICE) for _ in range(2))
    tgt, w, ri, ci = kept(g, 8, 6, 6, 16, shared=False)
    out = torch.zeros(2, 16, device=DEVICE)
    with pytest.MonkeyPatch.context() as mp, pytest.warns(RuntimeWarning, match="direct launch disagreed"):
        mp.setattr(gather_dot.torch, "equal", lambda a, b: False)
        gather_dot.add(out, Dense(R), Dense(C), tgt, w, ri, ci, atomic=False)
    assert gather_dot._direct["off"] and "each launch bound by Triton" in gather_dot.status(True)
    again = torch.zeros(2, 16, device=DEVICE)
    gather_dot.add(again, Dense(R), Dense(C), tgt, w, ri, ci, atomic=False)  # through Triton, still right
    torch.testing.assert_close(again.double().cpu(), reference(R, C, tgt, w, ri, ci, 16), rtol=1e-5, atol=1e-5)
    assert gather_dot._direct["launches"] == 0


def test_a_hook_on_triton_launches_sends_them_through_triton():
    """A profiler that hooks Triton's launches (proton) sees every launch: none is made directly."""
    import triton

    chain = getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "launch_enter_hook", None)
    if not hasattr(chain, "add"):
        pytest.skip("this Triton has no chain of launch hooks")
    assert not gather_dot._launch_hooked(triton)

    def hook(metadata):
        pass

    chain.add(hook)
    try:
        assert gather_dot._launch_hooked(triton)
    finally:
        chain.remove(hook)
    assert not gather_dot._launch_hooked(triton)


def test_a_signature_tells_apart_what_triton_specializes_on():
    """One signature must be one compiled kernel: integers that are 1, multiples of 16 or 64-bit and
    tensors of another dtype or misaligned address each make another."""
    x = torch.zeros(64)
    sig = lambda *args: gather_dot._signature(0, args, (True, 8))  # noqa: E731
    assert sig(x, 7, 32) == sig(torch.ones(64), 5, 48)
    assert sig(x, 1, 32) != sig(x, 7, 32) and sig(x, 7, 32) != sig(x, 7, 33)
    assert sig(x, 7, 2**31) != sig(x, 7, 2**31 - 16) and sig(x, 7, -2**31 - 16) != sig(x, 7, -2**31)
    assert sig(x[1:], 7, 32) != sig(x, 7, 32)  # 4 bytes past an aligned address
    assert sig(x.double(), 7, 32) != sig(x, 7, 32)
    assert gather_dot._signature(1, (x,), (True,)) != gather_dot._signature(0, (x,), (True,))
