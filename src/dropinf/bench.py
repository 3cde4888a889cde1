"""Benchmark: compressed per-example gradient extraction against a training step, one process, one GPU.

    python -m dropinf.bench --arch gpt2 --dtype float32 --out results/reference/bench/gpt2_fp32.csv

For each architecture (built from its config with random weights: no downloads) it times, on the
same batch: (a) the floor, a batched forward+backward with all weight gradients and no optimizer,
and the limit, the same forward with an activation-only backward (weights frozen, the input
embeddings or images requiring grad, no hooks): what any per-example method must at least pay;
(b) fused extraction into (B, r) with each compressor; (c) the paper's way, a batch-size-1 loop that
forms each full gradient then gathers (dropout) or projects it (dense Gaussian); (d) Zarr write
throughput, an end-to-end run (extract + write N examples to Zarr) and scoring from Zarr.
Timings: warm-up, CUDA events, median of repeats, after the timed paths are checked against
per-example autograd. (e) the self-check's cost: the extra time of the first, checked batch (and
the coverage plan every extraction makes), as a fraction of a 2,000-example extraction.
Rows are CSV with provenance; every timed row has `seconds` (per batch) and its ratios to the floor
(`ratio_floor`) and to the limit (`ratio_limit`) of the same run. Eager fused paths also have
`ratio_limit_paired`: the median over pairs of the path and the limit timed back to back (eager
steps on bf16 models are host-bound, and host speed drifts within a run), and from the same pairs
`host_seconds_paired` / `limit_host_seconds_paired`, the host's time until the step returns, and
`host_fraction_paired`, the path's host time over its device time (near 1: host-bound).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .compressors.base import compressor as make_compressor
from .extraction import Extractor, _to_device, capture_stream
from .layout import select_parameters
from .models.lm import per_example_lm_loss

# ---- architectures (random init from config) ---------------------------------------------------


def _lm_loss(model, batch):
    # the project's LM loss (contiguous (B*T, V) cross-entropy: a transposed (B, V, T) layout
    # would hit PyTorch's slow "spatial" softmax and dominate both floor and extraction)
    return per_example_lm_loss(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["input_ids"])


def _img_loss(model, batch):
    return F.cross_entropy(model(batch["x"]).float(), batch["y"], reduction="none")


def build_arch(name: str, dtype: torch.dtype, device):
    """(model, loss_fn, make_batch(B, generator)) for a named architecture."""
    import transformers as tf

    if name == "resnet9":
        from .models.resnet9 import ResNet9

        model = ResNet9(in_channels=3, num_classes=10)

        def make(B, g):
            return {"x": torch.randn(B, 3, 32, 32, generator=g).to(device, dtype),
                    "y": torch.randint(10, (B,), generator=g).to(device)}
        return model.to(device, dtype), _img_loss, make
    if name == "gpt2":
        cfg, seq = tf.GPT2Config(), 256  # GPT-2 small: 124M parameters
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "gpt2-tiny":
        cfg, seq = tf.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=64), 32
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "pythia-1.4b":
        cfg, seq = tf.GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=24,
                                    num_attention_heads=16, intermediate_size=8192, rotary_pct=0.25,
                                    max_position_embeddings=2048, use_parallel_residual=True,
                                    tie_word_embeddings=False), 128
        model = tf.GPTNeoXForCausalLM(cfg)
    elif name == "llama-3.2-1b":
        cfg, seq = tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                  max_position_embeddings=2048, rope_theta=500000.0,
                                  tie_word_embeddings=True, rms_norm_eps=1e-5), 128
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown architecture {name!r}")
    vocab = cfg.vocab_size
    model.config._attn_implementation = "sdpa"

    def make(B, g):
        return {"input_ids": torch.randint(vocab, (B, seq), generator=g).to(device)}
    return model.to(device, dtype), _lm_loss, make


# ---- timing -------------------------------------------------------------------------------------


def timed_once(fn) -> tuple[float, float]:
    """(seconds, host seconds) of one call of fn: on a GPU, the device's time by CUDA events and the
    host's until fn returns (what it launched may still be running: a host time near the device's
    says the call was host-bound); on the CPU, both the wall time."""
    if torch.cuda.is_available():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s.record()
        fn()
        host = time.perf_counter() - t0
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / 1e3, host
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return wall, wall


def cuda_time(fn, warmup=2, repeats=5) -> float:
    """Median seconds of fn() over `repeats`, after `warmup` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_once(fn)[0] for _ in range(repeats))


