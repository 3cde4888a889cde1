"""Stage `score`: influence scores of every training example, one job per (method, r).

    {out_dir}/seed{seed}.zarr    (seeded methods: compressed ones, random)
    {out_dir}/scores.zarr        (full-space methods: orig, lissa, datainf, tracin)
    {out_dir}/manifest.json      (written last)

Optional outputs beside them (docs/pairwise.md), same solver, blocks and damping as the scores:
`pairwise=True` (config `score.pairwise`) writes `seed{seed}.pairwise.zarr` / `scores.pairwise.zarr`,
the (n_test, n_train) matrix P[j, k] = -g_test_j^T (H + lambda I)^{-1} g_k in square tiles, computed
block by block (never whole in memory); `self_influence=True` (`score.self`) writes
`seed{seed}.self.zarr` / `scores.self.zarr`, S[k] = g_k^T (H + lambda I)^{-1} g_k (>= 0; high =
mislabeled or atypical). Both need the method's gradients stored: `random` has none (noted in the
manifest), and a full-space method on recomputed raw gradients is refused.

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

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DropinfError
from ..layout import CURVATURES, Layout, check_curvature
from .commands import DAMPING, RSIZE, command, option
from .common import Stage, clean_stale, file_sha256, jsonable, log, remove, tmp_path
from .extract import load_split
from .methods import extraction_of, is_full_space, solver_of
from .prepare import model_inputs
from .prepare import load_prepared
from .storage import MANIFEST, create_array, mark_complete, read_manifest, save_array, write_manifest

#: Side of the square tiles of a pairwise array (float32: 1 MiB per tile): reading one test row or
#: one training column touches one row or column of tiles.
PAIRWISE_TILE = 512


def score_relpath(seed, kind: str = "") -> str:
    """The array of a seed's scores (kind ''), pairwise matrix ('pairwise') or self-influence ('self')."""
    stem = "scores" if seed is None else f"seed{seed}"
    return f"{stem}.{kind}.zarr" if kind else f"{stem}.zarr"


def pairwise_chunks(m: int, n: int) -> tuple[int, int]:
    return min(PAIRWISE_TILE, max(1, m)), min(PAIRWISE_TILE, max(1, n))


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


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """Which method scores, from which arrays (shared by `score` and `lds score`)."""
    data: Path = option("prepared data")
    method: str = option("method name")
    r: int | None = option("compressed size ('full' for full-space methods)", default=None, codec=RSIZE)
    grads: Path | None = option("extract manifest.json (not for random)", default=None)
    seeds: tuple[int, ...] = option("compressor seeds", default=(0,))
    damping: str | float | list = option("'paper', a number, or a JSON list (one per block)", default="paper",
                                         codec=DAMPING)
    curvature: str = option("curvature blocks of every method (docs/curvature.md)", default="layer",
                            choices=CURVATURES)


@dataclass(frozen=True, kw_only=True)
class ScoreOptions(MethodOptions):
    out_dir: Path = option("the scores' directory")
    device: str = option("torch device, or 'auto'", default="auto")
    threads: int | None = option("torch CPU threads", default=None)
    options: dict | None = option("JSON options for dropinf.influence", default=None)
    experiment: str = option("experiment name recorded in the scores", default="")
    model: Path | None = option("fine-tuned model.pt: full-space methods recompute raw gradients from it",
                                default=None)
    gradients: str = option("full-space methods: read stored raw gradients, recompute them, or auto (stored if "
                            "complete)", default="auto", choices=GRADIENT_SOURCES)
    recompute_batch_size: int = option("rows per recomputed chunk", default=64)
    pairwise: bool = option("also write the test x train matrix of influence scores (docs/pairwise.md)",
                            default=False)
    self_influence: bool = option("also write every training example's self-influence (docs/pairwise.md)",
                                  default=False)


@command("score", ScoreOptions, help="influence scores of one method (all seeds)")
def score(*, data, out_dir, method: str, r: int | None = None, grads: str | None = None, seeds=(0,),
          damping="paper", device: str = "auto", threads: int | None = None, options: dict | None = None,
          experiment: str = "", model: str | None = None, gradients: str = "auto",
          recompute_batch_size: int = 64, curvature: str = "layer", pairwise: bool = False,
          self_influence: bool = False) -> dict:
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
                "compress_seconds": {}, "extract_provenance": None, "seeds": [],
                "pairwise": {}, "self": {}, "pairwise_seconds": {}, "self_seconds": {}}
    common_attrs = {"kind": "influence scores", "experiment": experiment, "method": method, "r": r,
                    "damping": damping, "curvature": curvature, "sign_convention": dropinf.SIGN_CONVENTION,
                    "positive_means": "harmful (raises test loss when up-weighted)",
                    "most_valuable": "most negative", "options": options}

    if extraction_of(method) is None:
        if pairwise or self_influence:
            manifest["not_applicable"] = f"{method} scores use no gradients: no pairwise or self-influence arrays"
            log.info("%s: score.pairwise/score.self do not apply (%s)", method, manifest["not_applicable"])
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

    def recomputed(why: str) -> None:
        if pairwise or self_influence:
            key = "score.pairwise" if pairwise else "score.self"
            raise DropinfError(f"{key}: {method} runs on raw gradients recomputed from the model ({why}); pairwise and "
                               f"self-influence need them stored (test gradients whole, train read once per solve): "
                               f"set {key}: false, raise extract.identity_budget_mb, or score a compressed method")

    if is_full_space(method) and gradients == "recompute":
        recomputed("score.gradients is 'recompute'")
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
        recomputed(why)
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
    staged = pairwise_and_self(grads_dir, gm, seeds_here, method, curvature, dict(damping=damping, device=stage.device,
                               **options), out_dir, pending, manifest, pairwise, self_influence)
    manifest.update(status="complete", seeds=[s for s in seeds_here if s is not None],
                    provenance=stage.provenance(), sliced_from=gm.get("sliced_from"))
    return commit(out_dir, pending, jsonable(manifest), staged)


