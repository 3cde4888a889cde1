"""Stage `score`: influence scores of every training example, one job per (method, r).

    {out_dir}/seed{seed}.zarr    (seeded methods: compressed ones, random)
    {out_dir}/scores.zarr        (full-space methods: orig, lissa, datainf, tracin)
    {out_dir}/manifest.json      (written last)

Every method solves with the curvature structure `curvature` (config `score.curvature`: 'layer',
the default, 'tensor' or 'global'; see docs/curvature.md): full-space methods run their own solver
on the `identity` arrays, block-diagonal by the layout's grouping; compressed methods run the
`exact` solver in r-space with the blocks of their columns, read from the arrays' attributes
(`dropinf.compressors.base.column_blocks_from_attrs`: dropout's kept coordinates grouped by the
block they come from, LoGra's and per-block Gaussian/SJLT's columns by their block; a global
projection stays one block); `random` draws seeded standard-normal scores. Every score array is
(n_train,) float32 whose attributes carry the sign convention (positive = harmful), the curvature
setting and the blocks actually solved.

Where full-space methods read raw gradients (`gradients`): "stored" reads the identity extraction
and skips when it was skipped (over its budget); "recompute" never reads it: the fine-tuned model
recomputes each row chunk the solver asks for (`dropinf.recompute`), so tracin/datainf/lissa/orig
run exactly on models whose raw gradients do not fit on disk; "auto" reads them when stored and
recomputes otherwise. A recomputing job's seconds include its gradient passes (also logged apart).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import DropinfError
from ..layout import Layout, check_curvature
from .common import Stage, clean_stale, file_sha256, jsonable, log
from .extract import load_split
from .methods import extraction_of, is_full_space, solver_of
from .prepare import model_inputs
from .prepare import load_prepared
from .storage import MANIFEST, read_manifest, save_array, write_manifest


def score_relpath(seed) -> str:
    return "scores.zarr" if seed is None else f"seed{seed}.zarr"


GRADIENT_SOURCES = ("auto", "stored", "recompute")


def solve_blocks(method: str, gm: dict, array, curvature: str) -> dict:
    """label -> columns of each curvature block for `method` on one extracted array (manifest `gm`)."""
    from ..compressors.base import column_blocks_from_attrs

    if is_full_space(method):
        if "layout" not in gm:
            raise DropinfError(f"the extract manifest of {method!r} has no 'layout' (which coordinates belong to "
                               f"which parameter), so its curvature blocks are unknown: re-run its extract stage")
        return Layout.from_json(gm["layout"]).coordinate_blocks(curvature)
    return column_blocks_from_attrs(dict(array.attrs), curvature)


def block_summary(curvature: str, blocks: dict) -> dict:
    """What a score's attributes say about its curvature (labels only when few)."""
    widths = [int(len(v)) for v in blocks.values()]
    out = {"curvature": curvature, "n_blocks": len(blocks), "block_widths": widths}
    if len(blocks) <= 256:
        out["block_labels"] = list(blocks)
    return out


