"""Where extraction's memory goes: the peak of each path against the floor's, and what makes it up.

    python -m dropinf.bench memory --arch gpt2 --batch 4 --out results/bench/memory_gpt2_cpu.csv
    python -m dropinf.bench memory --arch resnet9 --batch 64 --r 64 512
    python -m dropinf.bench memory --arch gpt2 --dtype float32 --batch 32 --r 512 --device cuda

For the floor (a batched forward+backward with every weight gradient) and for the fused extraction
with each compressor and r, on the same batch, one call of each is recorded and replayed: the peak
of live bytes, what is alive at that moment, and, against the floor, what is alive at the
extraction's peak that the floor's peak has no same-sized counterpart for: the memory a path adds,
by size ("3072.0 KiB x 26" is 26 tensors of B x T x 768 floats, e.g. a copy of each LayerNorm's
normalized input). Rows are CSV with provenance (`bench.provenance`, `bench.write_csv`).

--device cpu (default; deterministic, no GPU needed): `torch.profiler`'s memory profile
(`profile(profile_memory=True)`) gives every tensor's allocation and free, and what is alive at the
peak is given by the profiler's category (activation, parameter, gradient, ...). Replaying its
timeline uses `torch.profiler._memory_profiler`, an internal module of PyTorch: if a release moves
it, this command says so and stops.

--device cuda: the CUDA caching allocator's own trace (`torch.cuda.memory._record_memory_history`,
Python stacks) is replayed with the allocator's block sizes, so the replayed peak is
`torch.cuda.max_memory_allocated()` over the same call (both are in the row, with their difference;
a warning if they differ). What is alive at the peak is grouped by the code that allocated it, and
the row names where in the step the peak was reached. See docs/profile-memory.md.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import sys
import sysconfig

import torch

from . import bench
from .errors import DropinfError
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


# ---- CUDA: the caching allocator's own trace ------------------------------------------------------
#
# Replaying `torch.cuda.memory._record_memory_history`'s device trace reproduces the allocator's
# `allocated_bytes` statistic, whose peak is `torch.cuda.max_memory_allocated()`:
#  - a block counts from its `alloc` to its `free_requested`: the allocator lowers allocated_bytes
#    when the free is requested. `free_completed` (at once, or once work on another stream that used
#    the block is done) only returns the block to the free layout, merged with free neighbours.
#  - a block counts with its block size, not the requested size the trace records: the request is
#    rounded up to 512 bytes, and a cached free block is only split if what remains is at least
#    512 bytes (small pool, requests up to 1 MiB) or more than 1 MiB (large pool); otherwise the
#    whole free block is handed out. So the replay keeps the layout of every segment (free and
#    allocated blocks by address, freed neighbours merged), starting from a snapshot taken just
#    before the call, which also gives the blocks already allocated then (parameters, the batch,
#    library workspaces: "preexisting"). These are the rules of the default configuration; with
#    expandable segments they are not, and the measurement refuses to run.

_MIN_BLOCK = 512  # the allocator's rounding (kMinBlockSize)
_SMALL_SIZE = 1 << 20  # the largest small-pool request (kSmallSize); also the large pool's split threshold
PREEXISTING = "preexisting"
NO_PYTHON_FRAME = "no Python frame (autograd engine / C++)"
TORCH_INTERNAL = "torch internal"


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One allocated block: its address, block size (what allocated_bytes counts), the requested size
    and the Python frames of the allocation, innermost first (empty for preexisting blocks)."""
    addr: int
    size: int
    requested: int
    frames: tuple = ()
    preexisting: bool = False


@dataclasses.dataclass
class TracePeak:
    peak: int  # bytes allocated at the peak, preexisting included
    preexisting: int  # bytes allocated when the trace started
    end: int  # bytes allocated when it ended
    at_peak: list  # the Allocations live at the peak
    peak_alloc: Allocation | None  # the allocation that set the peak (None: the peak is the start)
    events: int
    unplaced: int  # allocs or frees the layout could not place (the block size is then a guess)
    ignored: dict  # actions not replayed, with counts (segment_map/unmap: expandable segments)


