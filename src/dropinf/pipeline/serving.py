"""Which kind of job fills each extraction directory `grads/{compressor}/{rtag}/`, decided at DAG time.

Stdlib only: the Snakefile loads this module by path (no torch at DAG time). The workflow asks
`route(...)` once per extraction and makes the answer's input the job's declared input:

* an existing, finished extraction keeps the kind it was made by (its manifest records it:
  `sliced_from`, `served_from`) as long as that source is still there - so adding an r, or turning
  a switch off, reruns nothing that exists (the switches say how missing arrays are made);
* otherwise a smaller r of a compressor that nests in r is sliced from the largest configured r
  (`extract.nest`), so a sweep needs one pass (or one compression) per seed;
* otherwise a compressor is served from the stored raw gradients (`extract.from_identity`) when
  the identity extraction is part of the run, or finished, and stored them (not over budget) on
  the device type this job runs on; the workflow learns that from the identity manifest, after its
  job (a checkpoint) when it has not run yet;
* otherwise a gradient pass.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
#: compressors whose output at r' < r is the first r' columns of their output at r (`nests_in_r` in
#: `dropinf.compressors`; a test keeps the two in agreement)
NESTS_IN_R = ("dropout", "importance_dropout", "gaussian")

PASS, NESTED, IDENTITY = "pass", "nested", "identity"


@dataclass(frozen=True)
class Route:
    """`kind` of the part jobs of one extraction; `source` the directory they read (nested, identity)."""

    kind: str
    source: str | None = None

    def part_kind(self) -> str:
        """The part records' name prefix (see `sharding.part_path`)."""
        if self.kind == PASS:
            return "pass"
        return "from-identity" if self.kind == IDENTITY else f"from-{Path(self.source).name}"

    def parts(self, grads_dir: str, shards: int) -> list[str]:
        n = 1 if self.kind == NESTED else int(shards)  # slicing is cheap: one part
        return [f"{grads_dir}/parts/{self.part_kind()}-{k}of{n}.json" for k in range(n)]


def read_manifest(directory) -> dict | None:
    """The finished manifest in `directory` (complete or skipped), or None."""
    try:
        m = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("status") in ("complete", "skipped") else None


def device_fits(manifest: dict, device: str) -> bool:
    """Raw gradients serve only jobs on their device type; 'auto' is checked by the job itself."""
    kind = "cuda" if device.startswith("cuda") else device
    return kind == "auto" or (manifest.get("fingerprint") or {}).get("device_type") == kind


def recorded(manifest: dict | None) -> Route | None:
    """The route an existing finished extraction was made by, if its source is still there."""
    if manifest is None:
        return None
    for field, kind in (("sliced_from", NESTED), ("served_from", IDENTITY)):
        if manifest.get(field):
            src = manifest[field]
            return Route(kind, src) if read_manifest(src) is not None else None
    return Route(PASS)


def route(*, compressor: str, r: int | None, grads: str, rs, nest: bool, from_identity: bool, identity,
          device: str, nests_in_r: bool | None = None) -> Route:
    """How `grads/{compressor}/{r}` is made (see the module docstring). `grads`: the grads/ directory;
    `rs`: the configured r values; `identity()`: the identity manifest when it serves this run
    (None when it is not part of it); called only when needed, since it may wait for that job.
    `nests_in_r`: the compressor's class attribute (default: membership in NESTS_IN_R)."""
    if nests_in_r is None:
        nests_in_r = compressor in NESTS_IN_R
    here = f"{grads}/{compressor}/{'full' if r is None else f'r{int(r)}'}"
    kept = recorded(read_manifest(here))
    if kept is not None:
        return kept
    if compressor == "identity" or r is None:
        return Route(PASS)
    if nest and nests_in_r and rs and int(r) < max(rs):
        return Route(NESTED, f"{grads}/{compressor}/r{max(rs)}")
    if from_identity:
        m = identity()
        if m is not None and m.get("status") == "complete" and device_fits(m, device):
            return Route(IDENTITY, f"{grads}/identity/full")
    return Route(PASS)