def pairwise_and_self(grads_dir, gm, seeds, method, curvature, solve: dict, out_dir, pending, manifest,
                      pairwise: bool, self_influence: bool) -> list[tuple[str, Path]]:
    """The optional outputs of every seed, with the solver, blocks and damping of its scores (their
    attributes are in `pending`): self-influence joins `pending`; pairwise arrays are written complete
    under temporary names, returned as (rel, path) for `commit` (removed again if a later one fails)."""
    from ..influence import self_influence as self_scores

    staged: list[tuple[str, Path]] = []
    if not (pairwise or self_influence):
        return staged
    solver = solver_of(method)
    attrs_of = {rel: attrs for rel, _, attrs in pending}
    try:
        for seed in seeds:
            train = load_split(grads_dir, gm, seed, "train")
            attrs = attrs_of[score_relpath(seed)]
            blocks = solve_blocks(method, gm, train, curvature)
            if pairwise:
                rel = score_relpath(seed, "pairwise")
                staged.append((rel, tmp_path(Path(out_dir) / rel)))
                test = torch.from_numpy(np.asarray(load_split(grads_dir, gm, seed, "test")[...]))
                secs = write_pairwise(staged[-1][1], train, test, solver, {**solve, "blocks": blocks},
                                      {**attrs, **pairwise_attrs()})
                manifest["pairwise"][str(seed)] = rel
                manifest["pairwise_seconds"][str(seed)] = secs
            if self_influence:
                t0 = time.perf_counter()
                own = self_scores(train, solver, blocks=blocks, **solve).to(torch.float32).numpy()
                secs = time.perf_counter() - t0
                rel = score_relpath(seed, "self")
                pending.append((rel, own, {**attrs, **self_attrs(), "score_seconds": secs}))
                manifest["self"][str(seed)] = rel
                manifest["self_seconds"][str(seed)] = secs
                log.info("%s seed %s: self-influence of %d training examples in %.3fs; min %.3g, max %.3g", method,
                         seed, own.shape[0], secs, float(own.min()), float(own.max()))
    except BaseException:
        for _, tmp in staged:
            remove(tmp)
        raise
    return staged


def pairwise_attrs() -> dict:
    from ..influence import PAIRWISE_CONVENTION

    return {"kind": "pairwise influence scores", "sign_convention": PAIRWISE_CONVENTION,
            "rows": "test examples (test split order)", "columns": "training examples (train split order)",
            "positive_means": "up-weighting training example k raises the loss of test example j (harmful)",
            "mean_over_rows": "the method's influence scores (the array beside it without .pairwise)"}


def self_attrs() -> dict:
    from ..influence import SELF_INFLUENCE_CONVENTION

    return {"kind": "self-influence", "sign_convention": SELF_INFLUENCE_CONVENTION,
            "positive_means": "always >= 0 for an exact solve; high = the model fits the example only by "
                              "leaning on it (mislabeled or atypical: ranked by the same mislabel AUC)",
            "most_valuable": None}


def write_pairwise(path, train, test, solver: str, solve: dict, attrs: dict) -> float:
    """The (m, n) pairwise matrix of `solver` as a complete array at `path` (square tiles, filled block
    by block as `pairwise_blocks` yields them, each block aligned to the tiles); its seconds."""
    from ..influence import pairwise_blocks

    m, n = int(test.shape[0]), int(train.shape[0])
    tile = pairwise_chunks(m, n)
    remove(path)
    t0 = time.perf_counter()
    arr = create_array(path, m, n, attrs, chunk_rows=tile[0], chunk_cols=tile[1])
    for rows, cols, block in pairwise_blocks(train, test, solver, align=tile, **solve):
        arr[rows, cols] = block.to(torch.float32).numpy()
    secs = time.perf_counter() - t0
    mark_complete(arr, score_seconds=secs)
    log.info("pairwise %s: (%d test x %d train) in tiles of %s, %.3fs", solver, m, n, tile, secs)
    return secs


def commit(out_dir, arrays, manifest: dict, staged=()) -> dict:
    """Replace the directory's outputs by the new ones, once they all exist (in memory, or as complete
    arrays under temporary names: `staged` (rel, path)): the old manifest goes first (a kill from here
    on leaves nothing that looks finished), then each array is written under a temporary name and
    renamed into place, leftovers of other runs are removed, and the manifest is written last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for rel, values, attrs in arrays:
        save_array(out_dir / rel, values, attrs)
    for rel, tmp in staged:
        remove(out_dir / rel)
        os.replace(tmp, out_dir / rel)
    clean_stale(out_dir, keep={rel for rel, _, _ in arrays} | {rel for rel, _ in staged})
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
