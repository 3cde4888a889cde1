"""Stage `extract`: per-example gradients of the fine-tuned model (compressed or raw), written to Zarr.

An extraction directory `grads/{compressor}/{rtag}/` (layout and parts: `sharding`) is filled by
one of three kinds of part job, each reading only what it is given (the workflow declares it):

* `extract` - a gradient pass (`dropinf.extraction.Extractor`, one fused forward+backward per
  batch) over the part's rows, for every seed and both splits;
* `extract_nested` - slicing the complete extraction of a larger r of the same compressor
  (`Compressor.nest`; for compressors with `nests_in_r`: dropout, gaussian), logged `NESTED:`;
* `extract_from_identity` - compressing the stored raw gradients of the complete identity
  extraction by the compressor's matrix path (`Compressor.compress`), logged `FROM_IDENTITY:`.

Then `finalize` writes the manifest. Every kind runs the same steps: load the job (`_Job`), then
for each of its rows' blocks fill every (seed, split) array, then write the part record.

Compressor options: the configured options are completed once per job by
`COMPRESSORS[name].prepare_options(...)` with the training split's loader, and every seed's
compressor is built from the returned options; fingerprints record the configured options.

Identity: skipped (manifest status "skipped", with the reason) when n * d * 4 bytes exceeds the
budget; the full-space methods then recompute raw gradients from the model (`score.gradients`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BudgetError, DropinfError
from ..progress import bar
from . import sharding
from .commands import RSIZE, command, option
from .common import Stage, deterministic_algorithms, file_sha256, jsonable, log
from .methods import rtag
from .storage import BackgroundRowWriter, RowWriter, is_complete, open_array, read_manifest

SPLITS = sharding.SPLITS
#: rows of raw gradients read per block when compressing them
IDENTITY_BLOCK_BYTES = 64 << 20
#: fingerprint entries that must match for raw gradients to serve a compressor (not `options`:
#: the identity extraction's options are its own). `device_type`: Gaussian tiles are drawn on the
#: computing device (CPU and CUDA generators differ), so raw gradients serve only jobs on their
#: device type, and a served array's fingerprint names the device that compressed it.
IDENTITY_KEYS = ("model_sha256", "data_sha256", "params", "device_type")
#: fingerprint entries that must match for a larger r to serve a smaller one by slicing (the
#: device type is the source's: the sliced columns are its columns)
NEST_KEYS = ("model_sha256", "data_sha256", "params", "options")


def array_relpath(compressor: str, seed: int | None, split: str) -> str:
    return f"{split}.zarr" if compressor == "identity" else f"seed{seed}/{split}.zarr"


def load_split(grads_dir, manifest: dict, seed, split: str):
    """The (lazy) Zarr array of one (seed, split) listed in an extract manifest."""
    rel = manifest["arrays"][str(seed)][split]
    return open_array(Path(grads_dir) / rel)


@dataclass(frozen=True, kw_only=True)
class ExtractJob:
    """What one extraction is: its inputs, output directory, compressor and how to run it."""

    data: Path = option("prepared data")
    model: Path = option("fine-tuned model")
    out_dir: Path = option("the extraction's directory")
    compressor: str = option("compressor name")
    r: int | None = option("compressed size (omit or 'full' for identity)", default=None, codec=RSIZE)
    seeds: tuple[int, ...] = option("compressor seeds", default=(0,))
    batch_size: int = option("examples per gradient pass batch", default=256)
    device: str = option("torch device, or 'auto'", default="auto")
    threads: int | None = option("torch CPU threads", default=None)
    budget_mb: float | None = option("identity: skip when n*d*4 bytes exceeds this", default=None)
    options: dict = option("JSON compressor options", default_factory=dict)
    experiment: str = option("experiment name recorded in the arrays", default="")
    cuda_graph: str = option("CUDA graphs of a gradient pass (dropinf.extract)", default="auto",
                             choices=["auto", "true", "false"])
    bucket: int = option("a gradient pass pads or cuts each batch's sequence length to a multiple of this (0: off)",
                         default=0)
    deterministic: bool = option("deterministic kernels only (torch.use_deterministic_algorithms, "
                                 "CUBLAS_WORKSPACE_CONFIG=:4096:8): repeatable bits, maybe slower", default=False)


# ---- the loaded job --------------------------------------------------------------------------------------

class _Job:
    """Loaded data and model, fingerprint, layout, prepared compressor options and provenance."""

    def __init__(self, spec: ExtractJob, name: str):
        from ..compressors import COMPRESSORS
        from ..layout import Layout, select_parameters
        from .prepare import load_prepared, model_inputs
        from .train import Batches, load_trained

        import dropinf

        if spec.compressor not in COMPRESSORS:
            raise DropinfError(f"extract: unknown compressor {spec.compressor!r}; known: {sorted(COMPRESSORS)}")
        self.spec = spec
        self.stage = Stage(name, device=spec.device, threads=spec.threads)
        self.out_dir, self.compressor, self.r = Path(spec.out_dir), spec.compressor, spec.r
        self.batch_size = int(spec.batch_size)
        self.options = dict(spec.options or {})
        self.seeds = [None] if spec.compressor == "identity" else [int(s) for s in spec.seeds]
        blob = load_prepared(spec.data)
        self.model_spec, _ = load_trained(spec.model, blob, self.stage.device)
        self.splits = {s: model_inputs(blob[s]) for s in SPLITS}
        self.n = {s: next(iter(self.splits[s].values())).shape[0] for s in SPLITS}
        m = self.model_spec
        self.fingerprint = {"model_sha256": file_sha256(spec.model), "data_sha256": file_sha256(spec.data),
                            "options": self.options, "device_type": self.stage.device.type, "params": m.params}
        self.layout = Layout.from_shapes((n, p.shape) for n, p in select_parameters(m.module, m.params))
        # once per job, from the training split: every seed and both splits use the same options
        self.prepared = COMPRESSORS[spec.compressor].prepare_options(
            dict(self.options), model=m.module, loss_fn=m.loss_fn,
            train_loader=Batches(self.splits["train"], self.batch_size), params=m.params, device=self.stage.device)
        if spec.compressor == "identity" and spec.budget_mb is not None:
            self.prepared["budget_bytes"] = int(float(spec.budget_mb) * 2**20)
        first = self.make_compressor(self.seeds[0])
        self.out_dim = first.out_dim
        self.skip_reason = None
        if hasattr(first, "check_budget"):
            try:
                first.check_budget(max(self.n.values()))
            except BudgetError as e:
                self.skip_reason = str(e)
        self.sign_convention = dropinf.SIGN_CONVENTION

    def make_compressor(self, seed, r=None):
        from ..compressors import compressor

        r = self.r if r is None else r
        return compressor(self.compressor, dim=self.layout.dim, r=self.layout.dim if r is None else int(r),
                          seed=0 if seed is None else seed, layout=self.layout, **self.prepared)

    def manifest(self) -> dict:
        return {"compressor": self.compressor, "r": self.r, "seeds": [s for s in self.seeds if s is not None],
                "splits": list(SPLITS), "n": self.n, "experiment": self.spec.experiment,
                "fingerprint": self.fingerprint, "arrays": {}, "seconds": {}, "sliced_from": None,
                "served_from": None, "dim": self.layout.dim, "out_dim": self.out_dim,
                "layout": self.layout.to_json(), "blocks": self.layout.blocks}

    def attrs(self, seed, split, comp) -> dict:
        kind = "per-example gradients" if self.compressor == "identity" else "compressed per-example gradients"
        return {"kind": kind, "experiment": self.spec.experiment, "split": split, "n": self.n[split], "seed": seed,
                "compressor": self.compressor, "r": self.r, "out_dim": comp.out_dim,
                "compressor_attrs": comp.attrs(), "layout": self.layout.to_json(), "blocks": self.layout.blocks,
                "dim": self.layout.dim, "sign_convention": self.sign_convention,
                "model_sha256": self.fingerprint["model_sha256"], "data_sha256": self.fingerprint["data_sha256"],
                "options": self.options}


# ---- the three kinds of part: how rows [a, b) of every (seed, split) array are filled -----------------------

class _Pass:
    """A gradient pass over the rows, one seed at a time; a background writer stores each split's rows
    while the next batches compute (its waits go to the part record's `writer`)."""

    kind, part_kind, source_dir = "pass", "pass", None

    def log_line(self, job, what):
        pass  # each seed's pass is logged as it ends

    def extra_attrs(self, job, seed, split) -> dict:
        return {"cuda_graph": job.spec.cuda_graph, "bucket": job.spec.bucket,  # settings; what ran: the record
                "deterministic": job.spec.deterministic}

    #: how a pass writes its rows: overlapped with the next batches' compute (`BackgroundRowWriter`)
    writer = BackgroundRowWriter

    def fill(self, job, arrays, rows) -> dict:
        from ..extraction import Extractor
        from .train import Batches

        m, seconds, ex = job.model_spec, {}, None
        self.writer_stats = {}
        for seed in job.seeds:  # one extractor: its plan and CUDA graphs serve every seed
            ex = ex.use(arrays[seed]["comp"]) if ex else Extractor(
                m.module, m.loss_fn, arrays[seed]["comp"], params=m.params, device=job.stage.device,
                cuda_graph=job.spec.cuda_graph, bucket=job.spec.bucket)
            seconds[str(seed)], self.writer_stats[str(seed)] = {}, {}
            for split in SPLITS:
                a, b = rows[split]
                t0 = time.perf_counter()
                if b > a:
                    path = job.out_dir / array_relpath(job.compressor, seed, split)
                    with self.writer(arrays[seed][split], a, b, path=path) as writer:
                        ex.run(Batches(job.splits[split], job.batch_size, indices=torch.arange(a, b)), sink=writer,
                               desc=f"extract {job.compressor} {rtag(job.r)} seed {seed} {split}")
                    self.writer_stats[str(seed)][split] = writer.stats()
                seconds[str(seed)][split] = time.perf_counter() - t0
            stalls = self.writer_stats[str(seed)].values()
            log.info("%s %s seed %s: pass over train rows %s, test rows %s in %.2fs (compute waited %.2fs on the "
                     "writer, the writer %.2fs on compute)", job.compressor, rtag(job.r), seed, rows["train"],
                     rows["test"], sum(seconds[str(seed)].values()),
                     sum(s["compute_wait_seconds"] + s["drain_seconds"] for s in stalls),
                     sum(s["writer_wait_seconds"] for s in stalls))
        self.cuda_graph = ex.graph_report()
        return seconds


class _Nested:
    """Columns of the complete extraction of a larger r of the same compressor (`Compressor.nest`)."""

    kind = "nested"

    def __init__(self, job, source_dir):
        from ..compressors import COMPRESSORS

        self.source_dir = str(source_dir)
        src = Path(source_dir)
        m = _complete_manifest(src, "the larger-r extraction to slice")
        if not getattr(COMPRESSORS[job.compressor], "nests_in_r", False):
            raise DropinfError(f"extract_nested: {job.compressor} does not nest in r (its output at a smaller r is "
                               "not a slice of a larger r's)")
        if m.get("compressor") != job.compressor or m.get("r") is None or job.r is None or int(m["r"]) <= int(job.r):
            raise DropinfError(f"extract_nested: {src} holds {m.get('compressor')} r={m.get('r')}, "
                               f"not {job.compressor} at an r larger than {job.r}")
        _check_fingerprint(m, job.fingerprint, NEST_KEYS, src)
        missing = sorted(set(job.seeds) - {int(s) for s in m.get("seeds", [])})
        if missing:
            raise DropinfError(f"extract_nested: {src} has no seed(s) {missing}")
        # the sliced columns are the source's: so is the device type its projection was drawn on
        job.fingerprint = {**job.fingerprint, "device_type": m["fingerprint"]["device_type"]}
        self.manifest, self.r_big = m, int(m["r"])
        self.part_kind = f"from-r{self.r_big}"  # the record's name says what it was sliced from

    def log_line(self, job, what):
        log.info("NESTED: serving %s r=%d%s by slicing the complete r=%d arrays in %s (no extraction pass)",
                 job.compressor, int(job.r), what, self.r_big, self.source_dir)

    def extra_attrs(self, job, seed, split) -> dict:
        return {"sliced_from": str(Path(self.source_dir) / array_relpath(job.compressor, seed, split))}

    def fill(self, job, arrays, rows) -> dict:
        seconds = {}
        for seed in job.seeds:
            src_comp, dst_comp = job.make_compressor(seed, r=self.r_big), arrays[seed]["comp"]
            seconds[str(seed)] = {}
            for split in SPLITS:
                path = Path(self.source_dir) / array_relpath(job.compressor, seed, split)
                src = open_array(path)
                indices = src.attrs.get("compressor_attrs", {}).get("indices")
                if indices is not None and hasattr(dst_comp, "indices") and \
                        indices[:dst_comp.r] != dst_comp.indices.tolist():  # a real check of the nesting
                    raise DropinfError(f"extract_nested: {path}: stored indices do not nest into r={dst_comp.r}")
                a, b = rows[split]
                writer = RowWriter(arrays[seed][split], a, b)
                seconds[str(seed)][split] = nest_rows(src, src_comp, dst_comp, writer, start=a, stop=b)
                writer.close()
        return seconds


class _FromIdentity:
    """The compressor's matrix path on the stored raw gradients, each block read once for all seeds."""

    kind, part_kind = "identity", "from-identity"

    def __init__(self, job, source_dir):
        self.source_dir = str(source_dir)
        src = Path(source_dir)
        m = _complete_manifest(src, "the raw-gradient (identity) extraction")
        if m.get("compressor") != "identity":
            raise DropinfError(f"extract_from_identity: {src} holds {m.get('compressor')}, not identity")
        _check_fingerprint(m, job.fingerprint, IDENTITY_KEYS, src)
        if int(m.get("dim", -1)) != job.layout.dim:
            raise DropinfError(f"extract_from_identity: {src} has dim {m.get('dim')}, the model {job.layout.dim}")
        self.manifest = m

    def log_line(self, job, what):
        log.info("FROM_IDENTITY: serving %s r=%d%s seeds %s by compressing the complete raw gradients in %s "
                 "(matrix path on %s; no extraction pass)", job.compressor, int(job.r), what, job.seeds,
                 self.source_dir, job.stage.device.type)

    def extra_attrs(self, job, seed, split) -> dict:
        return {"served_from": str(Path(self.source_dir) / array_relpath("identity", None, split)),
                "projection_device": job.stage.device.type}

    def fill(self, job, arrays, rows) -> dict:
        seconds = {str(seed): {} for seed in job.seeds}
        comps = [arrays[seed]["comp"] for seed in job.seeds]
        for split in SPLITS:
            a, b = rows[split]
            writers = [RowWriter(arrays[seed][split], a, b) for seed in job.seeds]
            src = open_array(Path(self.source_dir) / array_relpath("identity", None, split))
            secs = compress_rows(comps, src, writers, job.stage.device, start=a, stop=b)
            for seed, w, sec in zip(job.seeds, writers, secs):
                w.close()
                seconds[str(seed)][split] = sec
        log.info("%s %s seeds %s: train rows %s, test rows %s compressed from the raw gradients in %.2fs",
                 job.compressor, rtag(job.r), job.seeds, rows["train"], rows["test"],
                 sum(sum(s.values()) for s in seconds.values()))
        return seconds


def _complete_manifest(directory: Path, what: str) -> dict:
    try:
        m = read_manifest(directory)
    except (OSError, ValueError) as e:
        raise DropinfError(f"extract: {what} in {directory} has no readable manifest ({e})") from None
    if m.get("status") != "complete":
        raise DropinfError(f"extract: {what} in {directory} is not complete (status {m.get('status')!r}: "
                           f"{m.get('reason', '')})")
    for seed, splits in m.get("arrays", {}).items():
        for rel in splits.values():
            if not is_complete(directory / rel):
                raise DropinfError(f"extract: {what}: array {directory / rel} is not complete")
    return m


def _check_fingerprint(m: dict, fingerprint: dict, keys, src: Path) -> None:
    fp = m.get("fingerprint") or {}
    for key in keys:
        if fp.get(key) != fingerprint[key]:
            raise DropinfError(f"extract: {src} was made with another {key} ({fp.get(key)!r}, this job: "
                               f"{fingerprint[key]!r}); it cannot serve this extraction")


def nest_rows(src, src_comp, dst_comp, sink, *, start: int = 0, stop: int | None = None) -> float:
    """sink(row - start, src_comp.nest(rows, r)) for rows [start, stop) of the larger-r array `src`."""
    stop = src.shape[0] if stop is None else stop
    step = max(1, int(src.chunks[0]))
    t0 = time.perf_counter()
    a = start
    with bar(total=stop - start, desc=f"slice r={src_comp.r} to r={dst_comp.r}", unit="rows") as shown:
        while a < stop:
            b = min(stop, (a // step + 1) * step)
            sink(a - start, src_comp.nest(torch.from_numpy(np.asarray(src[a:b])), dst_comp.r))
            shown.update(b - a)
            a = b
    return time.perf_counter() - t0


def compress_rows(comps, src, sinks, device, *, start: int = 0, stop: int | None = None) -> list[float]:
    """sinks[i](row - start, comps[i].compress(rows)) for rows [start, stop) of the raw-gradient array
    `src`, read once, in chunk-aligned blocks of about IDENTITY_BLOCK_BYTES, for all compressors (one
    per seed). Returns the seconds per compressor (the shared reading split evenly)."""
    n, d = src.shape
    stop = n if stop is None else stop
    chunk = int(src.chunks[0])
    step = max(chunk, (IDENTITY_BLOCK_BYTES // max(1, d * 4)) // chunk * chunk)
    secs = [0.0] * len(comps)
    a = start
    shown = bar(total=stop - start, desc=f"compress raw gradients ({comps[0].name}, {len(comps)} seeds)", unit="rows")
    while a < stop:
        t0 = time.perf_counter()
        b = min(stop, (a // chunk) * chunk + step)  # block ends on a chunk boundary of the source
        G = torch.from_numpy(np.ascontiguousarray(src[a:b])).to(device)
        shared = (time.perf_counter() - t0) / len(comps)
        for i, (comp, sink) in enumerate(zip(comps, sinks)):
            t1 = time.perf_counter()
            sink(a - start, comp.compress(G))
            secs[i] += shared + time.perf_counter() - t1
        shown.update(b - a)
        a = b
    shown.close()
    return secs


# ---- one part: the same steps for every kind and any number of parts ---------------------------------------

def _run_part(job: _Job, source, *, shard: int, shards: int) -> dict:
    record_path = sharding.part_path(job.out_dir, kind=source.part_kind, shard=shard, shards=shards)
    sharding.begin_part(job.out_dir, record_path, shards=shards)
    rec = {"kind": source.kind, "shard": shard, "shards": shards, "compressor": job.compressor, "r": job.r,
           "seeds": [s for s in job.seeds if s is not None], "fingerprint": job.fingerprint,
           "manifest": job.manifest(), "batch_size": job.batch_size, "source_dir": source.source_dir}
    if job.skip_reason:
        log.warning("SKIPPED %s extraction (part %d of %d): %s", job.compressor, shard, shards, job.skip_reason)
        rec.update(status="skipped", reason=job.skip_reason, provenance=job.stage.provenance())
        sharding.end_part(job.out_dir, [], shards=shards)  # nothing stored: no earlier arrays either
        sharding.write_record(record_path, rec)
        return rec
    plans = {sp: sharding.shard_plan(job.n[sp], shards, job.batch_size, job.out_dim) for sp in SPLITS}
    rows = {sp: plans[sp][1][shard] for sp in SPLITS}
    what = "" if shards == 1 else f" rows {rows['train'][0]}:{rows['train'][1]} (part {shard} of {shards})"
    source.log_line(job, what)
    with contextlib.ExitStack() as stack:
        arrays = {}
        for seed in job.seeds:
            comp = job.make_compressor(seed)
            arrays[seed] = {"comp": comp}
            for split in SPLITS:
                attrs = {**job.attrs(seed, split, comp), **source.extra_attrs(job, seed, split)}
                if shards > 1:
                    attrs["shards"] = shards
                arrays[seed][split] = stack.enter_context(sharding.part_array(
                    job.out_dir / array_relpath(job.compressor, seed, split), n=job.n[split], width=comp.out_dim,
                    attrs=attrs, chunk_rows=plans[split][0], shards=shards))
        seconds = source.fill(job, arrays, rows)
    sharding.end_part(job.out_dir, [array_relpath(job.compressor, seed, split) for seed in job.seeds
                                    for split in SPLITS], shards=shards)
    rec.update(status="complete", rows={sp: list(rows[sp]) for sp in SPLITS}, seconds=jsonable(seconds),
               provenance=job.stage.provenance(), cuda_graph=getattr(source, "cuda_graph", None))
    if getattr(source, "writer_stats", None) is not None:
        rec["writer"] = jsonable(source.writer_stats)
    if shards == 1 and rec["cuda_graph"]:  # whether graphs were used (several parts: in each part's record)
        rec["manifest"]["cuda_graph"] = rec["cuda_graph"]
    if source.kind == "pass":  # how the rows were computed (finalize: true only when every part was)
        rec["deterministic"] = rec["manifest"]["deterministic"] = bool(job.spec.deterministic)
    sharding.write_record(record_path, rec)  # the part's commit
    return rec


@dataclass(frozen=True, kw_only=True)
class FinalizeOptions:
    out_dir: Path = option("the extraction's directory")
    parts: tuple[Path, ...] = option("the part records (parts/*.json)")
    experiment: str = option("experiment name recorded in the manifest", default="")


@command("extract_finalize", FinalizeOptions,
         help="check an extraction's part records, mark its arrays complete, write its manifest")
def finalize(*, out_dir, parts, experiment: str = "") -> dict:
    """Check the part records `parts`, mark the arrays of `out_dir` complete, write its manifest."""
    stage = Stage("extract_finalize")
    manifest = sharding.finalize(out_dir=out_dir, parts=parts, provenance=stage.provenance(),
                                 array_relpath=array_relpath)
    log.info("%s %s: %d part(s) %s; manifest written", manifest["compressor"], rtag(manifest.get("r")),
             len(parts), manifest["status"])
    return manifest


def _extract(spec: ExtractJob, *, name: str, make_source, shard: int | None, shards: int) -> dict:
    """One part (`shard` given) or the whole extraction: every part in turn, then `finalize`."""
    shards = max(1, int(shards))
    if shard is not None:
        shard, shards = sharding.check_shard(shard, shards)
    # before the job touches CUDA (loading the model, binding a device): cuBLAS reads its setting then
    with deterministic_algorithms(spec.deterministic):
        if shard is not None:
            job = _Job(spec, name if shards == 1 else f"{name}_shard")
            return _run_part(job, make_source(job), shard=shard, shards=shards)
        job = _Job(spec, name)
        source = make_source(job)
        for k in range(shards):
            _run_part(job, source, shard=k, shards=shards)
    parts = [sharding.part_path(job.out_dir, kind=source.part_kind, shard=k, shards=shards)
             for k in range(shards)]
    return finalize(out_dir=job.out_dir, parts=parts, experiment=spec.experiment)


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    job: ExtractJob = option("the extraction (its fields are the command's flags)")
    shards: int = option("the extraction's rows are split into this many parts", default=1)
    shard: int | None = option("run only part K (0..N-1) and write its record; omitted: every part, then the "
                               "manifest", default=None)


@dataclass(frozen=True, kw_only=True)
class NestedOptions(ExtractOptions):
    source: Path = option("directory of the complete larger-r extraction of the same compressor")


@dataclass(frozen=True, kw_only=True)
class FromIdentityOptions(ExtractOptions):
    source: Path = option("directory of the complete identity (raw-gradient) extraction")


@command("extract", ExtractOptions,
         help="per-example gradients (train and test splits, every seed) to Zarr, by a gradient pass")
def extract(*, job: ExtractJob, shard: int | None = None, shards: int = 1) -> dict:
    """A gradient pass: part `shard` of `shards` (its record), or with shard=None the whole
    extraction (every part, then the manifest)."""
    return _extract(job, name="extract", make_source=lambda j: _Pass(), shard=shard, shards=shards)


@command("extract_nested", NestedOptions,
         help="a smaller r of a nesting compressor, sliced from a complete larger-r extraction")
def extract_nested(*, job: ExtractJob, source, shard: int | None = None, shards: int = 1) -> dict:
    """Serve `job` (a smaller r) by slicing the complete larger-r extraction in directory `source`."""
    return _extract(job, name="extract_nested", make_source=lambda j: _Nested(j, source), shard=shard, shards=shards)


@command("extract_from_identity", FromIdentityOptions,
         help="a compressor served by compressing stored raw gradients (matrix path)")
def extract_from_identity(*, job: ExtractJob, source, shard: int | None = None, shards: int = 1) -> dict:
    """Serve `job` by compressing the stored raw gradients of the identity extraction in `source`."""
    return _extract(job, name="extract_from_identity", make_source=lambda j: _FromIdentity(j, source), shard=shard,
                    shards=shards)
