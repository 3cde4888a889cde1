"""One GPU kernel for a layer's sampled per-example weight gradient (dropout, SJLT, importance dropout).

For kept coordinates i = (row ri_i, column ci_i) of a weight matrix, the fused path needs
    out[b, tgt_i] += w_i · Σ_t R[b, t, ri_i] · C[b, t, ci_i]
with R and C the layer's factors: `factors.Dense` (linear layers; a bias against a zero-stride
ones factor), `factors.Unfold` (a convolution's input, taps read in place) or `factors.Normalized`
(a norm layer's x̂, formed in the kernel as the layer rounds it). In PyTorch that is two gathers,
a product, a sum and an index_add per layer: five kernels that write and re-read B·T·k values each
(on ResNet-9 at r = 4,096 that traffic is what the fused step adds to the limit), and five launches
(on bf16 transformers, host time). This kernel reads the
kept entries where they lie, accumulates in float32 (float64 for float64 inputs) and adds straight
into `out`: one launch, and only B·k values written.

It runs where Triton compiles for the device (CUDA). `DROPINF_GATHER_DOT=off` turns it off, and
the PyTorch path (`Dropout.add_outer`) is used. `interpreted()` runs the same kernel source on
CPU tensors through Triton's interpreter, so tests check it against float64 autograd without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from .factors import Dense, Normalized, Unfold

_MODES = ("auto", "off")
#: the kernel's constexpr parameters, in its signature's order (after the runtime ones)
_CONSTEXPRS = ("HAS_W", "UNFOLD", "AFFINE", "HAS_SHIFT", "ROUND", "ATOMIC", "F64", "ONES", "BLOCK_T", "BLOCK_K")
_interpret = False  # set by `interpreted()`
_failed: str | None = None  # why the kernel could not run in this process (then never tried again)


@functools.lru_cache(maxsize=None)
def _triton():
    """(triton, the kernel's module), or None where Triton is not installed."""
    try:
        import triton

        from . import _gather_dot_kernel
    except ImportError:
        return None
    return triton, _gather_dot_kernel


def mode() -> str:
    value = os.environ.get("DROPINF_GATHER_DOT", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"DROPINF_GATHER_DOT={value!r}: expected one of {', '.join(_MODES)}")
    return value


@contextlib.contextmanager
def interpreted():
    """Within: CPU tensors take the kernel too, run by Triton's interpreter (slow; for tests). Triton
    decides at import whether its own library is interpreted, so TRITON_INTERPRET=1 must be set
    before triton is first imported (the test suite's conftest does)."""
    global _interpret
    found = _triton()
    if found is None:
        raise RuntimeError("the gather-dot kernel needs Triton (pip install triton)")
    if not found[0].knobs.runtime.interpret:
        raise RuntimeError("gather_dot.interpreted() needs TRITON_INTERPRET=1 set before triton is imported")
    saved, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = saved


def status(on_cuda: bool) -> str:
    """For provenance: "triton <version>" where the kernel runs, else why not."""
    found = _triton()
    if found is None:
        return "off: triton not installed"
    if mode() == "off":
        return "off: DROPINF_GATHER_DOT=off"
    if _failed is not None:
        return f"off: failed ({_failed})"
    if not on_cuda:
        return "off: not on CUDA"
    direct = "" if _direct["off"] is None else f" (each launch bound by Triton: {_direct['off']})"
    return f"triton {found[0].__version__}{direct}"


def enabled(out: torch.Tensor) -> bool:
    """Whether the kernel may run for an output on this device at all: not inside a torch.func
    transform or on tensor subclasses (FakeTensor, wrapped tensors), whose data it cannot read."""
    return ((out.is_cuda or (_interpret and out.device.type == "cpu")) and type(out) is torch.Tensor
            and _failed is None and _triton() is not None and mode() != "off"
            and not torch._C._are_functorch_transforms_active())


def applies(out: torch.Tensor, rows, cols) -> bool:
    """Whether `add` handles these factors on this device (else the caller's PyTorch path runs)."""
    return enabled(out) and reads(out, rows, cols)


def reads(out: torch.Tensor, rows, cols) -> bool:
    """Whether the kernel reads these factors into `out` (given `enabled(out)`)."""
    readable_cols = type(cols) in (Dense, Normalized) or (type(cols) is Unfold and cols.groups == 1)
    if type(rows) is not Dense or not readable_cols:
        return False  # one-hot, grouped and other factors keep their own gathers
    if type(cols) is Normalized and cols.round_to not in (None, cols.x.dtype):
        return False  # the kernel rounds x̂ only to x's own dtype
    source = rows.x, cols.x
    return out.dtype in (torch.float32, torch.float64) and all(
        type(t) is torch.Tensor and t.device == out.device
        and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for t in source)


@functools.lru_cache(maxsize=None)
def _kernel():
    triton, source = _triton()
    return triton.jit(source.gather_dot)  # interpreted where TRITON_INTERPRET=1 (tests on the CPU)


# Reusing a compiled kernel: Triton's launch binds and specializes every argument on each call,
# which for this kernel's 35 runtime arguments cost more host time than the five PyTorch ops it
# replaces (measured at 120-150 µs a launch from a backward hook, Pythia-1.4B bf16 on an H200, where
# eager steps are host-bound). After one ordinary launch per signature, the kernel Triton compiled
# for it is launched directly, once checked to write what the ordinary launch wrote.
_compiled: dict = {}  # signature -> CompiledKernel, or None while unchecked
_direct = {"launches": 0, "checked": 0, "off": None}  # counts, and why direct launches are off


def _signature(device_index: int, args, consts) -> tuple:
    """What Triton specializes a compilation on, so that one signature is one compiled kernel: each
    integer's width and whether it is 1 or a multiple of 16, each tensor's dtype and whether its
    address is 16-byte aligned; and the constexprs and the device."""
    key = [device_index, *consts]
    for a in args:
        if type(a) is torch.Tensor:
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31, a >= 2**63))
    return tuple(key)


