"""Stage `extract`: compressed per-example gradients of the fine-tuned model, written to Zarr.

One job per (compressor, r): for every seed and both splits it runs `dropinf.extraction.Extractor`
(one fused forward+backward per batch) and streams rows into a chunked Zarr array:

    {out_dir}/seed{seed}/{split}.zarr      (compressed, seeded)
    {out_dir}/{split}.zarr                 (identity: raw gradients, no seed)
    {out_dir}/manifest.json                (written last: the job's done marker)

Sharded (`shards` > 1): job k of `shards` fills only its own contiguous, chunk- and batch-aligned
rows of those same arrays, in place (`storage.shard_plan`, `storage.ensure_array`), for every seed,
then writes its done marker `{out_dir}/shards/{k}of{shards}.json`. `finalize` (a cheap last job)
checks that the markers exist, agree and tile every split, marks the arrays complete and writes
the manifest; it copies no data. A shard computes exactly the batches an unsharded run computes
for its rows, so the finished arrays equal an unsharded run's bit for bit on the same device.

Nesting: for a compressor whose output at r' < r is a function of its output at r (`nests_in_r`:
dropout, gaussian), a complete larger-r sibling directory of the same model, data, options and
device type serves r' by `Compressor.nest` (column slicing) instead of a new pass. This happens
here, at run time, so the DAG never makes one r depend on another.

From identity: when the complete raw-gradient (`identity`) extraction of the same model, data,
tracked parameters and device type exists (`grads/identity/full`, manifest complete), a compressor
is served by its matrix path (`Compressor.compress`, chunked over rows read from the identity
arrays) instead of a new pass; logged `FROM_IDENTITY:` and recorded as `served_from`. Nesting is
preferred when both apply (it reads r columns, not d). Also a run-time decision: the DAG never
makes a compressor depend on the identity extraction (the `extract` rule only runs identity first).

Identity: skipped (manifest status "skipped", with the reason) when n * d * 4 bytes exceeds the
budget; the full-space methods then recompute raw gradients from the model (`score.gradients`).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import BudgetError, DropinfError
from .common import Stage, clean_stale, file_sha256, jsonable, log, read_json, remove, write_json
from .methods import rtag
from .storage import (MANIFEST, RowWriter, ensure_array, is_complete, open_array, read_manifest, shard_plan,
                      write_array, write_manifest)

SPLITS = ("train", "test")
SHARDS_DIR = "shards"
#: an identity extraction in progress touches `.extracting.<host>.<pid>` in its directory this often;
#: a file older than HEARTBEAT_STALE_S belongs to a job that is gone
HEARTBEAT_S = 10.0
HEARTBEAT_STALE_S = 120.0
HEARTBEAT_PREFIX = ".extracting."


def array_relpath(compressor: str, seed: int | None, split: str) -> str:
    return f"{split}.zarr" if compressor == "identity" else f"seed{seed}/{split}.zarr"


def shard_marker(out_dir, shard: int, shards: int) -> Path:
    return Path(out_dir) / SHARDS_DIR / f"{int(shard)}of{int(shards)}.json"


def _budget_check(extractor, n: int) -> str | None:
    check = getattr(extractor.compressor, "check_budget", None)
    if check is None:
        return None
    try:
        check(n)
    except BudgetError as e:
        return str(e)
    return None


# ---- filling rows [start, stop) of an array: a pass, slicing a larger r, or compressing raw rows -------

def extract_rows(extractor, split: dict, arr, batch_size: int, start: int = 0, stop: int | None = None) -> float:
    """Fill rows [start, stop) of `arr` with the extractor's output for those rows of `split`.

    The range must be chunk-aligned (see `RowWriter`): this is what a shard of a sharded
    extraction runs. Returns the seconds spent."""
    from .train import Batches

    n = next(iter(split.values())).shape[0]
    stop = n if stop is None else stop
    writer = RowWriter(arr, start, stop)
    t0 = time.perf_counter()
    extractor.run(Batches(split, batch_size, indices=torch.arange(start, stop)), sink=writer)
    writer.close()
    return time.perf_counter() - t0


def _check_nests(src, dst_comp, src_path) -> None:
    if src.attrs.get("compressor_attrs", {}).get("indices") is not None and hasattr(dst_comp, "indices"):
        # dropout: the kept coordinates at r must be the first r kept at r_big (a real check of the nesting)
        if src.attrs["compressor_attrs"]["indices"][:dst_comp.r] != dst_comp.indices.tolist():
            raise RuntimeError(f"{src_path}: stored indices do not nest into r={dst_comp.r}")


def nest_rows(src, src_comp, dst_comp, sink, start: int = 0, stop: int | None = None) -> float:
    """sink(row - start, src_comp.nest(rows, r)) for rows [start, stop) of the larger-r array `src`."""
    stop = src.shape[0] if stop is None else stop
    step = max(1, int(src.chunks[0]))
    t0 = time.perf_counter()
    a = start
    while a < stop:
        b = min(stop, (a // step + 1) * step)
        sink(a - start, src_comp.nest(torch.from_numpy(np.asarray(src[a:b])), dst_comp.r))
        a = b
    return time.perf_counter() - t0


def compress_rows(comps, src, sinks, device, start: int = 0, stop: int | None = None):
    """sinks[i](row - start, comps[i].compress(rows)) for rows [start, stop) of the raw-gradient array
    `src`, read once, in chunk-aligned blocks of about IDENTITY_BLOCK_BYTES, for all compressors (one
    per seed). Returns the seconds per compressor (the shared reading split evenly); a single
    compressor and sink may be passed unwrapped (then one float is returned)."""
    single = not isinstance(comps, (list, tuple))
    comps, sinks = ([comps], [sinks]) if single else (list(comps), list(sinks))
    n, d = src.shape
    stop = n if stop is None else stop
    chunk = int(src.chunks[0])
    step = max(chunk, (IDENTITY_BLOCK_BYTES // max(1, d * 4)) // chunk * chunk)
    secs = [0.0] * len(comps)
    a = start
    while a < stop:
        t0 = time.perf_counter()
        b = min(stop, (a // chunk) * chunk + step)  # block ends on a chunk boundary of the source
        G = torch.from_numpy(np.ascontiguousarray(src[a:b])).to(device)
        shared = (time.perf_counter() - t0) / len(comps)
        for i, (comp, sink) in enumerate(zip(comps, sinks)):
            t1 = time.perf_counter()
            sink(a - start, comp.compress(G))
            secs[i] += shared + time.perf_counter() - t1
        a = b
    return secs[0] if single else secs


# ---- sources that serve an extraction without a pass ----------------------------------------------------

def _find_nest_source(out_dir: Path, compressor: str, r: int, seeds, fingerprint: dict) -> tuple[Path, dict] | None:
    """Smallest complete sibling r_big > r whose arrays can serve r by nesting."""
    from ..compressors import COMPRESSORS

    if not getattr(COMPRESSORS.get(compressor), "nests_in_r", False):
        return None
    candidates = []
    for sib in out_dir.parent.glob("r*"):
        if sib == out_dir or not (sib / MANIFEST).exists() or not sib.name[1:].isdigit():
            continue
        big = int(sib.name[1:])
        if big <= r:
            continue
        try:
            m = read_manifest(sib)
        except (OSError, ValueError):
            continue
        if m.get("status") != "complete" or m.get("fingerprint") != fingerprint:
            continue
        if not set(seeds) <= {int(s) for s in m.get("seeds", [])} or not set(SPLITS) <= set(m.get("splits", [])):
            continue
        if not all(is_complete(sib / array_relpath(compressor, s, sp)) for s in seeds for sp in SPLITS):
            continue
        candidates.append((big, sib, m))
    if not candidates:
        return None
    big, sib, m = min(candidates, key=lambda c: c[0])
    return sib, m


def _nest_array(src_path: Path, dst_path: Path, src_comp, dst_comp, attrs: dict) -> None:
    src = open_array(src_path)
    _check_nests(src, dst_comp, src_path)
    with write_array(dst_path, src.shape[0], dst_comp.out_dim, attrs) as dst:
        writer = RowWriter(dst)
        nest_rows(src, src_comp, dst_comp, writer)
        writer.close()


#: fingerprint entries that must match for raw gradients to serve a compressor (not `options`:
#: the identity extraction's options are its own; the compressor's are applied by `compress`).
#: `device_type` included: Gaussian tiles are drawn on the computing device (CPU and CUDA
#: generators differ), and the served array's fingerprint names the device that compressed it.
IDENTITY_KEYS = ("model_sha256", "data_sha256", "params", "device_type")
#: rows of raw gradients read per block when serving from identity
IDENTITY_BLOCK_BYTES = 64 << 20


def identity_dir_of(out_dir: Path) -> Path:
    """`grads/identity/full` beside `grads/{compressor}/{rtag}`."""
    return Path(out_dir).parent.parent / "identity" / "full"


def _find_identity_source(identity_dir: Path, fingerprint: dict, dim: int) -> tuple[Path, dict] | None:
    """The complete identity extraction of the same model/data/params/device type, or None."""
    try:
        m = read_manifest(identity_dir)
    except (OSError, ValueError):
        return None
    fp = m.get("fingerprint") or {}
    if m.get("status") != "complete" or any(fp.get(k) != fingerprint[k] for k in IDENTITY_KEYS):
        return None
    if int(m.get("dim", -1)) != int(dim) or not set(SPLITS) <= set(m.get("splits", [])):
        return None
    if not all(is_complete(identity_dir / array_relpath("identity", None, sp)) for sp in SPLITS):
        return None
    return identity_dir, m


class Heartbeat:
    """`.extracting.<host>.<pid>` in an identity extraction's directory, touched every HEARTBEAT_S
    while the job lives, so that compressed extract jobs started beside it wait for its raw
    gradients instead of running their own passes. Removed on exit unless `keep` (a finished shard
    keeps it until `finalize`, which follows, removes it; a killed job's file goes stale)."""

    def __init__(self, directory, keep_on_success: bool = False):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"{HEARTBEAT_PREFIX}{socket.gethostname()}.{os.getpid()}"
        self.keep_on_success = keep_on_success
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __enter__(self):
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        if exc_type is not None or not self.keep_on_success:
            self.path.unlink(missing_ok=True)
        return False


def remove_heartbeats(directory) -> None:
    for p in Path(directory).glob(f"{HEARTBEAT_PREFIX}*"):
        p.unlink(missing_ok=True)


def identity_in_progress(identity_dir) -> bool:
    now = time.time()
    for p in Path(identity_dir).glob(f"{HEARTBEAT_PREFIX}*"):
        try:
            if now - p.stat().st_mtime < HEARTBEAT_STALE_S:
                return True
        except OSError:
            continue
    return False


def _identity_source(identity_dir: Path, fingerprint: dict, dim: int, wait_s: float, poll_s: float = 2.0):
    """The identity source, waiting up to `wait_s` while an identity extraction is in progress."""
    source = _find_identity_source(identity_dir, fingerprint, dim)
    if source is not None or wait_s <= 0 or not identity_in_progress(identity_dir):
        return source
    log.info("FROM_IDENTITY: the identity extraction in %s is in progress; waiting for it (up to %.0fs) "
             "instead of running a pass", identity_dir, wait_s)
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        time.sleep(poll_s)
        source = _find_identity_source(identity_dir, fingerprint, dim)
        if source is not None:
            log.info("FROM_IDENTITY: the identity extraction finished after %.0fs", time.monotonic() - t0)
            return source
        if not identity_in_progress(identity_dir):
            break
    log.info("FROM_IDENTITY: no usable identity extraction after %.0fs; extracting directly", time.monotonic() - t0)
    return None


# ---- the job context shared by whole and sharded extraction ---------------------------------------------

class _Job:
    """Loaded data and model, fingerprint, layout and the stage's provenance of one extract job."""

    def __init__(self, data, model, out_dir, compressor, r, seeds, batch_size, device, threads, budget_mb, options,
                 experiment, name="extract"):
        import dropinf
        from ..extraction import Extractor
        from .prepare import load_prepared, model_inputs
        from .train import load_trained

        self.stage = Stage(name, device=device, threads=threads)
        self.out_dir, self.compressor, self.r = Path(out_dir), compressor, r
        self.batch_size, self.experiment = int(batch_size), experiment
        self.options = dict(options or {})
        self.seeds = [None] if compressor == "identity" else [int(s) for s in seeds]
        blob = load_prepared(data)
        spec, _ = load_trained(model, blob, self.stage.device)
        self.splits = {s: model_inputs(blob[s]) for s in SPLITS}
        self.n = {s: next(iter(self.splits[s].values())).shape[0] for s in SPLITS}
        self.fingerprint = {"model_sha256": file_sha256(model), "data_sha256": file_sha256(data),
                            "options": self.options, "device_type": self.stage.device.type, "params": spec.params}
        comp_opts = dict(self.options)
        if compressor == "identity" and budget_mb is not None:
            comp_opts["budget_bytes"] = int(float(budget_mb) * 2**20)
        from ..compressors import COMPRESSORS
        from .train import Batches

        if compressor in COMPRESSORS:  # once per job: data-dependent options (importance weights) for every seed
            comp_opts = COMPRESSORS[compressor].prepare_options(
                comp_opts, model=spec.module, loss_fn=spec.loss_fn, params=spec.params, device=self.stage.device,
                train_loader=Batches(self.splits["train"], self.batch_size))
        self.comp_options = comp_opts

        def extractor_for(seed):
            return Extractor(spec.module, spec.loss_fn, compressor, r, 0 if seed is None else seed,
                             params=spec.params, device=self.stage.device, **comp_opts)

        self.extractor_for = extractor_for
        self.first = extractor_for(self.seeds[0])
        self.layout = self.first.layout
        self.out_dim = self.first.compressor.out_dim
        self.skip_reason = _budget_check(self.first, max(self.n.values()))
        self.sign_convention = dropinf.SIGN_CONVENTION

    def extractor(self, i: int):
        return self.first if i == 0 else self.extractor_for(self.seeds[i])

    def manifest(self) -> dict:
        return {"compressor": self.compressor, "r": self.r, "seeds": [s for s in self.seeds if s is not None],
                "splits": list(SPLITS), "n": self.n, "experiment": self.experiment, "fingerprint": self.fingerprint,
                "arrays": {}, "seconds": {}, "sliced_from": None, "served_from": None, "dim": self.layout.dim,
                "out_dim": self.out_dim, "layout": self.layout.to_json(), "blocks": self.layout.blocks}

    def base_attrs(self, seed, split, comp) -> dict:
        kind = "per-example gradients" if self.compressor == "identity" else "compressed per-example gradients"
        return {"kind": kind, "experiment": self.experiment, "split": split, "n": self.n[split], "seed": seed,
                "compressor": self.compressor, "r": self.r, "out_dim": comp.out_dim,
                "compressor_attrs": comp.attrs(), "layout": self.layout.to_json(), "blocks": self.layout.blocks,
                "dim": self.layout.dim, "sign_convention": self.sign_convention,
                "model_sha256": self.fingerprint["model_sha256"], "data_sha256": self.fingerprint["data_sha256"],
                "options": self.options}

    def make_compressor(self, r, seed):
        from ..compressors import compressor as make_compressor

        return make_compressor(self.compressor, dim=self.layout.dim, r=r, seed=seed, layout=self.layout,
                               **self.comp_options)

    def find_source(self, nest: bool, from_identity: bool, identity_dir, identity_wait: float):
        """('nest', dir, manifest), ('identity', dir, manifest) or None (a pass)."""
        if nest and self.r is not None:
            src = _find_nest_source(self.out_dir, self.compressor, int(self.r), self.seeds, self.fingerprint)
            if src is not None:
                return ("nest",) + src
        if from_identity and self.compressor != "identity" and self.r is not None:
            id_dir = Path(identity_dir) if identity_dir is not None else identity_dir_of(self.out_dir)
            src = _identity_source(id_dir, self.fingerprint, self.layout.dim, identity_wait)
            if src is not None:
                return ("identity",) + src
        return None

    def log_source(self, source, what: str) -> None:
        kind, src_dir, m = source
        if kind == "nest":
            log.info("NESTED: serving %s r=%d%s by slicing the complete r=%d arrays in %s (no extraction pass)",
                     self.compressor, int(self.r), what, int(m["r"]), src_dir)
        else:
            log.info("FROM_IDENTITY: serving %s r=%d%s seeds %s by compressing the complete raw gradients in %s "
                     "(matrix path on %s; no extraction pass)", self.compressor, int(self.r), what, self.seeds,
                     src_dir, self.stage.device.type)

    def source_filler(self, source, seed):
        """(compressor, fill(split, sink, start, stop) -> seconds, extra attributes) serving the rows
        of one seed by nesting."""
        kind, src_dir, m = source
        if kind == "nest":
            src_comp, dst_comp = self.make_compressor(int(m["r"]), seed), self.make_compressor(int(self.r), seed)

            def fill(split, sink, start, stop):
                rel = array_relpath(self.compressor, seed, split)
                src = open_array(src_dir / rel)
                _check_nests(src, dst_comp, src_dir / rel)
                return nest_rows(src, src_comp, dst_comp, sink, start, stop)

            return dst_comp, fill, lambda split: {"sliced_from": str(src_dir / array_relpath(self.compressor, seed,
                                                                                                  split))}
        raise ValueError(f"source_filler: {kind!r} sources are filled for all seeds at once")


# ---- whole (unsharded) extraction ----------------------------------------------------------------------------

def _serve_by_nesting(job: _Job, source, manifest) -> None:
    _, src_dir, src_manifest = source
    job.log_source(source, "")
    manifest["sliced_from"] = str(src_dir)
    for seed in job.seeds:
        t0 = time.perf_counter()
        src_comp, dst_comp = job.make_compressor(int(src_manifest["r"]), seed), job.make_compressor(int(job.r), seed)
        for split in SPLITS:
            rel = array_relpath(job.compressor, seed, split)
            attrs = {**job.base_attrs(seed, split, dst_comp), "sliced_from": str(src_dir / rel),
                     "provenance": job.stage.provenance()}
            _nest_array(src_dir / rel, job.out_dir / rel, src_comp, dst_comp, attrs)
            manifest["arrays"].setdefault(str(seed), {})[split] = rel
        manifest["seconds"][str(seed)] = time.perf_counter() - t0


def _serve_from_identity(job: _Job, source, manifest) -> None:
    """Every seed's arrays from the raw gradients, each block of raw rows read once for all seeds."""
    import contextlib

    job.log_source(source, "")
    src_dir = source[1]
    manifest["served_from"] = str(src_dir)
    comps = [job.make_compressor(int(job.r), seed) for seed in job.seeds]
    totals = [0.0] * len(comps)
    for split in SPLITS:
        src_rel = array_relpath("identity", None, split)
        extra = {"served_from": str(src_dir / src_rel), "projection_device": job.stage.device.type}
        with contextlib.ExitStack() as stack:
            arrs = [stack.enter_context(write_array(job.out_dir / array_relpath(job.compressor, seed, split),
                                                    job.n[split], comp.out_dim,
                                                    {**job.base_attrs(seed, split, comp), **extra}))
                    for seed, comp in zip(job.seeds, comps)]
            writers = [RowWriter(arr) for arr in arrs]
            secs = compress_rows(comps, open_array(src_dir / src_rel), writers, job.stage.device)
            for seed, arr, writer, sec in zip(job.seeds, arrs, writers, secs):
                writer.close()
                arr.attrs.update(jsonable({"compress_seconds": sec, "provenance": job.stage.provenance()}))
                manifest["arrays"].setdefault(str(seed), {})[split] = array_relpath(job.compressor, seed, split)
        totals = [t + sec for t, sec in zip(totals, secs)]
    manifest["compress_seconds"] = {str(seed): t for seed, t in zip(job.seeds, totals)}
    log.info("%s %s seeds %s: compressed %d train + %d test raw gradients in %.2fs", job.compressor, rtag(job.r),
             job.seeds, job.n["train"], job.n["test"], sum(totals))


def _extract_whole(job: _Job, nest, from_identity, identity_dir, identity_wait) -> dict:
    manifest = job.manifest()
    if job.skip_reason:
        log.warning("SKIPPED %s extraction: %s", job.compressor, job.skip_reason)
        manifest.update(status="skipped", reason=job.skip_reason, provenance=job.stage.provenance())
        write_manifest(job.out_dir, manifest)
        return manifest
    source = job.find_source(nest, from_identity, identity_dir, identity_wait)
    if source is not None:
        try:
            (_serve_by_nesting if source[0] == "nest" else _serve_from_identity)(job, source, manifest)
        except Exception as e:  # e.g. the source was being rewritten meanwhile: fall back to a pass
            log.warning("serving from %s failed (%s: %s); extracting directly", source[1], type(e).__name__, e)
            clean_stale(job.out_dir, keep=_heartbeats(job.out_dir))
            manifest = job.manifest()
            source = None
    if source is None:
        for i, seed in enumerate(job.seeds):
            ex = job.extractor(i)
            comp = ex.compressor
            total = 0.0
            for split in SPLITS:
                rel = array_relpath(job.compressor, seed, split)
                with write_array(job.out_dir / rel, job.n[split], comp.out_dim,
                                 job.base_attrs(seed, split, comp)) as arr:
                    secs = extract_rows(ex, job.splits[split], arr, job.batch_size)
                    arr.attrs.update(jsonable({"extract_seconds": secs, "provenance": job.stage.provenance()}))
                total += secs
                manifest["arrays"].setdefault(str(seed), {})[split] = rel
            manifest["seconds"][str(seed)] = total
            log.info("%s %s seed %s: %d train + %d test rows x %d columns in %.2fs", job.compressor, rtag(job.r),
                     seed, job.n["train"], job.n["test"], comp.out_dim, total)
    manifest.update(status="complete", provenance=job.stage.provenance())
    write_manifest(job.out_dir, manifest)
    return manifest


def _heartbeats(directory) -> set[str]:
    return {p.name for p in Path(directory).glob(f"{HEARTBEAT_PREFIX}*")}


# ---- sharded extraction -------------------------------------------------------------------------------------

def _extract_shard(job: _Job, shard: int, shards: int, nest, from_identity, identity_dir, identity_wait) -> dict:
    marker = shard_marker(job.out_dir, shard, shards)
    rec = {"shard": shard, "shards": shards, "compressor": job.compressor, "r": job.r,
           "seeds": [s for s in job.seeds if s is not None], "fingerprint": job.fingerprint,
           "manifest": job.manifest(), "batch_size": job.batch_size}
    if job.skip_reason:
        log.warning("SKIPPED %s extraction (shard %d of %d): %s", job.compressor, shard, shards, job.skip_reason)
        rec.update(status="skipped", reason=job.skip_reason, provenance=job.stage.provenance())
        write_json(marker, rec)
        return rec
    plans = {sp: shard_plan(job.n[sp], shards, job.batch_size, job.out_dim) for sp in SPLITS}
    rows = {sp: plans[sp][1][shard] for sp in SPLITS}
    log.info("shard %d of %d: train rows [%d, %d) of %d, test rows [%d, %d) of %d", shard, shards,
             *rows["train"], job.n["train"], *rows["test"], job.n["test"])
    what = f" rows {rows['train'][0]}:{rows['train'][1]} (shard {shard} of {shards})"
    source = job.find_source(nest, from_identity, identity_dir, identity_wait)
    if source is not None:
        job.log_source(source, what)
    for attempt in ("source", "pass") if source is not None else ("pass",):
        try:
            rec.update(_fill_shard(job, shards, plans, rows, source if attempt == "source" else None))
            break
        except Exception as e:
            if attempt == "pass":
                raise
            log.warning("serving from %s failed (%s: %s); extracting shard %d directly", source[1],
                        type(e).__name__, e, shard)
    rec.update(status="complete", rows={sp: list(rows[sp]) for sp in SPLITS}, provenance=job.stage.provenance())
    write_json(marker, rec)  # the shard's commit
    return rec


def _fill_shard(job: _Job, shards, plans, rows, source) -> dict:
    """Rows `rows[split]` of every (seed, split) array, by a pass or from `source`."""
    out = {"source": None if source is None else source[0], "source_dir": None if source is None else str(source[1]),
           "seconds": {}}
    if source is not None and source[0] == "identity":  # each block of raw rows read once for all seeds
        comps = [job.make_compressor(int(job.r), seed) for seed in job.seeds]
        totals = [0.0] * len(comps)
        for split in SPLITS:
            src_rel = array_relpath("identity", None, split)
            extra = {"served_from": str(source[1] / src_rel), "projection_device": job.stage.device.type}
            a, b = rows[split]
            writers = []
            for seed, comp in zip(job.seeds, comps):
                attrs = {**job.base_attrs(seed, split, comp), **extra, "shards": shards}
                arr = ensure_array(job.out_dir / array_relpath(job.compressor, seed, split), job.n[split],
                                   comp.out_dim, attrs, chunk_rows=plans[split][0])
                writers.append(RowWriter(arr, a, b) if b > a else None)
            if b > a:
                secs = compress_rows(comps, open_array(source[1] / src_rel), writers, job.stage.device, a, b)
                for w in writers:
                    w.close()
                totals = [t + sec for t, sec in zip(totals, secs)]
        out["seconds"] = {str(seed): t for seed, t in zip(job.seeds, totals)}
        log.info("%s %s seeds %s: this shard's rows compressed from the raw gradients in %.2fs", job.compressor,
                 rtag(job.r), job.seeds, sum(totals))
        return out
    for i, seed in enumerate(job.seeds):
        if source is None:
            ex = job.extractor(i)
            comp, fill, extra = ex.compressor, None, (lambda split: {})
        else:
            comp, fill, extra = job.source_filler(source, seed)
        total = 0.0
        for split in SPLITS:
            chunk, _ = plans[split]
            attrs = {**job.base_attrs(seed, split, comp), **extra(split), "shards": shards}
            arr = ensure_array(job.out_dir / array_relpath(job.compressor, seed, split), job.n[split], comp.out_dim,
                               attrs, chunk_rows=chunk)
            a, b = rows[split]
            if b <= a:
                continue
            if fill is None:
                total += extract_rows(ex, job.splits[split], arr, job.batch_size, a, b)
            else:
                writer = RowWriter(arr, a, b)
                total += fill(split, writer, a, b)
                writer.close()
        out["seconds"][str(seed)] = total
        log.info("%s %s seed %s: this shard's rows x %d columns in %.2fs (%s)", job.compressor, rtag(job.r), seed,
                 comp.out_dim, total, "pass" if source is None else f"from {source[0]}")
    return out


def finalize(out_dir, shards: int, experiment: str = "") -> dict:
    """Check the `shards` done markers of a sharded extraction, mark its arrays complete and write
    its manifest. Moves no array data. Raises (naming them) when shards are missing or disagree."""
    out_dir = Path(out_dir)
    stage = Stage("extract_finalize")
    (out_dir / MANIFEST).unlink(missing_ok=True)
    paths = [shard_marker(out_dir, k, shards) for k in range(shards)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DropinfError(f"extract finalize: {len(missing)} of {shards} shard(s) not done: {', '.join(missing)}")
    recs = [read_json(p) for p in paths]
    first = recs[0]
    for rec in recs[1:]:
        for key in ("compressor", "r", "seeds", "fingerprint", "status"):
            if rec.get(key) != first.get(key):
                raise DropinfError(f"extract finalize: shard {rec['shard']} differs from shard 0 in {key!r} "
                                   f"({rec.get(key)!r} vs {first.get(key)!r}); rerun the extraction")
    manifest = dict(first["manifest"])
    manifest["shards"] = shards
    compressor = first["compressor"]
    shard_info = [{k: rec.get(k) for k in ("shard", "rows", "source", "source_dir", "seconds", "provenance",
                                            "status")} for rec in recs]
    if first["status"] == "skipped":
        manifest.update(status="skipped", reason=first.get("reason"), shard_records=shard_info,
                        provenance=stage.provenance())
        write_manifest(out_dir, manifest)
        remove_heartbeats(out_dir)
        return manifest
    for split in SPLITS:
        pos = 0
        for rec in recs:
            a, b = rec["rows"][split]
            if b > a:
                if a != pos:
                    raise DropinfError(f"extract finalize: {split} rows [{pos}, {a}) are covered by no shard")
                pos = b
        if pos != manifest["n"][split]:
            raise DropinfError(f"extract finalize: {split} rows [{pos}, {manifest['n'][split]}) are covered by no shard")
    seeds = first["seeds"] or [None]
    sources = {rec.get("source") for rec in recs}
    for seed in seeds:
        key = str(seed)
        for split in SPLITS:
            rel = array_relpath(compressor, seed, split)
            arr = open_array(out_dir / rel, mode="r+")
            if arr.shape != (manifest["n"][split], manifest["out_dim"]) or arr.attrs.get("shards") != shards:
                raise DropinfError(f"extract finalize: {out_dir / rel} has shape {arr.shape} and "
                                   f"shards={arr.attrs.get('shards')}, not ({manifest['n'][split]}, "
                                   f"{manifest['out_dim']}) from {shards} shards")
            secs = [rec["seconds"][key] for rec in recs]
            extra = {"complete": True, "provenance": stage.provenance(),
                     "shard_records": [{"shard": rec["shard"], "rows": rec["rows"][split], "source": rec.get("source"),
                                        "seconds": rec["seconds"][key], "provenance": rec["provenance"]}
                                       for rec in recs]}
            if sources == {None}:
                extra["extract_seconds"] = float(sum(secs))
            arr.attrs.update(jsonable(extra))
            manifest["arrays"].setdefault(key, {})[split] = rel
        if sources == {None}:
            manifest["seconds"][key] = float(sum(rec["seconds"][key] for rec in recs))
    for kind, field in (("nest", "sliced_from"), ("identity", "served_from")):
        dirs = sorted({rec["source_dir"] for rec in recs if rec.get("source") == kind})
        manifest[field] = dirs[0] if len(dirs) == 1 else (dirs or None)
    if compressor != "identity":  # seed directories of an earlier configuration
        keep = {f"seed{s}" for s in seeds}
        for p in out_dir.glob("seed*"):
            if p.name not in keep:
                remove(p)
    for p in list(out_dir.rglob(".*.meta-*")):  # metadata scratch of killed shards
        remove(p)
    remove_heartbeats(out_dir)
    manifest.update(status="complete", shard_records=shard_info, provenance=stage.provenance())
    write_manifest(out_dir, manifest)
    log.info("%s %s: %d shards complete; manifest written (no data copied)", compressor, rtag(first["r"]), shards)
    return manifest


# ---- the stage -----------------------------------------------------------------------------------------------

def extract(data, model, out_dir, compressor: str, r: int | None, seeds=(0,), batch_size: int = 256,
            device: str = "auto", threads: int | None = None, budget_mb: float | None = None,
            options: dict | None = None, nest: bool = True, experiment: str = "", from_identity: bool = True,
            identity_dir=None, shard: int | None = None, shards: int = 1, identity_wait: float = 1800.0) -> dict:
    """Run the extract stage into `out_dir` (see the module docstring).

    shards == 1: the whole extraction, manifest last. shards > 1 and `shard` given: that shard only
    (its rows of every array, then its done marker); shards > 1 and no `shard`: every shard in turn,
    then `finalize`. `identity_wait`: seconds to wait for an identity extraction in progress (its
    heartbeat fresh) before running a pass instead."""
    out_dir = Path(out_dir)
    shards = max(1, int(shards))
    args = (data, model, out_dir, compressor, r, seeds, batch_size, device, threads, budget_mb, options, experiment)
    serve = (nest, from_identity, identity_dir, identity_wait)
    if shards > 1 and shard is None:
        for k in range(shards):
            extract(*args[:11], nest=nest, experiment=experiment, from_identity=from_identity,
                    identity_dir=identity_dir, shard=k, shards=shards, identity_wait=identity_wait)
        return finalize(out_dir, shards, experiment)
    if shards == 1:
        (out_dir / MANIFEST).unlink(missing_ok=True)  # nothing here looks finished until we say so
        clean_stale(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if compressor == "identity":
            with Heartbeat(out_dir):
                return _extract_whole(_Job(*args), *serve)
        return _extract_whole(_Job(*args), *serve)
    shard = int(shard)
    if not 0 <= shard < shards:
        raise DropinfError(f"extract: shard {shard} is not in [0, {shards})")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete while any shard works
    shard_marker(out_dir, shard, shards).unlink(missing_ok=True)
    for p in (out_dir / SHARDS_DIR).glob("*"):  # markers of another shard count, own leftovers
        if not p.name.endswith(f"of{shards}.json") or p.name.startswith(f".{shard}of{shards}.json.tmp-"):
            remove(p)
    if compressor == "identity":
        with Heartbeat(out_dir, keep_on_success=True):
            return _extract_shard(_Job(*args, name="extract_shard"), shard, shards, *serve)
    return _extract_shard(_Job(*args, name="extract_shard"), shard, shards, *serve)


def load_split(grads_dir, manifest: dict, seed, split: str):
    """The (lazy) Zarr array of one (seed, split) listed in an extract manifest."""
    key = str(seed)
    rel = manifest["arrays"][key][split]
    return open_array(Path(grads_dir) / rel)