def paired_ratio(fn, ref, warmup=2, repeats=5) -> dict:
    """fn timed against ref in `repeats` pairs run back to back: host-bound (eager) times drift
    within a run by more than the differences measured, and a ratio to a reference timed next to
    it cancels that drift. The median ratio and its range over the pairs (a host-bound step varies
    from step to step), the median seconds of each, and their host seconds (`timed_once`): the
    path's median share of host time in its own (1.0: the host is the bottleneck)."""
    for _ in range(warmup):
        ref()
        fn()
    pairs = []
    for _ in range(repeats):
        r = timed_once(ref)
        pairs.append((timed_once(fn), r))
    ratios = [a[0] / b[0] for a, b in pairs]
    return {"ratio_limit_paired": statistics.median(ratios), "ratio_limit_paired_min": min(ratios),
            "ratio_limit_paired_max": max(ratios),
            "limit_seconds_paired": statistics.median(b[0] for _, b in pairs),
            "seconds_paired": statistics.median(a[0] for a, _ in pairs),
            "limit_host_seconds_paired": statistics.median(b[1] for _, b in pairs),
            "host_seconds_paired": statistics.median(a[1] for a, _ in pairs),
            "host_fraction_paired": statistics.median(a[1] / a[0] for a, _ in pairs)}


def peak_mem(fn, reserved: bool = False):
    """Peak GiB allocated while `fn` runs; reserved=True: (allocated, reserved). A CUDA graph's
    private pool is reserved, not allocated, while it replays: only the reserved peak counts it."""
    if not torch.cuda.is_available():
        return (float("nan"),) * 2 if reserved else float("nan")
    torch.cuda.synchronize()
    gc.collect()  # an earlier path's extractor or graph still in a reference cycle would count here
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    alloc = torch.cuda.max_memory_allocated() / 2**30
    return (alloc, torch.cuda.max_memory_reserved() / 2**30) if reserved else alloc


def allocated_gib() -> float:
    """GiB allocated on the GPU now (after a collection), NaN without one."""
    if not torch.cuda.is_available():
        return float("nan")
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**30


def provenance(device) -> dict:
    from dropinf import gather_dot
    from dropinf.pipeline.common import git_state

    commit, dirty = git_state()
    # the device profiled, not merely whether a GPU exists (a CPU profile on a GPU machine says "cpu")
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    return {
        "git_commit": commit, "git_dirty": dirty,
        "dropinf_version": __version__, "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "gather_dot_kernel": gather_dot.status(on_cuda),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- the measured paths -------------------------------------------------------------------------


def floor_step(model, loss_fn, batch, params):
    for p in params:
        p.grad = None
    loss_fn(model, batch).sum().backward()


@contextlib.contextmanager
def frozen(params):
    """The parameters with requires_grad off (restored on exit): autograd computes no weight gradient."""
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)


def limit_step(model, loss_fn, batch):
    """The limit: forward and an activation-only backward through the whole network, no hooks. Call
    it with the weights frozen; the leaf requiring grad is the input embeddings (language models:
    looked up outside, passed as inputs_embeds) or the images."""
    if "input_ids" in batch:
        ids = batch["input_ids"]
        leaf = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = per_example_lm_loss(model(inputs_embeds=leaf, use_cache=False).logits, ids)
    else:
        leaf = batch["x"].detach().requires_grad_(True)
        loss = loss_fn(model, {**batch, "x": leaf})
    return torch.autograd.grad(loss.sum(), leaf)[0]


