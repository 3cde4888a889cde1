"""Stage `extract`: compressed per-example gradients of the fine-tuned model, written to Zarr.

One job per (compressor, r): for every seed and both splits it runs `dropinf.extraction.Extractor`
(one fused forward+backward per batch) and streams rows into a chunked Zarr array:

    {out_dir}/seed{seed}/{split}.zarr      (compressed, seeded)
    {out_dir}/{split}.zarr                 (identity: raw gradients, no seed)
    {out_dir}/manifest.json                (written last: the job's done marker)

Nesting: for a compressor whose output at r' < r is a function of its output at r (`nests_in_r`:
dropout, gaussian), a complete larger-r sibling directory of the same model, data, options and
device type serves r' by `Compressor.nest` (column slicing) instead of a new pass. This happens
here, at run time, so the DAG never makes one r depend on another.

Identity: skipped (manifest status "skipped", with the reason) when n * d * 4 bytes exceeds the
budget; the full-space methods then skip too.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import BudgetError
from .common import Stage, clean_stale, file_sha256, jsonable, log
from .methods import rtag
from .prepare import load_prepared, model_inputs
from .storage import MANIFEST, RowWriter, is_complete, open_array, read_manifest, write_array, write_manifest
from .train import Batches, load_trained

SPLITS = ("train", "test")


def array_relpath(compressor: str, seed: int | None, split: str) -> str:
    return f"{split}.zarr" if compressor == "identity" else f"seed{seed}/{split}.zarr"


def _budget_check(extractor, n: int) -> str | None:
    check = getattr(extractor.compressor, "check_budget", None)
    if check is None:
        return None
    try:
        check(n)
    except BudgetError as e:
        return str(e)
    return None


def extract_rows(extractor, split: dict, arr, batch_size: int, start: int = 0, stop: int | None = None) -> float:
    """Fill rows [start, stop) of `arr` with the extractor's output for those rows of `split`.

    The range must be chunk-aligned (see `RowWriter`): this is what a shard of a sharded
    extraction runs. Returns the seconds spent."""
    n = next(iter(split.values())).shape[0]
    stop = n if stop is None else stop
    writer = RowWriter(arr, start, stop)
    t0 = time.perf_counter()
    extractor.run(Batches(split, batch_size, indices=torch.arange(start, stop)), sink=writer)
    writer.close()
    return time.perf_counter() - t0


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
    if src.attrs.get("compressor_attrs", {}).get("indices") is not None and hasattr(dst_comp, "indices"):
        # dropout: the kept coordinates at r must be the first r kept at r_big (a real check of the nesting)
        if src.attrs["compressor_attrs"]["indices"][:dst_comp.r] != dst_comp.indices.tolist():
            raise RuntimeError(f"{src_path}: stored indices do not nest into r={dst_comp.r}")
    n = src.shape[0]
    step = max(1, int(src.chunks[0]))
    with write_array(dst_path, n, dst_comp.out_dim, attrs) as dst:
        for a in range(0, n, step):
            block = torch.from_numpy(np.asarray(src[a:a + step]))
            dst[a:a + block.shape[0]] = src_comp.nest(block, dst_comp.r).numpy()


def _serve_by_nesting(source, out_dir: Path, compressor: str, r: int, seeds, layout, options, base_attrs, stage,
                      manifest) -> None:
    from ..compressors import compressor as make_compressor

    src_dir, src_manifest = source
    r_big = int(src_manifest["r"])
    log.info("NESTED: serving %s r=%d by slicing the complete r=%d arrays in %s (no extraction pass)",
             compressor, r, r_big, src_dir)
    manifest["sliced_from"] = str(src_dir)
    for seed in seeds:
        t0 = time.perf_counter()
        src_comp = make_compressor(compressor, dim=layout.dim, r=r_big, seed=seed, layout=layout, **options)
        dst_comp = make_compressor(compressor, dim=layout.dim, r=r, seed=seed, layout=layout, **options)
        for split in SPLITS:
            rel = array_relpath(compressor, seed, split)
            attrs = {**base_attrs(seed, split, dst_comp), "sliced_from": str(src_dir / rel),
                     "provenance": stage.provenance()}
            _nest_array(src_dir / rel, out_dir / rel, src_comp, dst_comp, attrs)
            manifest["arrays"].setdefault(str(seed), {})[split] = rel
        manifest["seconds"][str(seed)] = time.perf_counter() - t0


def extract(data, model, out_dir, compressor: str, r: int | None, seeds=(0,), batch_size: int = 256,
            device: str = "auto", threads: int | None = None, budget_mb: float | None = None,
            options: dict | None = None, nest: bool = True, experiment: str = "") -> dict:
    import dropinf
    from ..extraction import Extractor

    stage = Stage("extract", device=device, threads=threads)
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # nothing here looks finished until we say so
    clean_stale(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(options or {})
    seeds = [None] if compressor == "identity" else [int(s) for s in seeds]
    blob = load_prepared(data)
    spec, saved = load_trained(model, blob, stage.device)
    splits = {s: model_inputs(blob[s]) for s in SPLITS}
    n = {s: next(iter(splits[s].values())).shape[0] for s in SPLITS}
    fingerprint = {"model_sha256": file_sha256(model), "data_sha256": file_sha256(data), "options": options,
                   "device_type": stage.device.type, "params": spec.params}
    comp_opts = dict(options)
    if compressor == "identity" and budget_mb is not None:
        comp_opts["budget_bytes"] = int(float(budget_mb) * 2**20)
    manifest = {"compressor": compressor, "r": r, "seeds": [s for s in seeds if s is not None],
                "splits": list(SPLITS), "n": n, "experiment": experiment, "fingerprint": fingerprint,
                "arrays": {}, "seconds": {}, "sliced_from": None}

    def extractor_for(seed):
        return Extractor(spec.module, spec.loss_fn, compressor, r, 0 if seed is None else seed,
                         params=spec.params, device=stage.device, **comp_opts)

    first = extractor_for(seeds[0])
    layout = first.layout
    manifest.update(dim=layout.dim, out_dim=first.compressor.out_dim, layout=layout.to_json(), blocks=layout.blocks)
    reason = _budget_check(first, max(n.values()))
    if reason:
        log.warning("SKIPPED %s extraction: %s", compressor, reason)
        manifest.update(status="skipped", reason=reason, provenance=stage.provenance())
        write_manifest(out_dir, manifest)
        return manifest

    def base_attrs(seed, split, comp):
        return {"kind": "per-example gradients" if compressor == "identity" else "compressed per-example gradients",
                "experiment": experiment, "split": split, "n": n[split], "seed": seed, "compressor": compressor,
                "r": r, "out_dim": comp.out_dim, "compressor_attrs": comp.attrs(), "layout": layout.to_json(),
                "blocks": layout.blocks, "dim": layout.dim, "sign_convention": dropinf.SIGN_CONVENTION,
                "model_sha256": fingerprint["model_sha256"], "data_sha256": fingerprint["data_sha256"],
                "options": options}

    source = _find_nest_source(out_dir, compressor, int(r), seeds, fingerprint) if (nest and r is not None) else None
    if source is not None:
        try:
            _serve_by_nesting(source, out_dir, compressor, int(r), seeds, layout, options, base_attrs, stage,
                              manifest)
        except Exception as e:  # e.g. the source was being rewritten meanwhile: fall back to a pass
            log.warning("nesting from %s failed (%s: %s); extracting directly", source[0], type(e).__name__, e)
            clean_stale(out_dir)
            manifest.update(arrays={}, seconds={}, sliced_from=None)
            source = None
    if source is None:
        for i, seed in enumerate(seeds):
            ex = first if i == 0 else extractor_for(seed)
            comp = ex.compressor
            total = 0.0
            for split in SPLITS:
                rel = array_relpath(compressor, seed, split)
                attrs = base_attrs(seed, split, comp)
                with write_array(out_dir / rel, n[split], comp.out_dim, attrs) as arr:
                    secs = extract_rows(ex, splits[split], arr, batch_size)
                    arr.attrs.update(jsonable({"extract_seconds": secs, "provenance": stage.provenance()}))
                total += secs
                manifest["arrays"].setdefault(str(seed), {})[split] = rel
            manifest["seconds"][str(seed)] = total
            log.info("%s %s seed %s: %d train + %d test rows x %d columns in %.2fs", compressor, rtag(r), seed,
                     n["train"], n["test"], comp.out_dim, total)
    manifest.update(status="complete", provenance=stage.provenance())
    write_manifest(out_dir, manifest)
    return manifest


def load_split(grads_dir, manifest: dict, seed, split: str):
    """The (lazy) Zarr array of one (seed, split) listed in an extract manifest."""
    key = str(seed)
    rel = manifest["arrays"][key][split]
    return open_array(Path(grads_dir) / rel)