def score(data, out_dir, method: str, r: int | None = None, grads: str | None = None, seeds=(0,),
          damping="paper", device: str = "auto", threads: int | None = None, options: dict | None = None,
          experiment: str = "", model: str | None = None, gradients: str = "auto",
          recompute_batch_size: int = 64, curvature: str = "layer") -> dict:
    import dropinf
    from ..influence import influence

    check_curvature(curvature, "score.curvature")
    if gradients not in GRADIENT_SOURCES:
        raise DropinfError(f"score.gradients must be one of {', '.join(GRADIENT_SOURCES)}, got {gradients!r}")
    stage = Stage("score", device=device, threads=threads)
    out_dir = Path(out_dir)
    # nothing of an earlier run is touched until the new scores exist (`commit`)
    pending: list[tuple[str, np.ndarray, dict]] = []
    options = dict(options or {})
    manifest = {"method": method, "r": r, "experiment": experiment, "damping": damping, "curvature": curvature,
                "options": options, "n_blocks": {}, "scores": {}, "seconds": {}, "extract_seconds": {},
                "compress_seconds": {}, "extract_provenance": None, "seeds": []}
    common_attrs = {"kind": "influence scores", "experiment": experiment, "method": method, "r": r,
                    "damping": damping, "curvature": curvature, "sign_convention": dropinf.SIGN_CONVENTION,
                    "positive_means": "harmful (raises test loss when up-weighted)",
                    "most_valuable": "most negative", "options": options}

    if extraction_of(method) is None:
        blob = load_prepared(data)
        n = next(iter(blob["train"].values())).shape[0]
        for seed in seeds:
            t0 = time.perf_counter()
            values = np.random.default_rng(int(seed)).standard_normal(n).astype(np.float32)
            secs = time.perf_counter() - t0
            pending.append((score_relpath(seed), values,
                            {**common_attrs, "seed": int(seed), "n": n, "solver": "random (seeded standard normal)",
                             "score_seconds": secs, "provenance": stage.provenance()}))
            manifest["scores"][str(seed)] = score_relpath(seed)
            manifest["seconds"][str(seed)] = secs
        manifest.update(status="complete", seeds=[int(s) for s in seeds], provenance=stage.provenance())
        return commit(out_dir, pending, manifest)

    if is_full_space(method) and gradients == "recompute":
        return _score_recomputed(data, model, out_dir, method, damping, options, stage, manifest, common_attrs,
                                 recompute_batch_size, curvature, why="score.gradients is 'recompute'")
    if grads is None:
        raise DropinfError(f"score: method {method!r} reads extracted gradients; pass --grads (an extract manifest)")
    gm = read_manifest(grads)
    grads_dir = Path(grads).parent if Path(grads).name == MANIFEST else Path(grads)
    manifest["extract_provenance"] = gm.get("provenance")
    if gm.get("status") != "complete" and is_full_space(method) and gradients == "auto":
        why = f"the identity extraction was skipped ({gm.get('reason', 'unknown reason')})"
        if model is None:
            raise DropinfError(f"score: {method} needs raw gradients, {why}, and no --model was given to "
                               f"recompute them (or set score.gradients to 'stored' to skip {method})")
        return _score_recomputed(data, model, out_dir, method, damping, options, stage, manifest, common_attrs,
                                 recompute_batch_size, curvature, why=why)
    if gm.get("status") != "complete":
        reason = f"{gm.get('compressor')} extraction was skipped: {gm.get('reason', 'unknown reason')}"
        log.warning("SKIPPED %s: %s", method, reason)
        manifest.update(status="skipped", reason=reason, provenance=stage.provenance())
        return commit(out_dir, [], manifest)

    solver = solver_of(method)
    seeds_here = [None] if is_full_space(method) else [int(s) for s in seeds]
    for seed in seeds_here:
        train = load_split(grads_dir, gm, seed, "train")
        test = torch.from_numpy(np.asarray(load_split(grads_dir, gm, seed, "test")[...]))
        blocks = solve_blocks(method, gm, train, curvature)
        t0 = time.perf_counter()
        values = influence(train, test, solver, damping=damping, blocks=blocks, device=stage.device, **options)
        secs = time.perf_counter() - t0
        values = values.to(torch.float32).numpy()
        projection = dict(train.attrs).get("compressor_attrs", {}).get("blocks")
        attrs = {**common_attrs, "seed": seed, "n": int(values.shape[0]), "solver": solver,
                 **block_summary(curvature, blocks), "projection_blocks": projection,
                 "grads": str(grads_dir / gm["arrays"][str(seed)]["train"]), "compressor": gm["compressor"],
                 "out_dim": gm["out_dim"], "dim": gm["dim"], "score_seconds": secs,
                 "compressor_seed": seed, "provenance": stage.provenance()}
        pending.append((score_relpath(seed), values, attrs))
        manifest["scores"][str(seed)] = score_relpath(seed)
        manifest["seconds"][str(seed)] = secs
        manifest["n_blocks"][str(seed)] = len(blocks)
        manifest["extract_seconds"][str(seed)] = gm.get("seconds", {}).get(str(seed))
        # served from stored raw gradients: the projection's seconds (the raw pass is the identity job's)
        manifest["compress_seconds"][str(seed)] = (gm.get("compress_seconds") or {}).get(str(seed))
        log.info("%s (%s, curvature %s: %d blocks) seed %s: %d scores in %.3fs; mean %.3g, std %.3g", method,
                 solver, curvature, len(blocks), seed, values.shape[0], secs,
                 float(values.mean()), float(values.std()))
    manifest.update(status="complete", seeds=[s for s in seeds_here if s is not None],
                    provenance=stage.provenance(), sliced_from=gm.get("sliced_from"))
    return commit(out_dir, pending, jsonable(manifest))


