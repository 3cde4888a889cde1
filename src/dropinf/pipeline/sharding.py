"""Splitting one extraction into part jobs, and combining their records into the manifest.

Every extraction directory `grads/{compressor}/{rtag}/` is written by N part jobs of one kind
(a gradient pass, slicing a larger r, or compressing stored raw gradients; N = 1 for a whole
extraction) and then `finalize`:

    {out_dir}/seed{s}/{split}.zarr                 the arrays (identity: {out_dir}/{split}.zarr)
    {out_dir}/parts/{kind}-{k}of{N}.json           part k's record, written after all its rows
    {out_dir}/manifest.json                        written by `finalize`: the directory's done marker

Part k fills only its own contiguous rows of every (seed, split) array (`shard_plan`: boundaries on
multiples of the chunk size and the batch size, so parts never write the same chunk, and a part
computes exactly the batches a whole pass computes for those rows). With N = 1 the arrays are
written under a temporary name and renamed when complete; with N > 1 in place (`part_array`).
`finalize` checks that the records it is given agree and tile the rows, marks the arrays complete
and writes the manifest; it moves no array data.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

from ..errors import DropinfError
from .common import clean_stale, read_json, remove, write_json
from .storage import MANIFEST, chunk_rows_for, ensure_array, open_array, write_array, write_manifest

PARTS_DIR = "parts"
SPLITS = ("train", "test")
#: record keys on which all parts of one extraction must agree
AGREED = ("kind", "compressor", "r", "seeds", "fingerprint", "status", "shards", "source_dir")


def part_path(out_dir, *, kind: str, shard: int, shards: int) -> Path:
    """Record of part `shard` of `shards` of an extraction of `kind` (pass, from-identity, from-r64)."""
    return Path(out_dir) / PARTS_DIR / f"{kind}-{int(shard)}of{int(shards)}.json"


def shard_plan(n: int, shards: int, batch_size: int, width: int | None, itemsize: int = 4):
    """(chunk_rows, [(start, stop)] * shards) splitting n rows into `shards` contiguous ranges whose
    boundaries are multiples of both the chunk size and the batch size (trailing shards may be
    empty when n is small). Deterministic in its arguments: every shard computes the same plan."""
    n, shards, batch_size = int(n), max(1, int(shards)), max(1, int(batch_size))
    target = chunk_rows_for(1 if width is None else width, itemsize)
    if shards == 1:
        return target, [(0, n)]
    if target >= batch_size:
        # chunks of whole batches, as large as the target size allows while leaving about 4 chunks
        # per shard (so shards get nearly equal row counts)
        chunk = batch_size * max(1, min(target // batch_size, n // (4 * shards * batch_size)))
    else:  # rows are wide: the largest divisor of the batch size within the target
        chunk = next(c for c in range(target, 0, -1) if batch_size % c == 0)
    unit = max(chunk, batch_size)
    units = math.ceil(n / unit) if n else 0
    ranges = []
    for k in range(shards):
        a, b = (k * units) // shards * unit, ((k + 1) * units) // shards * unit
        ranges.append((min(a, n), min(b, n)))
    return chunk, ranges


def check_shard(shard: int, shards: int) -> tuple[int, int]:
    shard, shards = int(shard), int(shards)
    if shards < 1 or not 0 <= shard < shards:
        raise DropinfError(f"extract: shard {shard} is not in [0, {shards})")
    return shard, shards


@contextlib.contextmanager
def part_array(path, *, n: int, width: int, attrs: dict, chunk_rows: int, shards: int):
    """The (n, width) array one part writes rows of: a new array renamed into place when the block
    exits (one part), or the shared array written in place (several parts; see `ensure_array`)."""
    if shards == 1:
        with write_array(path, n, width, attrs, chunk_rows=chunk_rows) as arr:
            yield arr
    else:
        yield ensure_array(path, n, width, attrs, chunk_rows=chunk_rows)


def begin_part(out_dir, record: Path, *, shards: int) -> None:
    """What a part clears before it writes: the manifest (the directory is unfinished while any part
    works), its own record and scratch (temporary entries of killed runs). The arrays of an earlier
    complete run stay until the new ones replace them (`end_part`): a failing job loses nothing."""
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if shards == 1 and out_dir.is_dir():
        for p in [out_dir, *(d for d in out_dir.iterdir() if d.is_dir())]:
            for leftover in p.glob(".*.tmp-*"):
                remove(leftover)
    record.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    for p in record.parent.glob(f".{record.name}.tmp-*"):
        remove(p)


def end_part(out_dir, written, *, shards: int) -> None:
    """After a single part has renamed its arrays into place: remove what an earlier run left that
    this one did not write (e.g. the arrays of a seed no longer configured). Parts of a sharded
    extraction share the directory and remove nothing."""
    if shards == 1:
        keep = {PARTS_DIR} | {Path(rel).parts[0] for rel in written}
        clean_stale(out_dir, keep=keep)


def write_record(path: Path, record: dict) -> None:
    write_json(path, record)  # the part's commit: written after all its rows


def _read_records(parts) -> list[dict]:
    paths = [Path(p) for p in parts]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DropinfError(f"extract finalize: {len(missing)} of {len(paths)} part(s) not done: {', '.join(missing)}")
    return [read_json(p) for p in paths]


def check_records(recs: list[dict]) -> None:
    """Raise (naming the part) unless the records agree, number 0..N-1 and tile every split's rows."""
    if not recs:
        raise DropinfError("extract finalize: no part records given")
    first = recs[0]
    for rec in recs[1:]:
        for key in AGREED:
            if rec.get(key) != first.get(key):
                raise DropinfError(f"extract finalize: part {rec.get('shard')} differs from part {first.get('shard')} "
                                   f"in {key!r} ({rec.get(key)!r} vs {first.get(key)!r}); rerun the extraction")
    shards = int(first["shards"])
    if sorted(int(rec["shard"]) for rec in recs) != list(range(shards)):
        raise DropinfError(f"extract finalize: parts {sorted(rec['shard'] for rec in recs)} given, "
                           f"expected 0..{shards - 1} of {shards}")
    if first["status"] != "complete":
        return
    for split in SPLITS:
        pos = 0
        for rec in sorted(recs, key=lambda r: int(r["shard"])):
            a, b = rec["rows"][split]
            if b > a:
                if a != pos:
                    raise DropinfError(f"extract finalize: {split} rows [{pos}, {a}) are covered by no part")
                pos = b
        if pos != first["manifest"]["n"][split]:
            raise DropinfError(f"extract finalize: {split} rows [{pos}, {first['manifest']['n'][split]}) are covered "
                               "by no part")


