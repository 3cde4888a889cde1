"""What extraction dispatches: aten ops (and on CUDA kernels) per step of the floor, the limit and each fused path.

    python -m dropinf.bench kernels --arch gpt2 --batch 4 --r 64 512 4096 --compressors dropout sjlt logra
    python -m dropinf.bench kernels --arch llama-tiny --dtype bfloat16 --table 15

On the same batch, after warm-up, one step of each path runs under `torch.profiler`: the floor (a
batched forward+backward with every weight gradient), the limit (the forward and an activation-only
backward, weights frozen, no hooks) and the fused extraction with each compressor and r (the step
`python -m dropinf.bench` times: `Extractor._fused` after `prepare`). From the profile's events:

* `aten_ops_top`: aten ops dispatched from Python or from autograd's backward formulas (an aten op
  with no aten op above it); `aten_ops_top_metadata`: those of them that only view or return their
  input (reshape, slice, a no-op aten::to, ...: host work, no kernel); `aten_ops_all` also counts
  the ops those call inside (aten::linear -> aten::t, aten::addmm, ...); `autograd_nodes`: backward
  functions the engine evaluated.
* on CUDA: `cuda_launches` (cudaLaunchKernel-type runtime calls on the host), `cuda_kernels` (kernels
  the device ran; memcpy/memset apart) and `kernel_ms` (their summed device time).
* `wall_ms`: the step's host wall time without the profiler (median of --repeats, synchronized).
* `excess_*`: a fused path's count minus the limit's; `excess_ops_top_per_hooked_module` divides it
  by the plan's hooked modules (one `plan_fused_*` row per path gives hooked modules, parameter slots,
  fallback sites); `top_added_ops`: the op names the path adds most of over the limit. An r that a
  compressor refuses for the model is a row with its `error`.

The counts are the device's own: on CPU they are what the same step dispatches on a GPU (the number of
ops; a GPU may run more or fewer kernels than ops, so on CUDA both are given). `--table N` prints, per
fused path, the N ops it adds most of over the limit by count and by self time (a diff of the two
`key_averages()` tables by op name). Rows are CSV with provenance (`bench.provenance`,
`bench.write_csv`), rewritten after every row.

Besides the names `bench.build_arch` knows, `llama-tiny` and `pythia-tiny` are small-width models
with the layer structure of Llama-3.2-1B (RMSNorm, grouped-query attention, SwiGLU, tied embeddings)
and Pythia-1.4B (LayerNorm, fused QKV, partial rotary, parallel residual, untied head), for CPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from . import bench
from .errors import DropinfError
from .extraction import Extractor
from .layout import select_parameters

#: small models with the 1B models' layer structure: (config class, model class, config kwargs, sequence length)
TINY = {
    "llama-tiny": ("LlamaConfig", "LlamaForCausalLM",
                   dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5), 128),
    "pythia-tiny": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                    dict(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512, rotary_pct=0.25, max_position_embeddings=256,
                         use_parallel_residual=True, tie_word_embeddings=False), 128),
}

#: ops that only make a new view of (or return) their input: dispatched on the host, no kernel on any
#: device. A top-level op counts as one when it and every op it calls are in this set (aten::to that
#: changes nothing returns its input; one that converts calls aten::_to_copy, which is not here).
METADATA_OPS = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "t", "numpy_T", "permute", "expand", "expand_as", "slice", "select", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "as_strided", "alias", "detach", "view_as", "to", "contiguous",
    "lift_fresh", "unfold", "diagonal", "resolve_conj", "resolve_neg", "_conj"))

#: host-side runtime calls that launch one kernel each
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaLaunchCooperativeKernel")


def build(name: str, dtype: torch.dtype, device):
    """(model, loss_fn, make_batch(B, generator)): `bench.build_arch`'s, or one of TINY."""
    if name not in TINY:
        return bench.build_arch(name, dtype, device)
    import transformers as tf

    config_cls, model_cls, kwargs, seq = TINY[name]
    cfg = getattr(tf, config_cls)(**kwargs)
    model = getattr(tf, model_cls)(cfg)
    model.config._attn_implementation = "sdpa"

    def make(B, g):
        return {"input_ids": torch.randint(cfg.vocab_size, (B, seq), generator=g).to(device)}
    return model.to(device, dtype), bench._lm_loss, make


@dataclass
class Counts:
    """What one profiled step dispatched; `by_name`: op or kernel name -> [count, top-level count,
    self CPU µs, self device µs]."""
    aten_ops_top: int = 0
    aten_ops_top_metadata: int = 0
    aten_ops_all: int = 0
    autograd_nodes: int = 0
    cuda_launches: int = 0
    cuda_kernels: int = 0
    kernel_ms: float = 0.0
    profiled_wall_ms: float = 0.0
    by_name: dict = field(default_factory=dict)
    kernels_by_name: collections.Counter = field(default_factory=collections.Counter)