def commit(out_dir, arrays, manifest: dict) -> dict:
    """Replace the directory's outputs by the new ones, once they all exist in memory: the old
    manifest goes first (a kill from here on leaves nothing that looks finished), then each array
    is written under a temporary name and renamed into place, leftovers of other runs are removed,
    and the manifest is written last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for rel, values, attrs in arrays:
        save_array(out_dir / rel, values, attrs)
    clean_stale(out_dir, keep={rel for rel, _, _ in arrays})
    write_manifest(out_dir, manifest)
    return manifest


def recomputed_gradients(data, model, device, batch_size: int, curvature: str = "layer"):
    """(train, test, blocks of `curvature`): raw gradients of the fine-tuned model, recomputed on demand."""
    from ..recompute import RecomputedGradients
    from .train import load_trained

    blob = load_prepared(data)
    spec, _ = load_trained(model, blob, device)
    train, test = (RecomputedGradients(spec.module, spec.loss_fn, model_inputs(blob[s]), params=spec.params,
                                       device=device, batch_size=int(batch_size)) for s in ("train", "test"))
    return train, test, train.layout.coordinate_blocks(curvature)


def _score_recomputed(data, model, out_dir, method, damping, options, stage, manifest, common_attrs,
                      batch_size: int, curvature: str, why: str) -> dict:
    """A full-space method on raw gradients recomputed chunk by chunk from the fine-tuned model."""
    from ..influence import influence

    train, test, blocks = recomputed_gradients(data, model, stage.device, batch_size, curvature)
    log.info("%s on recomputed raw gradients (%s): n=%d, d=%d, %d blocks (curvature %s), %d rows per pass chunk",
             method, why, train.n, train.d, len(blocks), curvature, batch_size)
    t0 = time.perf_counter()
    v = test.mean().to(train.dtype)
    values = influence(train, v, solver_of(method), damping=damping, blocks=blocks, device=stage.device,
                       chunk_rows=int(batch_size), **options)
    secs = time.perf_counter() - t0
    values = values.to(torch.float32).numpy()
    cost = {"train_passes": round(train.passes, 4), "train_seconds": train.seconds, "test_seconds": test.seconds,
            "batch_size": int(batch_size), "why": why}
    log.info("%s: %d scores in %.3fs, of which %.3fs recomputing gradients (%.2f passes over train, test once); "
             "mean %.3g, std %.3g", method, values.shape[0], secs, train.seconds + test.seconds, train.passes,
             float(values.mean()), float(values.std()))
    attrs = {**common_attrs, "seed": None, "n": int(values.shape[0]), "solver": solver_of(method),
             **block_summary(curvature, blocks), "grads": "recomputed from the model (not stored)",
             "model": str(model), "model_sha256": file_sha256(model), "compressor": "identity", "out_dim": train.d, "dim": train.d,
             "score_seconds": secs, "recompute": cost, "provenance": stage.provenance()}
    manifest["scores"]["None"] = score_relpath(None)
    manifest["seconds"]["None"] = secs
    manifest["n_blocks"]["None"] = len(blocks)
    manifest.update(status="complete", seeds=[], recompute=cost, provenance=stage.provenance())
    return commit(out_dir, [(score_relpath(None), values, attrs)], jsonable(manifest))