def graphed(step, batch):
    """`step(static_batch)` captured as one CUDA graph (after two warm-up calls on the shared capture
    stream); returns replay(batch), which copies the batch in and replays."""
    static = {k: v.clone() for k, v in batch.items()}
    side = capture_stream(batch[next(iter(batch))].device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(static)

    def replay():
        for k, v in batch.items():
            static[k].copy_(v)
        graph.replay()
    replay.keep = (graph, outputs)
    return replay


def graphed_floor(model, loss_fn, batch, params):
    """The floor as one CUDA graph (weight gradients returned, not accumulated): for comparing
    graph-replayed extraction with a training step that also has no Python in its loop."""
    return graphed(lambda b: torch.autograd.grad(loss_fn(model, b).sum(), params), batch)


def graphed_limit(model, loss_fn, batch, params):
    """The limit as one CUDA graph: what graph-replayed extraction is compared with like for like
    (the eager limit includes host time that a replay does not have)."""
    with frozen(params):
        return graphed(lambda b: limit_step(model, loss_fn, b), batch)


def per_example_loop(model, loss_fn, batch, params, post):
    """The paper's way: one full gradient per example (batch size 1), then `post(flat_grad)`."""
    B = next(iter(batch.values())).shape[0]
    outs = []
    for i in range(B):
        for p in params:
            p.grad = None
        one = {k: v[i:i + 1] for k, v in batch.items()}
        loss_fn(model, one).sum().backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        outs.append(post(flat))
    return torch.stack(outs)


def check_against_autograd(model, loss_fn, batch, names, compressors, device) -> dict:
    """Relative error of fused extraction vs per-example autograd (first 2 examples), per compressor."""
    params = dict(model.named_parameters())
    tracked = [params[n] for n in names]
    two = {k: v[:2] for k, v in batch.items()}
    model.eval()
    ref = []
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in two.items()}
        gs = torch.autograd.grad(loss_fn(model, one).sum(), tracked)
        ref.append(torch.cat([g.float().reshape(-1) for g in gs]))
    ref = torch.stack(ref)
    errs = {}
    for name, ex in compressors.items():
        if name == "identity":
            continue
        got = ex.run([two]).to(ref.device)
        if name == "dropout" or name.startswith("dropout"):
            want = ref[:, ex.compressor.indices.to(ref.device)]
        else:
            want = ex.compressor.compress(ref)
        errs[name] = ((got - want).norm() / want.norm()).item()
    return errs