def _nested_in_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _metadata_only(event) -> bool:
    return event.name in METADATA_OPS and all(_metadata_only(child) for child in event.cpu_children)


def count_events(prof) -> Counts:
    """Counts of a finished `torch.profiler.profile` (CPU events and, if recorded, device events)."""
    from torch.autograd import DeviceType

    c = Counts()
    top = collections.Counter()
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:  # ran on the device
            if e.name.startswith(("Memcpy", "Memset")):
                continue
            c.cuda_kernels += 1
            c.kernel_ms += e.time_range.elapsed_us() / 1e3
            c.kernels_by_name[e.name] += 1
        elif e.name.startswith("aten::"):
            c.aten_ops_all += 1
            if not _nested_in_aten(e):
                c.aten_ops_top += 1
                c.aten_ops_top_metadata += _metadata_only(e)
                top[e.name] += 1
        elif e.name.startswith("autograd::engine::evaluate_function"):
            c.autograd_nodes += 1
        elif e.name in LAUNCHES:
            c.cuda_launches += 1
    for avg in prof.key_averages():
        if avg.key.startswith("aten::"):
            c.by_name[avg.key] = [avg.count, top.get(avg.key, 0), avg.self_cpu_time_total,
                                  getattr(avg, "self_device_time_total", 0.0)]
    return c