def _launch_hooked(triton) -> bool:
    """Whether a profiler hooks Triton's launches (then they go through Triton, which calls it)."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True
    hook = runtime.launch_enter_hook  # None, or a chain of hooks (Triton 3.6: empty unless one is added)
    return hook is not None and bool(getattr(hook, "calls", True))


def _run_direct(compiled, grid, args, consts, device_index: int) -> None:
    """Launch a compiled kernel as Triton's launcher does, with no launch hooks or metadata."""
    run = compiled.run  # (loads the module on first use)
    run(grid[0], grid[1], 1, torch._C._cuda_getCurrentRawStream(device_index), compiled.function,
        compiled.packed_metadata, None, None, None, *args, *consts)


def _launch(grid, args, consts: tuple, names: tuple, out: torch.Tensor) -> None:
    kernel = _kernel()
    if _interpret or _direct["off"] is not None or not out.is_cuda:
        kernel[grid](*args, **dict(zip(names, consts)))
        return
    key = _signature(out.device.index, args, consts)
    compiled = _compiled.get(key)
    if compiled is not None and not _launch_hooked(_triton()[0]):
        _run_direct(compiled, grid, args, consts, out.device.index)
        _direct["launches"] += 1
        return
    capturing = torch.cuda.is_current_stream_capturing()
    before = None
    if key not in _compiled and not capturing:  # out as it is, in its own strides (the launch passes them)
        before = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device).copy_(out)
    compiled = kernel[grid](*args, **dict(zip(names, consts)))
    if before is None:
        return
    _compiled[key] = None  # (until checked)
    try:
        _run_direct(compiled, grid, [before if a is out else a for a in args], consts, out.device.index)
    except Exception as err:  # another Triton's internals: the ordinary launch it is, for the process
        _direct["off"] = f"{type(err).__name__}: {err}"[:200]
        return
    _direct["checked"] += 1
    atomic = consts[names.index("ATOMIC")]  # atomics add in a varying order: equal to rounding
    if torch.equal(before, out) if not atomic else \
            torch.allclose(before, out, rtol=1e-5, atol=1e-5 * float(out.abs().max())):
        _compiled[key] = compiled
        return
    _direct["off"] = "a direct launch disagreed with Triton's"
    warnings.warn(f"dropinf: {_direct['off']} (Triton {_triton()[0].__version__}); this process launches the "
                  "gather-dot kernel through Triton only (same results, more host time per launch)",
                  RuntimeWarning, stacklevel=3)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _blocks(B: int, T: int, K: int, device) -> tuple[int, int]:
    """BLOCK_T, BLOCK_K: a tile of at most 4,096 products per step, with enough programs (B per
    block of kept columns) to fill the device twice where K allows (transformers keep few columns
    per layer, so a wide block would leave most of the GPU idle)."""
    block_t = min(64, _next_pow2(T))
    block_k = min(_next_pow2(K), max(16, 4096 // block_t))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    while block_k > 8 and B * -(-K // block_k) < 2 * sms:
        block_k //= 2
    return block_t, block_k


def add(out: torch.Tensor, rows, cols, tgt: torch.Tensor, w: torch.Tensor | None, ri: torch.Tensor,
        ci: torch.Tensor, atomic: bool, ones: bool = False) -> bool:
    """out[b, tgt] += w · Σ_t rows[b, t, ri] · cols[b, t, ci], for factors where `applies` holds.
    With `ones`, an index of -1 reads that factor as ones: a bias's entries (Σ_t of the other factor)
    go in the same launch as its weight's.
    False (out untouched) where the kernel cannot be built or launched here, for example with no C
    compiler for Triton's launcher in a slim container: it warns once and is off for the process,
    and the caller takes its PyTorch path."""
    global _failed
    K = int(tgt.numel())
    if K == 0:
        return True
    R = rows.x
    B, T = rows.batch, rows.length
    if type(cols) is Unfold:
        x = cols.x
        (kh, kw), (sh, sw), (dh, dw) = cols.kernel, cols.stride, cols.dilation
        top, _, left, _ = cols.padding
        C, (s_cb, s_cn, s_xh, s_xw) = x, x.stride()
        s_ct = 0
        geometry = (s_xh, s_xw, x.shape[2], x.shape[3], cols.ow, kh * kw, kw, sh, sw, dh, dw, top, left)
    else:
        C = cols.x
        s_cb, s_ct, s_cn = C.stride()
        geometry = (0,) * 13
    shift = scale = None
    affine = (tgt, tgt, 0, 0, 0)  # unread placeholders
    if type(cols) is Normalized:
        shift, scale = cols.stats()
        scale = scale.expand(C.shape)
        if shift is not None:
            shift = shift.expand(C.shape)
            if shift.stride() != scale.stride():  # the kernel reads both with one set of strides
                shift, scale = shift.contiguous(), scale.contiguous()
        affine = (scale if shift is None else shift, scale, *scale.stride())
    block_t, block_k = _blocks(B, T, K, out.device)
    grid = (B, -(-K // block_k))
    # Triton launches on the current device's current stream: make that the tensors' device
    other = out.is_cuda and out.device.index is not None and out.device.index != torch.cuda.current_device()
    try:
        with torch.cuda.device(out.device) if other else contextlib.nullcontext():
            _launch(grid, (out, out.stride(0), out.stride(1), tgt, w if w is not None else tgt, ri, ci, K, T,
                           R, *R.stride(), C, s_cb, s_ct, s_cn, *geometry, *affine),
                    (w is not None, type(cols) is Unfold, scale is not None, shift is not None,
                     scale is not None and cols.round_to is not None, bool(atomic), out.dtype == torch.float64,
                     bool(ones), block_t, block_k), _CONSTEXPRS, out)
    except Exception as err:  # building or launching failed before the kernel ran: out is unchanged
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _failed = f"{type(err).__name__}: {first}"[:300]
        warnings.warn(f"dropinf: the gather-dot kernel cannot run here ({_failed}); this process uses the "
                      "PyTorch path instead (same results, slower on the GPU). DROPINF_GATHER_DOT=off skips "
                      "the attempt.", RuntimeWarning, stacklevel=2)
        return False
    return True