class CsvRows(list):
    """Rows that rewrite their CSV whenever one is added: a run stopped later keeps what it measured."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path:
            write_csv(self, self.path)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)


def run(args, out: str | None = None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, loss_fn, make = build_arch(args.arch, dtype, device)
    model.eval()
    g = torch.Generator().manual_seed(1)
    batch = make(args.batch, g)
    named = select_parameters(model, None)
    params = [p for _, p in named]
    names = [n for n, _ in named]
    dim = sum(p.numel() for p in params)
    prov = provenance(device)
    base = {"arch": args.arch, "dtype": args.dtype, "batch": args.batch, "dim": dim, **prov}
    seq = batch["input_ids"].shape[1] if "input_ids" in batch else 0
    base["seq_len"] = seq
    rows = CsvRows(out)
    ref = {}  # seconds per batch of the floor and the limit, set before any other path is emitted

    def emit(path, r, seconds, mem, **extra):
        row = {**base, "path": path, "r": r, "seconds": seconds, "ms_per_example": 1e3 * seconds / args.batch,
               "ratio_floor": seconds / ref["floor"], "ratio_limit": seconds / ref["limit"],
               "peak_gib": mem, **extra}
        rows.append(row)
        print(f"{args.arch:14s} {args.dtype:8s} {path:28s} r={r!s:6s} {row['ms_per_example']:9.3f} ms/ex "
              f"peak {mem:6.2f} GiB {extra if extra else ''}", flush=True)
        return row

    floor = cuda_time(lambda: floor_step(model, loss_fn, batch, params), args.warmup, args.repeats)
    for p in params:
        p.grad = None
    # what is allocated outside a path (weights, inputs) when its peak is measured: equal for the
    # floor and every fused path, or the ratio counts leftovers of earlier paths
    floor_before = allocated_gib()
    floor_mem = peak_mem(lambda: floor_step(model, loss_fn, batch, params))
    for p in params:
        p.grad = None

    def limit_call():
        with frozen(params):
            return limit_step(model, loss_fn, batch)

    with frozen(params):
        limit = cuda_time(lambda: limit_step(model, loss_fn, batch), args.warmup, args.repeats)
        limit_mem = peak_mem(lambda: limit_step(model, loss_fn, batch))
    ref.update(floor=floor, limit=limit)
    emit("floor_fwd_bwd", "", floor, floor_mem)
    emit("limit_fwd_activation_bwd", "", limit, limit_mem,
         mem_ratio_to_floor=limit_mem / floor_mem if floor_mem == floor_mem else "")
    graph_floor = graph_limit = None
    if args.graph and device.type == "cuda":
        replay = graphed_floor(model, loss_fn, batch, params)
        graph_floor = cuda_time(replay, args.warmup, args.repeats)
        del replay
        replay = graphed_limit(model, loss_fn, batch, params)
        graph_limit = cuda_time(replay, args.warmup, args.repeats)
        del replay
        # peak memory of a replay is not comparable (the graph's private pool is allocated at capture)
        emit("floor_fwd_bwd_cudagraph", "", graph_floor, float("nan"), ratio_to_graph_floor=1.0,
             ratio_to_graph_limit=graph_floor / graph_limit)
        emit("limit_fwd_activation_bwd_cudagraph", "", graph_limit, float("nan"),
             ratio_to_graph_floor=graph_limit / graph_floor, ratio_to_graph_limit=1.0)
        gc.collect()
        torch.cuda.empty_cache()

    sizes = {"sjlt": args.sjlt_r, "logra": args.logra_r, "gaussian": args.gaussian_r}
    specs = [("dropout", r) for r in args.r if "dropout" in args.compressors]
    specs += [(name, sizes[name]) for name in sizes if name in args.compressors]
    if args.identity and dim * args.batch * 4 < 16 * 2**30:
        specs.append(("identity", None))

    def fused(ex, graphed=False):
        if ex.plan is None:
            ex.prepare(batch)
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(False)
            try:
                (ex._graphed if graphed else ex._fused)(batch, torch.float32)
            finally:
                for p in params:
                    p.requires_grad_(True)

    # One extractor at a time, freed before the next, so no compressor's caches (Gaussian tiles)
    # sit in the next one's peak memory.
    fused_seconds = {}
    for name, r in specs:
        key = name if name != "dropout" else f"dropout_r{r}"
        # what earlier paths left allocated (a graph capture's library workspaces, say) is not this
        # path's: measured before it is built, it is taken off its peak (the path's own caches,
        # built later, still count)
        leftover = allocated_gib() - floor_before
        ex = Extractor(model, loss_fn, name, r=r, seed=0, params=names)
        if args.check and name != "identity":
            err = check_against_autograd(model, loss_fn, batch, names, {key: ex}, device)[key]
            print(f"check {key}: relative error vs per-example autograd {err:.2e}", flush=True)
            rows.append({**base, "path": f"check_{key}", "r": "", "rel_err_vs_autograd": err})
        slow = name in ("gaussian", "identity")  # seconds per batch on 1B models: fewer repeats
        try:
            t = cuda_time(lambda: fused(ex), 1 if slow else args.warmup, min(2, args.repeats) if slow else args.repeats)
            paired = {} if slow else paired_ratio(lambda: fused(ex), limit_call, 1, max(9, args.repeats))
            m = peak_mem(lambda: fused(ex))
            measured = floor_mem == floor_mem
            # allocated_before_gib: what stays allocated between this path's calls (weights, its
            # plans and caches, and any leftover), i.e. the baseline its next call starts from
            emit(f"fused_{key}", ex.compressor.out_dim, t, m, **paired,
                 mem_ratio_to_floor=(m - leftover) / floor_mem if measured else "",
                 raw_mem_ratio_to_floor=m / floor_mem if measured else "", leftover_gib=leftover,
                 allocated_before_gib=allocated_gib(), floor_allocated_before_gib=floor_before)
            fused_seconds[key] = t
            if graph_floor is not None and getattr(ex.compressor, "graph_safe", True):
                ex.cuda_graph = True
                t = cuda_time(lambda: fused(ex, True), args.warmup, args.repeats)
                emit(f"fused_{key}_cudagraph", ex.compressor.out_dim, t, float("nan"),
                     ratio_to_graph_floor=t / graph_floor, ratio_to_graph_limit=t / graph_limit)
        except torch.OutOfMemoryError as err:
            rows.append({**base, "path": f"fused_{key}", "r": "", "error": f"OOM: {err}"[:200]})
        del ex
        gc.collect()  # its graphs' pool too, so that the next path's peak does not hold them
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    key = f"dropout_r{args.r[0]}"
    if key in fused_seconds:
        self_check_cost(model, loss_fn, batch, names, args.r[0], fused_seconds[key], base, emit)  # emit keeps its row

    if args.paper_loop:
        model.eval()
        r = args.r[0]
        idx = make_compressor("dropout", dim=dim, r=r, seed=0).indices.to(device)
        small = {k: v[: args.loop_examples] for k, v in batch.items()}
        t = cuda_time(lambda: per_example_loop(model, loss_fn, small, params, lambda f: f[idx]), 1, 3)
        emit("paper_loop_dropout", r, t * args.batch / args.loop_examples, float("nan"))
        pbytes = dim * r * 2  # the dense projection kept on the GPU in bf16, as the paper's baseline
        if pbytes < 0.5 * (torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0):
            P = torch.randn(r, dim, device=device, dtype=torch.bfloat16) / r ** 0.5
            t = cuda_time(lambda: per_example_loop(model, loss_fn, small, params,
                                                   lambda f: P @ f.to(torch.bfloat16)), 1, 3)
            emit("paper_loop_dense_gaussian_bf16", r, t * args.batch / args.loop_examples,
                 float("nan"), projection_gib=pbytes / 2**30)
            del P
        for p in params:
            p.grad = None

    if args.graph == "auto" and device.type == "cuda":
        graph_modes(args, model, loss_fn, make, names, emit)
    if args.e2e:
        rows.extend(end_to_end(args, model, loss_fn, make, names, base))
    return rows


def graph_modes(args, model, loss_fn, make, names, emit) -> None:
    """dropout r=args.r[0] through the public API over `--graph-batches` distinct batches, with
    cuda_graph False, True and "auto": seconds per batch of a first run (plan, self-check, captures
    and auto's timing included, as a short job sees them) and of a second run of the same extractor
    (graphs kept), and what auto decided."""
    g = torch.Generator().manual_seed(3)
    batches = [make(args.batch, g) for _ in range(args.graph_batches)]
    r = args.r[0]
    for mode in (False, True, "auto"):
        ex = Extractor(model, loss_fn, "dropout", r=r, seed=0, params=names, cuda_graph=mode)
        for run_ in ("first", "second"):
            ex.run(batches, progress=False)
            rep = ex.timings["cuda_graph"]
            shape = rep["shapes"][0] if rep["shapes"] else {}
            emit(f"api_dropout_r{r}_graph_{str(mode).lower()}_{run_}_run", r,
                 ex.timings["extract_seconds"] / len(batches), float("nan"), n_batches=len(batches),
                 graph_decision=shape.get("decision", ""), graph_eager_ms=shape.get("eager_ms"),
                 graph_replay_ms=shape.get("graph_ms"), graph_capture_s=shape.get("capture_seconds"))
        del ex
        torch.cuda.empty_cache()


def self_check_cost(model, loss_fn, batch, names, r, batch_seconds, base, emit, n_examples=2000,
                    repeats=3) -> dict:
    """Cost of the self-check (on by default, first batch): one-batch extractions by fresh
    extractors with and without it (both plan coverage and warm the compressor's caches), the
    difference, and that as a fraction of extracting `n_examples` (ceil(n/B) fused batches + the
    coverage plan + the check)."""
    B = next(iter(batch.values())).shape[0]
    on, off, plans = [], [], []
    for i in range(repeats + 1):  # the first round warms up
        for check, times in ((True, on), (False, off)):
            ex = Extractor(model, loss_fn, "dropout", r=r, seed=0, params=names, self_check=check)
            ex.run([batch])
            if i:
                times.append(ex.timings["extract_seconds"])
                plans.append(ex.timings["plan_seconds"])
            del ex
    extra = max(0.0, statistics.median(on) - statistics.median(off))
    plan = statistics.median(plans)
    total = -(-n_examples // B) * batch_seconds + plan + extra
    return emit(f"self_check_dropout_r{r}", r, extra, float("nan"), self_check_extra_s=extra, plan_s=plan,
                first_batch_checked_s=statistics.median(on), first_batch_unchecked_s=statistics.median(off),
                n_examples=n_examples, self_check_fraction=extra / total, plan_fraction=plan / total)


def end_to_end(args, model, loss_fn, make, names, base) -> list[dict]:
    """N examples: extract (dropout) and write to a Zarr array; then score from Zarr on the GPU."""
    import zarr

    from .influence import influence

    out = []
    tmp = Path(tempfile.mkdtemp(prefix="dropinf-bench-"))
    try:
        r = args.r[-1]
        g = torch.Generator().manual_seed(2)
        batches = [make(args.batch, g) for _ in range(max(1, args.e2e_examples // args.batch))]
        n = len(batches) * args.batch
        ex = Extractor(model, loss_fn, "dropout", r=r, seed=0, params=names)
        ex.run(batches[:1])  # warm-up (plans, kernels)
        arr = zarr.create_array(tmp / "g.zarr", shape=(n, r), chunks=(args.batch * 4, r), dtype="float32")
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        ex.run(batches, sink=lambda s, x: arr.__setitem__(slice(s, s + x.shape[0]), x.cpu().numpy()))
        secs = time.perf_counter() - t0
        out.append({**base, "path": "e2e_extract_dropout_to_zarr", "r": r, "n_examples": n,
                    "seconds": secs, "ms_per_example": 1e3 * secs / n})
        print(f"e2e: {n} examples extracted + written to Zarr in {secs:.2f} s", flush=True)
        # Zarr write throughput alone
        data = torch.randn(n, r).numpy()
        arr2 = zarr.create_array(tmp / "w.zarr", shape=(n, r), chunks=(args.batch * 4, r), dtype="float32")
        t0 = time.perf_counter()
        arr2[:] = data
        w = time.perf_counter() - t0
        out.append({**base, "path": "zarr_write", "r": r, "n_examples": n, "seconds": w,
                    "mb_per_s": data.nbytes / 2**20 / w})
        # scoring: n_train x n_test at r = 4096 from Zarr
        nt, mt, rs = args.score_train, args.score_test, 4096
        big = zarr.create_array(tmp / "s.zarr", shape=(nt, rs), chunks=(2048, rs), dtype="float32")
        big[:] = torch.randn(nt, rs).numpy()
        test = torch.randn(mt, rs)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        influence(big, test, "exact", device=dev, dtype=torch.float32)  # warm-up
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        s = influence(big, test, "exact", device=dev, dtype=torch.float32, reduce=False)
        secs = time.perf_counter() - t0
        assert s.shape == (nt, mt)
        out.append({**base, "path": "score_exact_from_zarr", "r": rs, "n_examples": nt, "n_test": mt,
                    "seconds": secs})
        print(f"score: {nt} x {mt} at r={rs} from Zarr in {secs:.2f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_csv(rows: list[dict], path: str) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _paired_cell(row: dict) -> str:
    """The paired ratio to the limit, with the range over its pairs where recorded: "1.05 [0.98–1.31]"."""
    if row.get("ratio_limit_paired") in (None, "", "nan"):
        return "–"
    cell = f"{float(row['ratio_limit_paired']):.2f}"
    if row.get("ratio_limit_paired_min") not in (None, "", "nan"):
        cell += f" [{float(row['ratio_limit_paired_min']):.2f}–{float(row['ratio_limit_paired_max']):.2f}]"
    return cell


def _host_cell(row: dict) -> str:
    """The eager path's host time until a step returns over its device time, and the limit's next to
    it (near 1: the step waits on the host; CSVs from before these columns: –)."""
    try:
        own = float(row["host_fraction_paired"])
        limit = float(row["limit_host_seconds_paired"]) / float(row["limit_seconds_paired"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "–"
    return f"{own:.2f} ({limit:.2f})"


def markdown_table(paths: list[str]) -> str:
    """README table from benchmark CSVs: ms/example, ratios to the floor and to the limit, peak memory
    (CSVs written before the limit existed have `ratio_to_floor` and no limit)."""
    lines = ["| architecture | dtype | device | path | r (out dim) | ms / example | × eager floor | × limit | "
             "× limit, paired [range] | host / device, paired (limit's) | × graph floor | × graph limit | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                if not row.get("ms_per_example") or row["path"].startswith(("check_", "e2e", "zarr", "score")):
                    continue
                fmt = lambda k, spec: format(float(row[k]), spec) if row.get(k) not in (None, "", "nan") else "–"  # noqa: E731
                floor_key = "ratio_floor" if "ratio_floor" in row else "ratio_to_floor"
                lines.append(f"| {row['arch']} (B={row['batch']}) | {row['dtype']} | {row.get('device') or '–'} | "
                             f"{row['path']} | {row['r'] or '–'} | "
                             f"{fmt('ms_per_example', '.3f')} | {fmt(floor_key, '.2f')} | "
                             f"{fmt('ratio_limit', '.2f')} | {_paired_cell(row)} | {_host_cell(row)} | "
                             f"{fmt('ratio_to_graph_floor', '.2f')} | {fmt('ratio_to_graph_limit', '.2f')} | "
                             f"{fmt('peak_gib', '.2f')} |")
    return "\n".join(lines)


def ihvp_timing(argv) -> None:
    """iHVP seconds per method at a given size (the paper's timing tables): synthetic gradients of the
    right shapes (sizes, not values, set the cost), each method checked finite, median of repeats.

        python -m dropinf.bench ihvp --n 4500 --d 294912 --m 500 --r 16 --out ihvp.csv
    """
    from .compressors.base import compressor as make
    from .influence import influence

    ap = argparse.ArgumentParser(prog="python -m dropinf.bench ihvp")
    ap.add_argument("--n", type=int, default=4500)
    ap.add_argument("--d", type=int, default=294912, help="tracked coordinates (RoBERTa LoRA rank 8 on q,v: 294,912)")
    ap.add_argument("--layers", type=int, default=48, help="per-layer blocks for the full-space methods")
    ap.add_argument("--m", type=int, default=500)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench/ihvp.csv")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    train = torch.randn(a.n, a.d, generator=g).to(dev)
    test = torch.randn(a.m, a.d, generator=g).to(dev)
    edges = torch.linspace(0, a.d, a.layers + 1).long().tolist()
    blocks = list(zip(edges[:-1], edges[1:]))
    base = {"n": a.n, "d": a.d, "m": a.m, "layers": a.layers, **provenance(dev)}
    rows = []

    def timed(label, fn, **extra):
        fn()  # warm-up
        times = []
        for _ in range(a.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        assert torch.isfinite(out).all(), label
        rows.append({**base, "path": f"ihvp_{label}", "seconds": statistics.median(times), **extra})
        print(f"ihvp {label:24s} {statistics.median(times):8.3f} s", flush=True)

    from .pipeline.methods import FULL_SPACE

    for method in FULL_SPACE:  # every registered solver on raw gradients
        timed(method, lambda: influence(train, test, method, blocks=blocks, device=dev, dtype=torch.float32))
    for name in ("dropout", "gaussian", "sjlt"):
        c = make(name, dim=a.d, r=a.r, seed=0)
        comp_t = statistics.median([_timed_call(lambda: (c.compress(train), c.compress(test)), dev)
                                    for _ in range(a.repeats)])
        rows.append({**base, "path": f"compress_{name}", "r": a.r, "seconds": comp_t})
        print(f"compress {name:20s} {comp_t:8.3f} s", flush=True)
        ct, cs = c.compress(train), c.compress(test)
        timed(f"exact_{name}_r{a.r}", lambda: influence(ct, cs, "exact", device=dev, dtype=torch.float32), r=a.r)
    write_csv(rows, a.out)
    print(f"wrote {a.out}", file=sys.stderr)


def probe_timing(argv) -> None:
    """Cost of importance_dropout's once-per-job work against a dropout extraction of many examples, on
    one random-init architecture: the second-moment probe (each estimator) and the draw of the r
    coordinates (keys over all d coordinates, on the extraction's device). The exact probe is first
    checked against per-example autograd on two examples.

        python -m dropinf.bench probe --arch gpt2 --probe 32 64 256 --examples 2000 --out probe.csv
    """
    from .compressors.importance import ImportanceDropout
    from .layout import Layout
    from .probe import ESTIMATORS, second_moments

    ap = argparse.ArgumentParser(prog="python -m dropinf.bench probe")
    ap.add_argument("--arch", default="gpt2", help="gpt2 | gpt2-tiny | pythia-1.4b | llama-3.2-1b | resnet9")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--probe", type=int, nargs="+", default=[32, 64, 256],
                    help="examples in the probe (one or more sizes)")
    ap.add_argument("--estimator", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    ap.add_argument("--examples", type=int, default=2000, help="examples in the extraction it is compared with")
    ap.add_argument("--r", type=int, default=512, help="kept coordinates")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--out", default=None, help="CSV path (default results/bench/probe_<arch>_<dtype>.csv)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = device.type
    torch.manual_seed(0)
    model, loss_fn, make = build_arch(a.arch, getattr(torch, a.dtype), device)
    model.eval()
    g = torch.Generator().manual_seed(1)
    batches = [make(a.batch, g) for _ in range(-(-max([a.examples] + a.probe) // a.batch))]
    n_extract = -(-a.examples // a.batch) * a.batch
    names = [name for name, _ in select_parameters(model, None)]
    layout = Layout.from_model(model)
    base = {"arch": a.arch, "dtype": a.dtype, "batch": a.batch, "dim": layout.dim, **provenance(device)}
    rows = []
    if a.check:  # exact probe of two examples == squares of their per-example autograd gradients
        params = dict(model.named_parameters())
        two = {k: v[:2] for k, v in batches[0].items()}
        ref = []
        for i in range(2):
            gs = torch.autograd.grad(loss_fn(model, {k: v[i:i + 1] for k, v in two.items()}).sum(),
                                     [params[name] for name in names])
            ref.append(torch.cat([x.float().reshape(-1) for x in gs]))
        want = torch.stack(ref).square().mean(0).cpu()
        got = second_moments(model, loss_fn, [two], 2, 0, estimator="exact")
        err = ((got - want).norm() / want.norm()).item()
        rows.append({**base, "path": "check_probe", "probe_estimator": "exact", "rel_err_vs_autograd": err})
        print(f"check probe: relative error vs per-example autograd {err:.2e}", flush=True)
    extractor = Extractor(model, loss_fn, "dropout", r=a.r, seed=0, params=names)
    extractor.run(batches[:1], sink=lambda s, x: None)  # warm-up (plans, kernels)
    extract_s = _timed_call(lambda: extractor.run(batches[:n_extract // a.batch], sink=lambda s, x: None), dev)
    timed = [("extract_dropout", extract_s, n_extract, {})]
    weights = None
    for est in a.estimator:
        second_moments(model, loss_fn, batches[:1], min(a.batch, 4), 0, estimator=est)  # warm-up
        for n in a.probe:
            held = []
            secs = _timed_call(lambda: held.append(second_moments(model, loss_fn, batches, n, 0, estimator=est,
                                                                  on_device=True)), dev)
            timed.append(("probe_second_moments", secs, n, {"probe_estimator": est}))
            weights = held[0]
    if weights is not None:  # the draw reads the weights where the probe left them: the extraction's device
        ImportanceDropout(layout.dim, a.r, 1, layout, weights=weights)  # warm-up
        draw_s = _timed_call(lambda: ImportanceDropout(layout.dim, a.r, 0, layout, weights=weights), dev)
        timed.append(("importance_draw", draw_s, None, {"draw_device": weights.device.type}))
        # the once-per-job total against the 2,000-example extraction: each probe plus one draw
        timed += [("probe_and_draw", secs + draw_s, count, extra) for path, secs, count, extra in list(timed)
                  if path == "probe_second_moments"]
    for path, secs, count, extra in timed:
        rows.append({**base, "path": path, "r": a.r, "n_examples": count, "seconds": secs,
                     "ratio_to_extract": secs / extract_s, **extra})
        print(f"{a.arch} {path:22s} {extra.get('probe_estimator', ''):9s} {'' if count is None else count:>6} "
              f"examples {secs:9.3f} s ({100 * secs / extract_s:6.2f}% of the {n_extract}-example dropout "
              f"extraction)", flush=True)
    out = a.out or f"results/bench/probe_{a.arch}_{a.dtype}.csv"
    write_csv(rows, out)
    print(f"wrote {out}", file=sys.stderr)


def _timed_call(fn, dev) -> float:
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _table(argv) -> None:
    print(markdown_table(argv))


def _lazy(module: str, name: str = "main"):
    """The entry point of a benchmark module, imported only when its subcommand runs."""
    def load():
        import importlib

        return getattr(importlib.import_module(module, __package__), name)
    return load


#: `python -m dropinf.bench <name> ...`: the other benchmarks, each with its own flags
SUBCOMMANDS = {
    "table": lambda: _table,
    "ihvp": lambda: ihvp_timing,
    "probe": lambda: probe_timing,
    "query": _lazy(".pipeline.query_bench"),
    "throughput": _lazy(".bench_throughput"),
    "peers": _lazy(".bench_peers"),
    "memory": _lazy(".bench_memory"),
    "kernels": _lazy(".bench_kernels"),
}


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        return SUBCOMMANDS[sys.argv[1]]()(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m dropinf.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", help="gpt2 | gpt2-tiny | pythia-1.4b | llama-3.2-1b | resnet9")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--r", type=int, nargs="+", default=[64, 512], help="dropout sizes")
    ap.add_argument("--gaussian-r", type=int, default=512)
    ap.add_argument("--logra-r", type=int, default=4096, help="per-layer budget (64x64)")
    ap.add_argument("--sjlt-r", type=int, default=512)
    ap.add_argument("--compressors", nargs="+", default=["dropout", "sjlt", "logra", "gaussian"],
                    choices=["dropout", "sjlt", "logra", "gaussian"],
                    help="fused paths to time (Gaussian takes seconds per batch on the 1B models)")
    ap.add_argument("--identity", action="store_true", help="also time raw per-example gradients if they fit")
    ap.add_argument("--paper-loop", action="store_true", help="also time the batch-size-1 loop")
    ap.add_argument("--loop-examples", type=int, default=8)
    ap.add_argument("--e2e", action="store_true", help="end-to-end extract→Zarr and scoring from Zarr")
    ap.add_argument("--e2e-examples", type=int, default=2000)
    ap.add_argument("--score-train", type=int, default=10000)
    ap.add_argument("--score-test", type=int, default=1000)
    ap.add_argument("--graph", nargs="?", const="replay", choices=["replay", "auto"], default=None,
                    help="also time CUDA-graph replays (floor and extraction); 'auto' also times whole "
                         "dropinf.extract runs with cuda_graph False, True and 'auto'")
    ap.add_argument("--graph-batches", type=int, default=24, help="batches of the --graph auto runs")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="CSV path (default results/bench/<arch>_<dtype>.csv)")
    args = ap.parse_args(argv)
    out = args.out or f"results/bench/{args.arch}_{args.dtype}.csv"
    write_csv(run(args, out), out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