def profile_step(fn, device: torch.device, warmup: int = 2, repeats: int = 3) -> tuple[Counts, float]:
    """(counts of one profiled call of `fn`, median host wall seconds of `repeats` unprofiled calls),
    after `warmup` calls (lazy state, caches and autotuning not counted)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    walls = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        profiled = time.perf_counter() - t0
    counts = count_events(prof)
    counts.profiled_wall_ms = 1e3 * profiled
    return counts, statistics.median(walls)


def added_ops(path: Counts, limit: Counts) -> list[dict]:
    """Per op name, what `path` dispatches beyond `limit` (count of all calls, of top-level calls,
    self CPU µs, self device µs); names `path` has more calls or more self time of, largest first."""
    out = []
    for name, (n, top, cpu, dev) in path.by_name.items():
        ln, ltop, lcpu, ldev = limit.by_name.get(name, [0, 0, 0.0, 0.0])
        if n > ln or top > ltop or cpu > lcpu or dev > ldev:
            out.append({"op": name, "added_calls": n - ln, "added_top_calls": top - ltop,
                        "added_self_cpu_us": cpu - lcpu, "added_self_device_us": dev - ldev,
                        "calls": n, "limit_calls": ln})
    return sorted(out, key=lambda row: (-row["added_top_calls"], -row["added_calls"], row["op"]))


def print_table(label: str, rows: list[dict], most: int, device: torch.device) -> None:
    time_key = "added_self_device_us" if device.type == "cuda" else "added_self_cpu_us"
    by_count = lambda r: (-r["added_top_calls"], -r["added_calls"])  # noqa: E731
    by_time = lambda r: -r[time_key]  # noqa: E731
    for title, key in (("by dispatched count", by_count), (f"by self time ({time_key[6:-3]})", by_time)):
        print(f"\n{label}: ops added over the limit, {title}")
        print(f"  {'op':52s} {'+top':>6s} {'+all':>6s} {'+self cpu ms':>13s} {'+self dev ms':>13s}")
        for row in sorted(rows, key=key)[:most]:
            print(f"  {row['op']:52s} {row['added_top_calls']:6d} {row['added_calls']:6d} "
                  f"{row['added_self_cpu_us'] / 1e3:13.3f} {row['added_self_device_us'] / 1e3:13.3f}")
    sys.stdout.flush()


def fused_step(ex: Extractor, batch, params) -> None:
    """The step `python -m dropinf.bench` times: the fused extraction of one planned batch."""
    with torch.enable_grad(), bench.frozen(params):
        ex._fused(batch, torch.float32)


def plan_size(ex: Extractor) -> dict:
    """How much the step hooks: planned modules, those hooked for this compressor (it reads one of
    their parameters) and their parameter slots, fallback sites, whole-model parameters."""
    plan = ex.plan
    read = ex._read_modules(ex.compressor)
    by_type = collections.Counter(type(m).__name__ for m in read)
    return {"planned_modules": len(plan.hooked), "hooked_modules": len(read),
            "param_slots": sum(len(slots) for slots in read.values()),
            "fallback_sites": len(plan.sites), "fallback_site_params": sum(len(n) for n in plan.sites.values()),
            "whole_model_params": len(plan.whole), "tracked_params": len(ex.named),
            "hooked_by_type": json.dumps(dict(sorted(by_type.items())))}


def _short(rows: list[dict], most: int = 8) -> str:
    """The ops dispatched most beyond the limit, as 'name +top-level calls'."""
    return "; ".join(f"{r['op']} +{r['added_top_calls']}" for r in rows[:most] if r["added_top_calls"] > 0)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, loss_fn, make = build(args.arch, getattr(torch, args.dtype), device)
    model.eval()
    batch = make(args.batch, torch.Generator().manual_seed(1))
    names = [n for n, _ in select_parameters(model, None)]
    params = list(model.parameters())
    base = {"arch": args.arch, "dtype": args.dtype, "batch": args.batch,
            "seq_len": batch["input_ids"].shape[1] if "input_ids" in batch else 0,
            **bench.provenance(device), "profiled_device": device.type}
    rows = bench.CsvRows(args.out)
    cuda = device.type == "cuda"

    def row(path, counts: Counts, wall: float, **extra):
        out = {**base, "path": path, **extra, "wall_ms": 1e3 * wall, "profiled_wall_ms": counts.profiled_wall_ms,
               "aten_ops_top": counts.aten_ops_top, "aten_ops_top_metadata": counts.aten_ops_top_metadata,
               "aten_ops_all": counts.aten_ops_all,
               "autograd_nodes": counts.autograd_nodes}
        if cuda:
            out.update(cuda_launches=counts.cuda_launches, cuda_kernels=counts.cuda_kernels,
                       kernel_ms=counts.kernel_ms)
        limit, limit_wall = lim  # (counts, wall seconds) of the limit, measured before any row
        keys = ["aten_ops_top", "aten_ops_top_metadata", "aten_ops_all", "autograd_nodes"]
        keys += ["cuda_launches", "cuda_kernels", "kernel_ms"] if cuda else []
        out.update({f"excess_{k}": getattr(counts, k) - getattr(limit, k) for k in keys})
        out["ratio_wall_limit"] = wall / limit_wall
        if extra.get("hooked_modules"):
            out["excess_ops_top_per_hooked_module"] = out["excess_aten_ops_top"] / extra["hooked_modules"]
        rows.append(out)
        kern = f" {counts.cuda_kernels:7d} kernels {counts.kernel_ms:9.2f} ms on device" if cuda else ""
        excess = (f"  {out['excess_aten_ops_top']:+d} ops over the limit "
                  f"({out['excess_aten_ops_top_metadata']:+d} of them views)")
        print(f"{path:26s} r={extra.get('r', '-')!s:>5}: {counts.aten_ops_top:7d} ops ({counts.aten_ops_all:7d} "
              f"with nested){kern} {1e3 * wall:9.2f} ms{excess}", flush=True)
        return out

    steps = dict(warmup=args.warmup, repeats=args.repeats)
    floor = profile_step(lambda: bench.floor_step(model, loss_fn, batch, params), device, **steps)
    for p in params:
        p.grad = None
    with bench.frozen(params):
        lim = profile_step(lambda: bench.limit_step(model, loss_fn, batch), device, **steps)
    row("floor_fwd_bwd", *floor)  # its excess over the limit: the weight gradients' own ops
    row("limit_fwd_activation_bwd", *lim)
    for name in args.compressors:
        for r in args.r:
            try:
                ex = Extractor(model, loss_fn, name, r=r, seed=0, params=names, device=device, self_check=False,
                               cuda_graph=False)
            except DropinfError as err:  # e.g. an r below the compressor's minimum for this model: say so, go on
                rows.append({**base, "path": f"fused_{name}", "compressor": name, "r": r, "error": str(err)[:300]})
                print(f"fused_{name} r={r}: {err}", flush=True)
                continue
            ex.prepare(batch)
            size = plan_size(ex)
            rows.append({**base, "path": f"plan_fused_{name}", "compressor": name, "r": r, **size})
            counts, wall = profile_step(lambda: fused_step(ex, batch, params), device, **steps)
            added = added_ops(counts, lim[0])
            row(f"fused_{name}", counts, wall, compressor=name, r=r, out_dim=ex.compressor.out_dim,
                hooked_modules=size["hooked_modules"], top_added_ops=_short(added))
            if args.table:
                print_table(f"fused_{name} r={r}", added, args.table, device)
            del ex
            if cuda:
                torch.cuda.empty_cache()
    return rows


def main(argv) -> None:
    ap = argparse.ArgumentParser(prog="python -m dropinf.bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2",
                    help="gpt2 | gpt2-tiny | pythia-1.4b | llama-3.2-1b | resnet9 | " + " | ".join(TINY))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--compressors", nargs="+", default=["dropout"],
                    choices=["dropout", "sjlt", "logra", "gaussian"])
    ap.add_argument("--r", type=int, nargs="+", default=[64])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="unprofiled calls for wall_ms (median)")
    ap.add_argument("--table", type=int, nargs="?", const=15, default=0,
                    help="print the N ops each fused path adds most of over the limit (default N 15)")
    ap.add_argument("--out", default=None, help="CSV path (default results/bench/kernels_<arch>_<dtype>_<device>.csv)")
    args = ap.parse_args(argv)
    args.out = args.out or f"results/bench/kernels_{args.arch}_{args.dtype}_{args.device}.csv"
    run(args)
    print(f"wrote {args.out}", file=sys.stderr)
