"""Stage `score`: influence scores of every training example, one job per (method, r).

    {out_dir}/seed{seed}.zarr    (seeded methods: compressed ones, random)
    {out_dir}/scores.zarr        (full-space methods: orig, lissa, datainf, tracin)
    {out_dir}/manifest.json      (written last)

Full-space methods run their own solver on the `identity` arrays with per-layer curvature blocks
(the layout's parameter tensors); compressed methods run the `exact` solver on their compressor's
arrays with one global block; `random` draws seeded standard-normal scores. Every score array is
(n_train,) float32 whose attributes carry the sign convention: positive = harmful.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .common import Stage, clean_stale, jsonable, log
from .extract import load_split
from .methods import BASELINES, FULL_SPACE, solver_of
from .prepare import load_prepared
from .storage import MANIFEST, read_manifest, save_array, write_manifest


def score_relpath(seed) -> str:
    return "scores.zarr" if seed is None else f"seed{seed}.zarr"


def score(data, out_dir, method: str, r: int | None = None, grads: str | None = None, seeds=(0,),
          damping="paper", device: str = "auto", threads: int | None = None, options: dict | None = None,
          experiment: str = "") -> dict:
    import dropinf
    from ..influence import influence

    stage = Stage("score", device=device, threads=threads)
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    clean_stale(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(options or {})
    manifest = {"method": method, "r": r, "experiment": experiment, "damping": damping, "options": options,
                "scores": {}, "seconds": {}, "extract_seconds": {}, "extract_provenance": None, "seeds": []}
    common_attrs = {"kind": "influence scores", "experiment": experiment, "method": method, "r": r,
                    "damping": damping, "sign_convention": dropinf.SIGN_CONVENTION,
                    "positive_means": "harmful (raises test loss when up-weighted)",
                    "most_valuable": "most negative", "options": options}

    if method in BASELINES:
        blob = load_prepared(data)
        n = next(iter(blob["train"].values())).shape[0]
        for seed in seeds:
            t0 = time.perf_counter()
            values = np.random.default_rng(int(seed)).standard_normal(n).astype(np.float32)
            secs = time.perf_counter() - t0
            save_array(out_dir / score_relpath(seed), values,
                       {**common_attrs, "seed": int(seed), "n": n, "solver": "random (seeded standard normal)",
                        "score_seconds": secs, "provenance": stage.provenance()})
            manifest["scores"][str(seed)] = score_relpath(seed)
            manifest["seconds"][str(seed)] = secs
        manifest.update(status="complete", seeds=[int(s) for s in seeds], provenance=stage.provenance())
        write_manifest(out_dir, manifest)
        return manifest

    gm = read_manifest(grads)
    grads_dir = Path(grads).parent if Path(grads).name == MANIFEST else Path(grads)
    manifest["extract_provenance"] = gm.get("provenance")
    if gm.get("status") != "complete":
        reason = f"{gm.get('compressor')} extraction was skipped: {gm.get('reason', 'unknown reason')}"
        log.warning("SKIPPED %s: %s", method, reason)
        manifest.update(status="skipped", reason=reason, provenance=stage.provenance())
        write_manifest(out_dir, manifest)
        return manifest

    solver = solver_of(method)
    blocks = [tuple(b) for b in gm["blocks"]] if method in FULL_SPACE else None
    seeds_here = [None] if method in FULL_SPACE else [int(s) for s in seeds]
    for seed in seeds_here:
        train = load_split(grads_dir, gm, seed, "train")
        test = torch.from_numpy(np.asarray(load_split(grads_dir, gm, seed, "test")[...]))
        t0 = time.perf_counter()
        values = influence(train, test, solver, damping=damping, blocks=blocks, device=stage.device, **options)
        secs = time.perf_counter() - t0
        values = values.to(torch.float32).numpy()
        attrs = {**common_attrs, "seed": seed, "n": int(values.shape[0]), "solver": solver,
                 "blocks": "per layer" if blocks else "global", "n_blocks": len(blocks) if blocks else 1,
                 "grads": str(grads_dir / gm["arrays"][str(seed)]["train"]), "compressor": gm["compressor"],
                 "out_dim": gm["out_dim"], "dim": gm["dim"], "score_seconds": secs,
                 "compressor_seed": seed, "provenance": stage.provenance()}
        save_array(out_dir / score_relpath(seed), values, attrs)
        manifest["scores"][str(seed)] = score_relpath(seed)
        manifest["seconds"][str(seed)] = secs
        manifest["extract_seconds"][str(seed)] = gm.get("seconds", {}).get(str(seed))
        log.info("%s (%s, %s) seed %s: %d scores in %.3fs; mean %.3g, std %.3g", method, solver,
                 "per-layer blocks" if blocks else "global block", seed, values.shape[0], secs,
                 float(values.mean()), float(values.std()))
    manifest.update(status="complete", seeds=[s for s in seeds_here if s is not None],
                    provenance=stage.provenance(), sliced_from=gm.get("sliced_from"))
    write_manifest(out_dir, jsonable(manifest))
    return manifest
