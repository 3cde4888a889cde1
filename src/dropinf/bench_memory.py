"""Where extraction's memory goes: the peak of each path against the floor's, from a profile.

    python -m dropinf.bench memory --arch gpt2 --batch 4 --out results/bench/memory_gpt2_cpu.csv
    python -m dropinf.bench memory --arch resnet9 --batch 64 --r 64 512

For the floor (a batched forward+backward with every weight gradient) and for the fused extraction
with each compressor and r, on the same batch, `torch.profiler`'s memory profile gives every tensor's
allocation and free. Replaying them gives the peak of live bytes, what is alive at that moment by
the profiler's category (activation, parameter, gradient, autograd detail, ...), and, against the
floor, the tensors alive at the extraction's peak that have no same-sized counterpart at the
floor's: the memory a path adds, by size ("3072.0 KiB x 26" is 26 tensors of B x T x 768 floats,
e.g. a copy of each LayerNorm's normalized input). The profile is of the device the model is on
(CPU by default: deterministic, no GPU needed; a GPU's allocator also keeps cached blocks and
cuBLAS workspaces, which `python -m dropinf.bench`'s `mem_ratio_to_floor` includes).
Rows are CSV with provenance (`bench.provenance`, `bench.write_csv`).

The memory profile is `torch.profiler`'s (`profile(profile_memory=True)`); replaying its timeline
uses `torch.profiler._memory_profiler`, an internal module of PyTorch: if a release moves it, this
command says so and stops.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from . import bench
from .extraction import Extractor


def profile_peak(fn, device: torch.device) -> tuple[int, dict, collections.Counter]:
    """(peak live bytes on `device`, bytes by category at the peak, sizes of the tensors live then)
    over one call of `fn` (called once before, so that lazy state is not counted)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
    except ImportError as err:  # an internal module of PyTorch: say so rather than guess
        raise SystemExit(f"bench memory: this PyTorch ({torch.__version__}) has no memory-profile timeline "
                         f"({err})") from None
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    mp = prof._memory_profile()
    live: dict = {}
    current = best = 0
    at_peak: dict = {}
    for _, action, (key, version), size in mp.timeline:
        if key.device.type != device.type:
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live[(key, version)] = size
            current += size
        elif action == Action.INCREMENT_VERSION:
            if (key, version) in live:
                live[(key, version + 1)] = live.pop((key, version))
        elif action == Action.DESTROY and (key, version) in live:
            current -= live.pop((key, version))
        if current > best:
            best, at_peak = current, dict(live)
    by_category: collections.Counter = collections.Counter()
    for (key, version), size in at_peak.items():
        category = mp._categories.get(key, version)
        by_category[category.name if category is not None else "UNKNOWN"] += size
    return best, dict(by_category), collections.Counter(at_peak.values())


def _sizes(counter: collections.Counter, most: int = 6) -> str:
    """The largest sizes of a multiset of tensor sizes, as 'KiB x count' (largest first)."""
    top = sorted(counter.items(), key=lambda kv: kv[0] * kv[1], reverse=True)[:most]
    return "; ".join(f"{size / 1024:.1f} KiB x {n}" for size, n in top)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, loss_fn, make = bench.build_arch(args.arch, dtype, device)
    model.eval()
    batch = make(args.batch, torch.Generator().manual_seed(1))
    params = list(model.parameters())
    base = {"arch": args.arch, "dtype": args.dtype, "batch": args.batch, **bench.provenance(device),
            "profiled_device": device.type}
    rows = []

    def row(path, r, peak, cats, sizes, floor=None):
        out = {**base, "path": path, "r": r, "peak_mib": peak / 2**20,
               "by_category_mib": json.dumps({k: round(v / 2**20, 3) for k, v in sorted(cats.items())}),
               "largest_live": _sizes(sizes)}
        if floor is not None:
            out.update(mem_ratio_to_floor=peak / floor[0], added_vs_floor=_sizes(sizes - floor[2]),
                       added_mib=sum(s * n for s, n in (sizes - floor[2]).items()) / 2**20)
        rows.append(out)
        ratio = f" = {out['mem_ratio_to_floor']:.3f}x the floor; added: {out['added_vs_floor'] or 'nothing'}" \
            if floor is not None else ""
        print(f"{path:14s} r={r if r is not None else '-':>5}: peak {out['peak_mib']:9.1f} MiB{ratio}", flush=True)
        return out

    floor = profile_peak(lambda: bench.floor_step(model, loss_fn, batch, params), device)
    for p in params:
        p.grad = None
    row("floor_fwd_bwd", None, *floor)
    for name in args.compressors:
        for r in args.r:
            ex = Extractor(model, loss_fn, name, r=r, seed=0, device=device, self_check=False, cuda_graph=False)
            row(f"fused_{name}", r, *profile_peak(lambda: ex.run([batch], progress=False), device), floor=floor)
    return rows


def main(argv) -> None:
    ap = argparse.ArgumentParser(prog="python -m dropinf.bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", help="gpt2 | gpt2-tiny | pythia-1.4b | llama-3.2-1b | resnet9")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--compressors", nargs="+", default=["dropout"])
    ap.add_argument("--r", type=int, nargs="+", default=[64])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default=None, help="CSV path (default results/bench/memory_<arch>_<dtype>_<device>.csv)")
    args = ap.parse_args(argv)
    rows = run(args)
    out = args.out or f"results/bench/memory_{args.arch}_{args.dtype}_{args.device}.csv"
    bench.write_csv(rows, out)
    print(f"wrote {out}", file=sys.stderr)