#: per kind of part: the manifest field naming the source, and the one holding the seconds per seed
SOURCE_FIELD = {"pass": None, "nested": "sliced_from", "identity": "served_from"}
SECONDS_FIELD = {"pass": "seconds", "nested": "seconds", "identity": "compress_seconds"}
ARRAY_SECONDS_ATTR = {"pass": "extract_seconds", "nested": None, "identity": "compress_seconds"}
#: a pass's writer statistics summed into the manifest's `writer_seconds` (`BackgroundRowWriter.stats`)
WRITER_SECONDS = ("compute_wait_seconds", "drain_seconds", "writer_wait_seconds", "write_seconds")


def finalize(*, out_dir, parts, provenance: dict, array_relpath) -> dict:
    """Check the part records `parts` of the extraction in `out_dir`, mark its arrays complete and
    write its manifest (see the module docstring). Raises, naming them, when parts are missing or
    disagree. `array_relpath(compressor, seed, split)` names an array inside `out_dir`."""
    from .common import jsonable

    out_dir = Path(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    recs = sorted(_read_records(parts), key=lambda r: int(r["shard"]))
    check_records(recs)
    first = recs[0]
    shards, kind = int(first["shards"]), first["kind"]
    manifest = dict(first["manifest"])
    # the jobs that wrote the arrays (what `snakemake --forcerun` must name to recompute them)
    manifest["parts"] = [f"{PARTS_DIR}/{Path(p).name}" for p in parts]
    if shards > 1:
        manifest["shards"] = shards
    if "deterministic" in first:  # a pass: deterministic only when every part was (parts of two runs may meet)
        manifest["deterministic"] = all(rec.get("deterministic") is True for rec in recs)
    records = [{k: rec.get(k) for k in ("shard", "rows", "kind", "source_dir", "seconds", "provenance", "status",
                                        "writer", "deterministic")} for rec in recs]
    if shards > 1:
        manifest["shard_records"] = records
    keep = {Path(p).name for p in parts}
    for p in (out_dir / PARTS_DIR).glob("*"):  # records of another plan or kind of part
        if p.name not in keep:
            remove(p)
    if first["status"] == "skipped":
        for p in out_dir.glob("*.zarr"):  # arrays of an earlier run that stored them
            remove(p)
        manifest.update(status="skipped", reason=first.get("reason"), provenance=provenance)
        write_manifest(out_dir, manifest)
        return manifest
    seeds = first["seeds"] or [None]
    seconds_field, attr = SECONDS_FIELD[kind], ARRAY_SECONDS_ATTR[kind]
    manifest.setdefault(seconds_field, {})
    for seed in seeds:
        key = str(seed)
        for split in SPLITS:
            rel = array_relpath(first["compressor"], seed, split)
            arr = open_array(out_dir / rel, mode="r+")
            want = (manifest["n"][split], manifest["out_dim"])
            if arr.shape != want:
                raise DropinfError(f"extract finalize: {out_dir / rel} has shape {arr.shape}, not {want}")
            extra = {"complete": True, "provenance": provenance}
            if attr is not None:
                extra[attr] = float(sum(rec["seconds"][key][split] for rec in recs))
            if shards > 1:
                extra["shard_records"] = [{"shard": rec["shard"], "rows": rec["rows"][split], "kind": kind,
                                           "seconds": rec["seconds"][key][split], "provenance": rec["provenance"]}
                                          for rec in recs]
            arr.attrs.update(jsonable(extra))
            manifest["arrays"].setdefault(key, {})[split] = rel
            stats = [rec["writer"][key][split] for rec in recs if split in (rec.get("writer") or {}).get(key, {})]
            if stats:  # a pass's writer: how long compute and writing waited on each other, over the parts
                manifest.setdefault("writer_seconds", {}).setdefault(key, {})[split] = {
                    field: float(sum(st[field] for st in stats)) for field in WRITER_SECONDS}
        manifest[seconds_field][key] = float(sum(sum(rec["seconds"][key].values()) for rec in recs))
    if SOURCE_FIELD[kind]:
        manifest[SOURCE_FIELD[kind]] = first["source_dir"]
    if first["seeds"]:  # seed directories of an earlier configuration
        wanted = {f"seed{s}" for s in seeds}
        for p in out_dir.glob("seed*"):
            if p.name not in wanted:
                remove(p)
    for p in list(out_dir.rglob(".*.meta-*")):  # metadata scratch of killed parts
        remove(p)
    manifest.update(status="complete", provenance=provenance)
    write_manifest(out_dir, manifest)
    return manifest