# a snapshot block's state: "active_pending_free" is what the snapshot writes for a block whose free
# awaits another stream; torch.cuda.memory._snapshot's docstring calls it "active_awaiting_free"
_STATES = {"active_allocated": "allocated", "active_pending_free": "awaiting", "active_awaiting_free": "awaiting"}


@dataclasses.dataclass
class _Block:
    size: int
    segment: int  # blocks of different cudaMalloc segments never merge, even when adjacent
    state: str  # "allocated" | "awaiting" (free requested) | "free"


def _round(size: int) -> int:
    return max(_MIN_BLOCK, -(-size // _MIN_BLOCK) * _MIN_BLOCK)


class _Layout:
    """Blocks by start address, with the allocator's split and merge rules."""

    def __init__(self):
        self.blocks: dict[int, _Block] = {}
        self.ends: dict[int, int] = {}  # end address -> start address
        self.segments = 0

    def put(self, addr: int, block: _Block) -> None:
        self.blocks[addr] = block
        self.ends[addr + block.size] = addr

    def drop(self, addr: int) -> _Block:
        block = self.blocks.pop(addr)
        del self.ends[addr + block.size]
        return block

    def new_segment(self, addr: int, size: int) -> int:
        self.segments += 1
        self.put(addr, _Block(size, self.segments, "free"))
        return self.segments

    def take(self, addr: int, requested: int) -> int | None:
        """Block size handed out for `requested` bytes at `addr`, or None if no free block starts there."""
        block = self.blocks.get(addr)
        if block is None or block.state != "free":
            return None
        want = _round(requested)
        remaining = block.size - want
        if remaining < 0:
            return None
        if remaining >= _MIN_BLOCK if want <= _SMALL_SIZE else remaining > _SMALL_SIZE:
            self.drop(addr)
            self.put(addr, _Block(want, block.segment, "allocated"))
            self.put(addr + want, _Block(remaining, block.segment, "free"))
        else:
            block.state = "allocated"
        return self.blocks[addr].size

    def release(self, addr: int) -> None:
        """The block at `addr` is reusable again: merge it with free neighbours of its segment."""
        block = self.blocks.get(addr)
        if block is None:
            return
        block.state = "free"
        after = self.blocks.get(addr + block.size)
        if after is not None and after.state == "free" and after.segment == block.segment:
            self.drop(addr + block.size)
            self.drop(addr)
            block.size += after.size
            self.put(addr, block)
        start = self.ends.get(addr)
        before = self.blocks.get(start) if start is not None else None
        if before is not None and before.state == "free" and before.segment == block.segment:
            self.drop(addr)
            self.drop(start)
            before.size += block.size
            self.put(start, before)


def replay_trace(snapshot: dict, device: int = 0) -> TracePeak:
    """The peak of allocated bytes over `snapshot["device_traces"][device]` (a list of
    `torch.cuda.memory._snapshot()` trace entries: action, addr, size, frames), starting from the
    layout in `snapshot["segments"]` (segments with their blocks: size, state, frames; taken when the
    trace started). Pure: no CUDA needed."""
    layout = _Layout()
    live: dict[int, Allocation] = {}
    for seg in snapshot.get("segments", []):
        if seg.get("device", device) != device:
            continue
        layout.segments += 1
        addr = seg["address"]
        for b in seg["blocks"]:
            addr = b.get("address", addr)
            state = _STATES.get(b["state"], "free")
            layout.put(addr, _Block(b["size"], layout.segments, state))
            if state == "allocated":
                live[addr] = Allocation(addr, b["size"], b.get("requested_size", b["size"]),
                                        tuple(b.get("frames") or ()), preexisting=True)
            addr += b["size"]
    current = preexisting = sum(a.size for a in live.values())
    best, at_peak, peak_alloc = current, list(live.values()), None
    unplaced, ignored = 0, collections.Counter()
    events = snapshot["device_traces"][device]
    for e in events:
        action = e["action"]
        if action == "alloc":
            size = layout.take(e["addr"], e["size"])
            if size is None:
                unplaced += 1
                size = _round(e["size"])
            a = live[e["addr"]] = Allocation(e["addr"], size, e["size"], tuple(e.get("frames") or ()))
            current += size
            if current > best:
                best, at_peak, peak_alloc = current, list(live.values()), a
        elif action == "free_requested":
            a = live.pop(e["addr"], None)
            if a is None:
                unplaced += 1
                continue
            current -= a.size
            block = layout.blocks.get(e["addr"])
            if block is not None:
                block.state = "awaiting"
        elif action == "free_completed":
            layout.release(e["addr"])
        elif action == "segment_alloc":
            layout.new_segment(e["addr"], e["size"])
        elif action == "segment_free":
            if e["addr"] in layout.blocks:
                layout.drop(e["addr"])
        elif action not in ("snapshot", "oom"):
            ignored[action] += 1
    return TracePeak(best, preexisting, current, at_peak, peak_alloc, len(events), unplaced, dict(ignored))


class Sites:
    """Names an allocation by the code that made it: the innermost frame outside PyTorch and the
    standard library, as "file.py:line function" (dropinf's files by their path in the package);
    when that frame is not dropinf's (model code) and a dropinf frame calls it, "... via <dropinf frame>"."""

    def __init__(self, own: str | None = None):
        import dropinf

        self.own = own or os.path.dirname(os.path.abspath(dropinf.__file__)) + os.sep
        self.torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
        self.stdlib = sysconfig.get_paths()["stdlib"] + os.sep

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _path(filename: str) -> str:
        # frames carry code objects' filenames, relative when the module was imported by a relative path
        return filename if filename.startswith("<") else os.path.abspath(filename)

    def is_own(self, filename: str) -> bool:
        return self._path(filename).startswith(self.own)

    def is_framework(self, filename: str) -> bool:
        """PyTorch's own files, the standard library's (not its site-packages) and frozen modules."""
        filename = self._path(filename)
        if filename.startswith(("<", self.torch_dir)):
            return True
        return filename.startswith(self.stdlib) and not filename[len(self.stdlib):].startswith(
            ("site-packages", "dist-packages"))

    def name(self, frame: dict) -> str:
        filename = self._path(frame["filename"])
        if filename.startswith(self.own):
            shown = "dropinf/" + filename[len(self.own):].replace(os.sep, "/")
        else:
            shown = os.path.basename(filename)
        return f"{shown}:{frame['line']} {frame['name']}"

    def own_frames(self, frames) -> list:
        """The frames of dropinf and user code (not PyTorch, not the standard library), innermost first."""
        return [f for f in frames if not self.is_framework(f["filename"])]

    def of(self, a: Allocation | None) -> str:
        if a is None or a.preexisting:
            return PREEXISTING
        if not a.frames:
            return NO_PYTHON_FRAME
        mine = self.own_frames(a.frames)
        if not mine:
            return TORCH_INTERNAL
        inner = mine[0]
        if self.is_own(inner["filename"]):
            return self.name(inner)
        caller = next((f for f in mine if self.is_own(f["filename"])), None)
        return self.name(inner) + (f" via {self.name(caller)}" if caller is not None else "")

    def stack(self, a: Allocation | None, most: int = 8) -> str:
        """The dropinf and user frames of an allocation, innermost first: where in the step it happened."""
        if a is None or a.preexisting:
            return PREEXISTING
        return " < ".join(self.name(f) for f in self.own_frames(a.frames)[:most]) or self.of(a)

    def by_site(self, allocations) -> dict[str, list[int]]:
        """site -> [bytes, count], largest first."""
        out: dict[str, list[int]] = {}
        for a in allocations:
            entry = out.setdefault(self.of(a), [0, 0])
            entry[0] += a.size
            entry[1] += 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def added_vs(fused: TracePeak, floor: TracePeak, sites: Sites) -> dict:
    """What is live at the fused peak and not at the floor's: by block size (multiset difference)
    and by site (bytes per site beyond the floor's bytes there)."""
    sizes = collections.Counter(a.size for a in fused.at_peak) - collections.Counter(a.size for a in floor.at_peak)
    by_site = (collections.Counter({k: v[0] for k, v in sites.by_site(fused.at_peak).items()})
               - collections.Counter({k: v[0] for k, v in sites.by_site(floor.at_peak).items()}))
    return {"sizes": sizes, "sites": dict(by_site.most_common())}


def allocator_peak(fn, device: torch.device, max_entries: int = 1_000_000) -> tuple[TracePeak, int, int]:
    """(the replayed trace of one call of `fn`, torch.cuda.max_memory_allocated() over that call,
    torch.cuda.memory_allocated() after it). `fn` runs once before, unrecorded, so that lazy state
    (plans, library workspaces) is preexisting rather than counted as the call's."""
    from torch.cuda import memory as cuda_memory

    index = device.index if device.index is not None else torch.cuda.current_device()
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = cuda_memory._snapshot()  # the layout the call starts from (no history recorded yet)
    if before.get("allocator_settings", {}).get("expandable_segments") or any(
            s.get("is_expandable") for s in before["segments"]):
        raise DropinfError("bench memory --device cuda: the CUDA allocator uses expandable segments "
                           "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), whose blocks the trace replay "
                           "does not model; run without it")
    cuda_memory._record_memory_history("all", context="alloc", stacks="python", max_entries=max_entries,
                                       clear_history=True)
    try:
        fn()
        torch.cuda.synchronize(device)
        after = cuda_memory._snapshot()
    finally:
        cuda_memory._record_memory_history(enabled=None)
    max_allocated = torch.cuda.max_memory_allocated(device)
    allocated = torch.cuda.memory_allocated(device)
    events = after["device_traces"][index]
    if len(events) >= max_entries:
        raise DropinfError(f"bench memory: the allocator trace holds {len(events)} events, its limit "
                           f"(--max-entries {max_entries}): the oldest were overwritten; raise --max-entries")
    segments = [s for s in before["segments"] if s.get("device", index) == index]
    trace = replay_trace({"segments": segments, "device_traces": {index: events}}, device=index)
    return trace, max_allocated, allocated


def _mib(nbytes: int) -> float:
    return round(nbytes / 2**20, 3)


def _sites_json(by_site: dict, most: int = 12) -> str:
    return json.dumps({k: {"mib": _mib(b), "count": n} for k, (b, n) in list(by_site.items())[:most]})


def cuda_row(base: dict, path: str, r, measured: tuple[TracePeak, int, int], sites: Sites,
             floor: TracePeak | None = None) -> dict:
    """One CSV row from `allocator_peak`, printed; warns when the replay and the allocator disagree."""
    trace, max_allocated, allocated = measured
    by_site = sites.by_site(trace.at_peak)
    out = {**base, "path": path, "r": r, "method": "cuda_allocator_trace",
           "peak_mib": trace.peak / 2**20, "max_memory_allocated_mib": max_allocated / 2**20,
           "replay_minus_max_allocated_bytes": trace.peak - max_allocated,
           "replay_end_minus_allocated_bytes": trace.end - allocated,
           "preexisting_mib": trace.preexisting / 2**20, "peak_at": sites.of(trace.peak_alloc),
           "peak_stack": sites.stack(trace.peak_alloc), "sites_mib": _sites_json(by_site),
           "largest_live": _sizes(collections.Counter(a.size for a in trace.at_peak)),
           "trace_events": trace.events, "unplaced_events": trace.unplaced,
           "ignored_actions": json.dumps(trace.ignored)}
    if floor is not None:
        added = added_vs(trace, floor, sites)
        out.update(mem_ratio_to_floor=trace.peak / floor.peak, added_vs_floor=_sizes(added["sizes"]),
                   added_mib=sum(s * n for s, n in added["sizes"].items()) / 2**20,
                   added_sites_mib=json.dumps({k: _mib(v) for k, v in list(added["sites"].items())[:12]}))
    ratio = f" = {out['mem_ratio_to_floor']:.3f}x the floor" if floor is not None else ""
    print(f"{path:14s} r={r if r is not None else '-':>5}: peak {out['peak_mib']:9.1f} MiB (allocator: "
          f"{out['max_memory_allocated_mib']:.1f} MiB){ratio}; the peak is set at {out['peak_at']}", flush=True)
    for site, (nbytes, n) in list(by_site.items())[:8]:
        print(f"    {nbytes / 2**20:9.1f} MiB x{n:<4d} {site}", flush=True)
    if floor is not None and out["added_sites_mib"] != "{}":
        print(f"    added vs the floor: {out['added_vs_floor'] or 'nothing'}; by site {out['added_sites_mib']}",
              flush=True)
    # a few minimum blocks of slack: anything more means the replay misreads the allocator
    if abs(trace.peak - max_allocated) > 4 * _MIN_BLOCK or abs(trace.end - allocated) > 4 * _MIN_BLOCK:
        print(f"WARNING bench memory {path} r={r}: the replayed trace peaks at {trace.peak} bytes, "
              f"torch.cuda.max_memory_allocated() says {max_allocated} (difference {trace.peak - max_allocated}); "
              f"at the end {trace.end} against memory_allocated() {allocated}; {trace.unplaced} events could "
              f"not be placed, actions not replayed: {trace.ignored or 'none'}", file=sys.stderr, flush=True)
    return out


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

    def floor_fn():
        bench.floor_step(model, loss_fn, batch, params)

    def extractors():
        for name in args.compressors:
            for r in args.r:
                yield name, r, Extractor(model, loss_fn, name, r=r, seed=0, device=device, self_check=False,
                                         cuda_graph=False)

    if device.type == "cuda":
        sites = Sites()
        floor_trace = allocator_peak(floor_fn, device, args.max_entries)
        for p in params:
            p.grad = None
        rows.append(cuda_row(base, "floor_fwd_bwd", None, floor_trace, sites))
        for name, r, ex in extractors():
            measured = allocator_peak(lambda: ex.run([batch], progress=False), device, args.max_entries)
            rows.append(cuda_row(base, f"fused_{name}", r, measured, sites, floor=floor_trace[0]))
            del ex, measured
            torch.cuda.empty_cache()
        return rows

    floor = profile_peak(floor_fn, device)
    for p in params:
        p.grad = None
    row("floor_fwd_bwd", None, *floor)
    for name, r, ex in extractors():
        row(f"fused_{name}", r, *profile_peak(lambda: ex.run([batch], progress=False), device), floor=floor)
    return rows


def main(argv) -> None:
    ap = argparse.ArgumentParser(prog="python -m dropinf.bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", help="gpt2 | gpt2-tiny | pythia-1.4b | llama-3.2-1b | resnet9")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--compressors", nargs="+", default=["dropout"])
    ap.add_argument("--r", type=int, nargs="+", default=[64])
    ap.add_argument("--device", default="cpu", help="cpu (default: the profiler's timeline) or cuda (the "
                    "caching allocator's trace)")
    ap.add_argument("--max-entries", type=int, default=1_000_000,
                    help="cuda: events the allocator trace keeps (a call with more stops with an error)")
    ap.add_argument("--out", default=None, help="CSV path (default results/bench/memory_<arch>_<dtype>_<device>.csv)")
    args = ap.parse_args(argv)
    rows = run(args)
    out = args.out or f"results/bench/memory_{args.arch}_{args.dtype}_{args.device}.csv"
    bench.write_csv(rows, out)
    print(f"wrote {out}", file=sys.stderr)
