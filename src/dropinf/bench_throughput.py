"""Throughput at scale: many examples extracted into Zarr through the extract stage, against the floor.

    python -m dropinf.bench throughput --examples 100000 --out results/bench/throughput_gpt2_fp32.csv
    python -m dropinf.bench throughput --examples 40000 --shards 4          # and as 4 processes on one device
    python -m dropinf.bench throughput --arch gpt2-tiny --examples 64 --seq 16 --device cpu --shards 2

It writes random token ids (`--seq` tokens, uniform over the vocabulary) as a prepared-data file and
a randomly initialized GPT-2 (`dropinf.models.gpt2` from its transformers config: no downloads) as
a model file, then measures:

1. **one process**: the extract stage (`dropinf.pipeline.extract.extract(job=...)`, what the
   workflow's `extract` rule runs) over every example into Zarr; examples/s over its passes (from the
   first array's writer opening to the last one's closing), and the background writer's waits:
   `compute_wait_seconds` + `drain_seconds` (compute waiting for the writer: a free block during
   the pass, the last blocks at its end) and `writer_wait_seconds` (the writer waiting for rows);
2. **the floor**: a batched forward+backward with every weight gradient (`bench.floor_step`) on the
   same model, loss and batch size, median of repeats; examples/s and the ratios;
3. with `--shards K`: the same extraction as K processes (`python -m dropinf extract --shards K
   --shard k`, the workflow's shard mechanism) started together on the one device, then
   `extract_finalize`; examples/s over the span of all their passes, and the arrays compared bit
   for bit with the one-process run's (the command exits 1 when they differ). As a diagnostic,
   whether the first `REPEAT_BATCHES` batches extracted twice in one process give identical bits
   (`repeatable_batches`); identical bits there do not prove the kernels deterministic (a race may
   happen to resolve the same way), different bits prove them not.

With `--deterministic` every extraction here (the bench process, from before its first CUDA use, and
each shard process) runs with deterministic kernels only (`extract.deterministic`:
`torch.use_deterministic_algorithms(True)`, `CUBLAS_WORKSPACE_CONFIG=:4096:8`); rows record it.

Rows are CSV with provenance (`bench.provenance`, `bench.write_csv`).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: --arch: the `gpt2` model's config names (dropinf.models.gpt2.CONFIGS)
ARCHS = {"gpt2": "small", "gpt2-mini": "mini", "gpt2-tiny": "tiny"}
GPT2_VOCAB = 50257
SEED = 0  # the compressor seed of every extraction here
#: batches extracted twice for `repeatable_batches` (one batch matched by chance where four did not)
REPEAT_BATCHES = 4


def make_inputs(root: Path, *, arch: str, n_train: int, n_test: int, seq: int, vocab: int, dtype: str) -> dict:
    """data.pt (random token ids, every token real) and model.pt (a random-init GPT-2) under `root`."""
    from .pipeline.common import Stage
    from .pipeline.prepare import load_prepared, save_tensors
    from .pipeline.train import build, save_weights

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (n_train + n_test, seq), generator=g)
    split = lambda a, b: {"input_ids": ids[a:b].contiguous(), "attention_mask": torch.ones(b - a, seq,  # noqa: E731
                                                                                            dtype=torch.long)}
    header = {"name": "random_tokens", "task": "lm", "num_classes": None,
              "meta": {"vocab_size": vocab, "seq_len": seq, "eos_token_id": vocab - 1}, "label_noise": 0.0,
              "noise_seed": 0,
              "dataset_options": {"n_train": n_train, "n_test": n_test, "seq": seq, "vocab": vocab},
              "provenance": Stage("prepare_data").provenance()}
    save_tensors(root / "data.pt", {"train": split(0, n_train), "test": split(n_train, n_train + n_test)}, header)
    options = {"config": ARCHS[arch], "vocab_size": vocab, "dtype": dtype}
    spec = build(load_prepared(root / "data.pt"), "gpt2", options, seed=0)
    save_weights(root / "model.pt", spec.module, {"model": "gpt2", "model_options": options, "train": {"seed": 0},
                                                  "init": None})
    return options


def writer_summary(records: list[dict]) -> dict:
    """The background writers' waits over the part records (every seed and split), and the span of
    the passes: the first writer's opening to the last one's closing (wall clock)."""
    stats = [st for rec in records for seed in (rec.get("writer") or {}).values() for st in seed.values()]
    if not stats:
        raise SystemExit("the part records hold no writer statistics (not a gradient pass?)")
    out = {k: float(sum(st[k] for st in stats)) for k in ("compute_wait_seconds", "drain_seconds",
                                                          "writer_wait_seconds", "write_seconds")}
    out.update(blocks_written=int(sum(st["blocks_written"] for st in stats)), block_rows=stats[0]["block_rows"],
               writer_depth=stats[0]["depth"], pinned=stats[0]["pinned"],
               span_seconds=max(st["closed_at"] for st in stats) - min(st["opened_at"] for st in stats))
    opened = [[st["opened_at"] for seed in (rec.get("writer") or {}).values() for st in seed.values()]
              for rec in records]
    starts = [min(times) for times in opened if times]  # parts with rows
    out["start_skew_seconds"] = max(starts) - min(starts)  # parts that began later lengthen the span
    out["stall_seconds"] = out["compute_wait_seconds"] + out["drain_seconds"]
    return out


def compare_arrays(a_dir: Path, b_dir: Path, manifest: dict, block_rows: int = 8192) -> dict:
    """Bitwise comparison of every (seed, split) array of two extraction directories, in row blocks."""
    from .pipeline.storage import open_array

    differing, max_abs, rows = 0, 0.0, 0
    for seed, splits in manifest["arrays"].items():
        for split, rel in splits.items():
            a, b = open_array(a_dir / rel), open_array(b_dir / rel)
            if a.shape != b.shape:
                raise SystemExit(f"{a_dir / rel} has shape {a.shape}, {b_dir / rel} {b.shape}")
            for s in range(0, a.shape[0], block_rows):
                x, y = np.asarray(a[s:s + block_rows]), np.asarray(b[s:s + block_rows])
                same = (x.view(np.uint32) == y.view(np.uint32)).all(axis=1)
                differing += int((~same).sum())
                if not same.all():
                    max_abs = max(max_abs, float(np.nanmax(np.abs(x.astype(np.float64) - y))))
            rows += a.shape[0]
    return {"bitwise_equal": differing == 0, "differing_rows": differing, "compared_rows": rows,
            "max_abs_diff": max_abs}


def floor_and_repeatability(data: Path, model: Path, *, device, batch: int, compressor: str, r, warmup: int,
                            repeats: int) -> dict:
    """Seconds per batch of the floor on the stage's model and loss, and whether extracting the first
    `REPEAT_BATCHES` batches twice gives identical bits."""
    from .bench import cuda_time, floor_step
    from .extraction import Extractor
    from .pipeline.prepare import load_prepared, model_inputs
    from .pipeline.train import load_trained

    blob = load_prepared(data)
    spec, _ = load_trained(model, blob, device)
    train = {k: v[:batch * REPEAT_BATCHES].to(device) for k, v in model_inputs(blob["train"]).items()}
    rows = next(iter(train.values())).shape[0]
    batches = [{k: v[i:i + batch] for k, v in train.items()} for i in range(0, rows, batch)]
    inputs = batches[0]
    params = [p for p in spec.module.parameters() if p.requires_grad]
    floor = cuda_time(lambda: floor_step(spec.module, spec.loss_fn, inputs, params), warmup, repeats)
    for p in params:
        p.grad = None
    ex = Extractor(spec.module, spec.loss_fn, compressor, r=r, seed=SEED, params=spec.params, device=device,
                   self_check=False)
    first, again = (ex.run(batches, progress=False) for _ in range(2))
    repeatable, repeated = bool(torch.equal(first.view(torch.int32), again.view(torch.int32))), len(batches)
    del spec, ex, inputs, params, train, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the shard processes get the device's memory
    return {"floor_seconds_per_batch": floor, "repeatable_batches": repeatable, "repeated_batches": repeated}


def differ_message(shards: int, differing_rows: int, *, deterministic: bool) -> str:
    """Why the command fails when the sharded arrays differ, and what to do about it."""
    msg = f"the {shards}-shard arrays differ from the one-process run's in {differing_rows} rows"
    if not deterministic:
        msg += ("; without --deterministic, non-deterministic kernels (e.g. the attention backward) make runs "
                "differ at rounding level: rerun with --deterministic to compare bits")
    return msg


def run_shards(root: Path, out: Path, *, shards: int, args, device: str) -> tuple[list[dict], float, float]:
    """K processes of the extract command, one part each, started together; then extract_finalize.
    Returns (part records, wall seconds of the K processes, seconds of finalize)."""
    from .pipeline import extract as extract_mod
    from .pipeline.common import read_json
    from .pipeline.sharding import part_path

    src = str(Path(__file__).resolve().parents[1])  # the processes import this dropinf, not another one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    base = [sys.executable, "-m", "dropinf", "--no-progress", "extract", "--data", str(root / "data.pt"),
            "--model", str(root / "model.pt"), "--out-dir", str(out), "--compressor", args.compressor,
            "--r", "full" if args.compressor == "identity" else str(args.r), "--seeds", str(SEED),
            "--batch-size", str(args.batch),
            "--device", device, "--experiment", "throughput", "--shards", str(shards)]
    if args.deterministic:
        base.append("--deterministic")
    if args.threads:
        base += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    procs = []
    for k in range(shards):
        log = open(logs / f"shard{k}of{shards}.log", "w")
        procs.append((subprocess.Popen(base + ["--shard", str(k)], stdout=log, stderr=subprocess.STDOUT, env=env),
                      log))
    failed = []
    for k, (p, log) in enumerate(procs):
        if p.wait() != 0:
            failed.append(k)
        log.close()
    wall = time.perf_counter() - t0
    for k in failed:
        tail = (logs / f"shard{k}of{shards}.log").read_text()[-3000:]
        print(f"--- shard {k} of {shards} failed; its log ends:\n{tail}", file=sys.stderr)
    if failed:
        raise SystemExit(f"throughput: shard(s) {failed} of {shards} failed")
    parts = [part_path(out, kind="pass", shard=k, shards=shards) for k in range(shards)]
    t1 = time.perf_counter()
    extract_mod.finalize(out_dir=out, parts=parts, experiment="throughput")
    return [read_json(p) for p in parts], wall, time.perf_counter() - t1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dropinf.bench throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", choices=sorted(ARCHS), help="GPT-2 size (random weights)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--examples", type=int, default=100_000, help="training examples extracted")
    ap.add_argument("--test-examples", type=int, default=0, help="examples of the test split (also extracted)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per example")
    ap.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default {GPT2_VOCAB}; gpt2-tiny 1024)")
    ap.add_argument("--batch", type=int, default=32, help="examples per batch (extraction and floor)")
    ap.add_argument("--compressor", default="dropout")
    ap.add_argument("--r", type=int, default=512, help="compressed size")
    ap.add_argument("--device", default=None, help="cuda (default where available) or cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of every process")
    ap.add_argument("--shards", type=int, default=0, help="also run the extraction as this many processes")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic kernels only, in this process and the shard processes (extract.deterministic)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="where the data, model and arrays go (default: a temporary "
                                                    "directory, removed at the end)")
    ap.add_argument("--out", default=None, help="CSV path (default results/bench/throughput_<arch>_<dtype>.csv)")
    a = ap.parse_args(argv)
    from .pipeline.common import deterministic_algorithms

    # before this process's first CUDA use (the one-process extraction and the floor run here)
    with deterministic_algorithms(a.deterministic, key="--deterministic"):
        _run(a)


def _run(a) -> None:
    from .bench import CsvRows, provenance, write_csv
    from .pipeline import extract as extract_mod
    from .pipeline.common import device_name, read_json
    from .pipeline.sharding import part_path
    from .progress import set_enabled

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    set_enabled(False)  # no progress bars over 100,000 examples: the summary lines say what happened
    vocab = a.vocab or (1024 if a.arch == "gpt2-tiny" else GPT2_VOCAB)
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="dropinf-throughput-"))
    root.mkdir(parents=True, exist_ok=True)
    failed = None
    out = a.out or f"results/bench/throughput_{a.arch}_{a.dtype}.csv"
    rows = CsvRows(out)  # rewritten after every row: a run stopped later keeps what it measured
    try:
        t0 = time.perf_counter()
        make_inputs(root, arch=a.arch, n_train=a.examples, n_test=a.test_examples, seq=a.seq, vocab=vocab,
                    dtype=a.dtype)
        print(f"inputs: {a.examples} + {a.test_examples} examples x {a.seq} tokens, random {a.arch} "
              f"({a.dtype}) in {time.perf_counter() - t0:.1f} s", flush=True)
        n = a.examples + a.test_examples
        r = None if a.compressor == "identity" else a.r
        job = extract_mod.ExtractJob(data=root / "data.pt", model=root / "model.pt", out_dir=root / "one",
                                     compressor=a.compressor, r=r, seeds=(SEED,), batch_size=a.batch,
                                     device=str(device), threads=a.threads, experiment="throughput",
                                     deterministic=a.deterministic)
        t0 = time.perf_counter()
        manifest = extract_mod.extract(job=job)
        stage_s = time.perf_counter() - t0
        one = writer_summary([read_json(part_path(root / "one", kind="pass", shard=0, shards=1))])
        ref = floor_and_repeatability(root / "data.pt", root / "model.pt", device=device, batch=a.batch,
                                      compressor=a.compressor, r=r, warmup=a.warmup, repeats=a.repeats)
        floor_eps = a.batch / ref["floor_seconds_per_batch"]
        base = {"arch": a.arch, "dtype": a.dtype, "seq_len": a.seq, "vocab": vocab, "batch": a.batch,
                "compressor": a.compressor, "r": manifest["out_dim"], "dim": manifest["dim"], "n_examples": n,
                **provenance(device if device.type == "cuda" else None), "device": device_name(device),
                "torch_threads": torch.get_num_threads(), "deterministic": a.deterministic}
        rows.append({**base, "path": "floor_fwd_bwd", "seconds": ref["floor_seconds_per_batch"],
                     "examples_per_s": floor_eps})

        def emit(path, summary, **extra):
            eps = n / summary["span_seconds"]
            row = {**base, "path": path, "seconds": summary["span_seconds"], "examples_per_s": eps,
                   "floor_examples_per_s": floor_eps, "throughput_vs_floor": eps / floor_eps,
                   "ratio_floor": floor_eps / eps, **summary, **extra}
            rows.append(row)
            print(f"{path:26s} {n} examples in {summary['span_seconds']:8.2f} s: {eps:9.1f} ex/s = "
                  f"{row['throughput_vs_floor']:.3f}x the floor's {floor_eps:.1f} ex/s; compute waited "
                  f"{summary['stall_seconds']:.3f} s on the writer, the writer {summary['writer_wait_seconds']:.2f} s "
                  f"on compute (writing took {summary['write_seconds']:.2f} s)", flush=True)
            return row

        repeat = {"repeatable_batches": ref["repeatable_batches"], "repeated_batches": ref["repeated_batches"]}
        emit("extract_to_zarr", one, stage_seconds=stage_s, **repeat)
        if a.shards > 0:
            recs, wall, fin = run_shards(root, root / f"shards{a.shards}", shards=a.shards, args=a,
                                         device=device.type)
            summary = writer_summary(recs)
            eq = compare_arrays(root / "one", root / f"shards{a.shards}", manifest)
            emit(f"extract_to_zarr_shards{a.shards}", summary, shards=a.shards, processes_wall_seconds=wall,
                 finalize_seconds=fin, span_vs_one_process=summary["span_seconds"] / one["span_seconds"],
                 **repeat, **eq)
            print(f"shards: {a.shards} processes on one {device.type} device in {wall:.1f} s (start-up and model "
                  f"load included); arrays {'bitwise equal to' if eq['bitwise_equal'] else 'DIFFER from'} the "
                  f"one-process run ({eq['differing_rows']} of {eq['compared_rows']} rows differ, max |diff| "
                  f"{eq['max_abs_diff']:.3g}; the first {ref['repeated_batches']} batches twice in one process: "
                  f"{'identical' if ref['repeatable_batches'] else 'NOT identical'}; deterministic kernels: "
                  f"{'on' if a.deterministic else 'off'})", flush=True)
            if not eq["bitwise_equal"]:
                failed = differ_message(a.shards, eq["differing_rows"], deterministic=a.deterministic)
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)
    write_csv(rows, out)
    print(f"wrote {out}", file=sys.stderr)
    if failed:
        raise SystemExit(f"throughput: {failed}")


if __name__ == "__main__":
    main()
