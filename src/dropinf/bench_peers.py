"""The field's per-example gradient compressors inside our benchmark, on one workload, each against its own floor.

    python -m dropinf.bench peers --out results/bench/peers_gpt2_float32.csv
    python -m dropinf.bench peers --arch gpt2-tiny --examples 8 --seq 32 --batch 4 --device cpu --table

Runs, one process each and one at a time (`dropinf.bench_peers_worker`): dropinf's dropout (each
--r, and the first --r on the nn.Linear layers alone: the scope of dattri and LogIX), SJLT and
LoGra (all parameters, and the nn.Linear layers alone), and, where they are installed, dattri (BlockProjectedIF with a random-mask sparsifier, LoGra,
FactGraSS), TRAK (traker: featurize with its JL projector) and LogIX (logix-ai: LoGra). Every
process builds the same model (random weights from its config, seed 0) and the same seeded token
batches, times its own floor (batched forward + backward with every weight gradient, no optimizer)
and then the peer's compression of all the examples, and records both peak memories. A peer that
is not importable is a row with status "not installed"; one that fails is a row with its error;
neither stops the others. Rows are CSV with provenance and each peer's package version.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import bench
from .bench_peers_worker import PEERS


def default_runs(args) -> list[tuple[str, dict]]:
    """(peer, settings) for every row, in order; --peers keeps a subset."""
    runs = [("dropinf-dropout", {"r": r}) for r in args.r] + [("dropinf-dropout-linear", {"r": args.r[0]})]
    runs += [("dropinf-sjlt", {"r": args.sjlt_r}), ("dropinf-logra", {"r": args.logra_r}),
             ("dropinf-logra-linear", {"r": args.logra_r}),
             ("dattri-bpif-random-mask", {"k": args.dattri_k}), ("dattri-logra", {"proj_dim": args.dattri_k ** 2}),
             ("dattri-factgrass", {"proj_dim": args.dattri_k ** 2, "blowup": args.factgrass_blowup}),
             ("traker", {"proj_dim": args.trak_proj_dim}), ("logix-logra", {"rank": args.logix_rank})]
    if args.peers:
        unknown = set(args.peers) - set(PEERS)
        if unknown:
            raise SystemExit(f"--peers: unknown {sorted(unknown)}; known: {sorted(PEERS)}")
        runs = [run for run in runs if run[0] in args.peers]
    return runs


def installed(peer: str) -> list[str]:
    """The modules a peer needs that cannot be imported here (empty when it can run)."""
    return [m for m in PEERS[peer].modules if importlib.util.find_spec(m) is None]


def run_peer(peer: str, opts: dict, args, tmp: Path, index: int) -> dict:
    out = tmp / f"row{index}.json"
    cmd = [sys.executable, "-m", "dropinf.bench_peers_worker", "--peer", peer, "--opts", json.dumps(opts),
           "--arch", args.arch, "--dtype", args.dtype, "--examples", str(args.examples), "--seq", str(args.seq),
           "--batch", str(args.batch), "--device", args.device, "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--out", str(out)]
    env = dict(os.environ)
    # the workers import this very package, whichever source tree the harness runs from
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.no_compile:
        env["TORCHDYNAMO_DISABLE"] = "1"
    print(f"peers: {peer} {json.dumps(opts)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=args.timeout)
    if out.exists():
        row = json.loads(out.read_text())
        if row.get("status") != "ok":
            print(proc.stdout[-4000:], file=sys.stderr)
        return row
    # the process died before writing its row (killed, out of memory on the host, ...)
    print(proc.stdout[-4000:], file=sys.stderr)
    return {"status": f"error: worker exited with status {proc.returncode} and wrote no row"}


def run(args, out: str | None = None) -> list[dict]:
    device = torch.device(args.device)
    if args.jobs > 1 and device.type == "cuda":
        raise SystemExit("--jobs > 1 is for CPU smoke runs: peers sharing a GPU would time each other")
    base = {"arch": args.arch, "dtype": args.dtype, "examples": args.examples, "batch": args.batch,
            "seq_len": args.seq, **bench.provenance(device), "harness_pid": os.getpid()}
    runs = default_runs(args)

    def one(i, peer, opts, tmp):
        spec = PEERS[peer]
        head = {**base, "peer": peer, "package": spec.package, "method": spec.method,
                "requested": json.dumps(opts, sort_keys=True)}
        missing = installed(peer)
        if missing:
            return {**head, "status": "not installed", "missing_modules": " ".join(missing)}
        try:
            return {**head, **run_peer(peer, opts, args, tmp, i)}
        except subprocess.TimeoutExpired:
            return {**head, "status": f"error: no row within --timeout {args.timeout} s"}

    with tempfile.TemporaryDirectory(prefix="dropinf-peers-") as tmp, \
            ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = bench.CsvRows(out)
        for r in pool.map(lambda job: one(job[0], *job[1], Path(tmp)), enumerate(runs)):
            rows.append(r)
            if r["status"] == "ok":
                print(f"{r['peer']:24s} {r['ms_per_example']:9.3f} ms/ex  {r['ratio_floor']:5.2f}x its floor "
                      f"(floor {r['floor_ms_per_example']:.3f} ms/ex)  out dim {r['r']}", flush=True)
            else:
                print(f"{r['peer']:24s} {r['status']}", flush=True)
    return rows


def main(argv) -> None:
    ap = argparse.ArgumentParser(prog="python -m dropinf.bench peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", help="a language model of dropinf.bench (gpt2 | gpt2-tiny | ...)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--r", type=int, nargs="+", default=[64, 512], help="dropinf dropout sizes")
    ap.add_argument("--sjlt-r", type=int, default=512)
    ap.add_argument("--logra-r", type=int, default=64, help="dropinf LoGra per-layer budget (64: 8x8)")
    ap.add_argument("--dattri-k", type=int, default=8, help="dattri per-layer factor size (k x k per layer)")
    ap.add_argument("--factgrass-blowup", type=int, default=4)
    ap.add_argument("--trak-proj-dim", type=int, default=2048)
    ap.add_argument("--logix-rank", type=int, default=8)
    ap.add_argument("--peers", nargs="+", default=None, help=f"only these, of {sorted(PEERS)}")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up passes over all examples (dattri compiles in them)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    ap.add_argument("--no-compile", action="store_true",
                    help="TORCHDYNAMO_DISABLE=1 in the workers (dattri compiles its compressor with torch.compile)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="peer processes at a time (CPU smoke runs only: concurrent processes disturb the timings)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per peer process")
    ap.add_argument("--table", action="store_true", help="also print the markdown table")
    ap.add_argument("--out", default=None, help="CSV path (default results/bench/peers_<arch>_<dtype>.csv)")
    args = ap.parse_args(argv)
    if args.examples % args.batch:
        raise SystemExit(f"--examples {args.examples} is not a multiple of --batch {args.batch}: every peer "
                         "gets the same full batches")
    out = args.out or f"results/bench/peers_{args.arch}_{args.dtype}.csv"
    rows = run(args, out)
    bench.write_csv(rows, out)
    print(f"wrote {out}", file=sys.stderr)
    if args.table:  # dropinf.bench's table (peer = path, r = output width), then the rows without numbers
        print(bench.markdown_table([out]))
        for r in rows:
            if r["status"] != "ok":
                print(f"- {r['peer']}: {r['status']}")


if __name__ == "__main__":
    main(sys.argv[1:])
