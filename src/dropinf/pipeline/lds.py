"""Stage `lds`: the linear datamodeling score (LDS) of every method, on models retrained on subsets.

Definition (TRAK's, Park et al. 2023, with this project's sign convention):

* Draw M random subsets S_1..S_M of the n training examples, each of size round(fraction * n)
  (seeded: subset k comes from `numpy.random.default_rng([subset_seed, k])`, so it does not depend
  on how the models are split into jobs). Retrain the model on each subset with the fine-tuning
  recipe (same model, settings, initialisation and minibatch-order seed as `finetune`, unless
  `vary_seed`), and record the loss of every test example j: actual_j(S_k) = loss_j(theta_{S_k}).
* Per-test-example scores tau_j(z_i) = I_j(z_i) = -g_test_jᵀ (H + lambda I)^{-1} g_i, i.e.
  `dropinf.influence(train, test, ..., reduce=False)` on the method's (compressed) gradients of the
  model trained on all n examples: the effect of up-weighting z_i on the loss of test example j
  (positive = raises it). Including z_i in a subset is an up-weighting, so the linear datamodel's
  prediction of the subset model's test loss is predicted_j(S) = sum_{i in S} tau_j(z_i) (an affine
  function of the prediction -- scale 1/n, the full model's loss as offset -- has the same ranks).
* LDS_j = Spearman rank correlation over the M subsets between predicted_j(S_k) and actual_j(S_k);
  a method's LDS (per compressor seed) is the mean of LDS_j over the test examples (test examples
  whose actual or predicted values are constant over the subsets have no Spearman correlation and
  are left out; their count is reported). Higher is better; random scores give ~0.

Jobs (see workflow/rules/lds.smk):

* `train`:   subset models [part * M / parts, (part + 1) * M / parts): `lds/subsets/part{p}of{P}.npz`
             (subset masks, per-test-example losses, accuracies, seconds per model, provenance).
* `score`:   one (method, r): per-test-example scores for every seed, LDS against all parts:
             `lds/{method}/{rtag}/metrics.csv` (tidy rows, like `evaluate`) and `per_test.npz`.
* `summarize`: `lds/summary.csv` and `lds/lds_table.md`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .commands import command, group, option
from .score import MethodOptions

#: Metrics of the `score` action, one row per (method, r, seed).
LDS_METRICS = ("lds", "lds_std_over_test", "lds_n_test", "lds_score_seconds")
#: the plot `summarize` writes beside summary.csv (`report.lds_figure`)
LDS_PLOT = "lds_vs_r.png"

group("lds", help="linear datamodeling score: subset models, per-method LDS, summary", description=__doc__)


# ----------------------------------------------------------------------------------------------
# Subsets (numpy; LDS_j itself is `metrics.lds_per_test`)
# ----------------------------------------------------------------------------------------------

def subset_indices(n: int, k: int, fraction: float, seed: int):
    """Sorted training indices of subset k (size round(fraction * n), drawn without replacement)."""
    import numpy as np

    size = int(round(float(fraction) * n))
    if not 0 < size < n:
        raise ValueError(f"lds.fraction {fraction} of n={n} gives a subset of {size} examples")
    rng = np.random.default_rng([int(seed), int(k)])
    return np.sort(rng.choice(n, size=size, replace=False))


def subset_masks(n: int, models, fraction: float, seed: int):
    """(len(models), n) boolean membership matrix of the subsets `models` (indices k)."""
    import numpy as np

    models = list(models)
    masks = np.zeros((len(models), n), dtype=bool)
    for row, k in enumerate(models):
        masks[row, subset_indices(n, k, fraction, seed)] = True
    return masks


# ----------------------------------------------------------------------------------------------
# Stage: train the subset models of one part
# ----------------------------------------------------------------------------------------------

def part_models(n_models: int, part: int, parts: int) -> list[int]:
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in [0, {parts})")
    return list(range(part * n_models // parts, (part + 1) * n_models // parts))


def _save_npz(path, meta: dict, **arrays) -> None:
    import numpy as np

    from .common import atomic_path, jsonable

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(jsonable(meta), sort_keys=True)), **arrays)


def load_npz(path) -> tuple[dict, dict]:
    """(meta, arrays) of a file written by this stage."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    return meta, arrays


@dataclass(frozen=True, kw_only=True)
class TrainPartOptions:
    data: Path = option("prepared data")
    out: Path = option("the part's .npz to write")
    model: str = option("registered model name")
    model_options: dict | None = option("JSON keyword options of the model builder", default=None)
    settings: dict | None = option("JSON fine-tuning settings (the finetune recipe)", default=None, flag="--train")
    n_models: int = option("subset models in all parts")
    fraction: float = option("fraction of the training examples in each subset", default=0.5)
    subset_seed: int = option("seed of the subsets", default=0)
    part: int = option("this part (0..parts-1)", default=0)
    parts: int = option("parts the subset models are split into", default=1)
    vary_seed: bool = option("model k uses init/order seed finetune.seed + 1 + k", default=False)
    device: str = option("torch device, or 'auto'", default="auto")
    threads: int | None = option("torch CPU threads", default=None)
    experiment: str = option("experiment name recorded in the part", default="")
    init: Path | None = option("start every subset model from this model.pt (the pretrain stage)", default=None)


@command("lds train", TrainPartOptions, help="train the subset models of one part")
def train_part(*, data, out, model: str, model_options: dict | None = None, settings: dict | None = None,
               n_models: int, fraction: float = 0.5, subset_seed: int = 0, part: int = 0, parts: int = 1,
               vary_seed: bool = False, device: str = "auto", threads: int | None = None,
               experiment: str = "", init=None) -> dict:
    import numpy as np
    import torch

    from ..progress import bar
    from .common import Stage, log
    from .evaluate import device_inputs
    from .prepare import load_prepared
    from .train import build, fit, train_settings

    stage = Stage("lds_train", device=device, threads=threads)
    blob = load_prepared(data)
    settings = {"epochs": 30, "batch_size": 64, "lr": 1e-2, "weight_decay": 0.0, "optimizer": "adam", "seed": 0,
                **train_settings(settings or {})}
    n = next(iter(blob["train"].values())).shape[0]
    models = part_models(n_models, part, parts)
    inputs = device_inputs(blob, stage.device)
    test = inputs["test"]
    m = next(iter(test.values())).shape[0]
    masks = subset_masks(n, models, fraction, subset_seed)
    losses = np.zeros((len(models), m), dtype=np.float64)
    acc = np.full(len(models), np.nan)
    seconds = np.zeros(len(models))
    final_train_loss = np.zeros(len(models))
    log.info("lds part %d of %d: subset models %s of %d, %d of %d training examples each (seed %d), %s",
             part, parts, f"{models[0]}..{models[-1]}" if models else "none", n_models, int(masks[0].sum())
             if len(models) else 0, n, subset_seed, settings)
    shown = bar(total=len(models), desc=f"lds subset models (part {part} of {parts})", unit="model")
    for row, k in enumerate(models):
        t0 = time.perf_counter()
        seed = int(settings["seed"]) + (1 + k if vary_seed else 0)
        spec = build(blob, model, model_options, seed, init)
        keep = torch.from_numpy(np.flatnonzero(masks[row]))
        history = fit(spec, inputs["train"], device=stage.device, indices=keep, **{**settings, "seed": seed})
        module = spec.module.eval()
        per, correct = [], []
        with torch.no_grad():
            for a in range(0, m, 1024):
                batch = {key: v[a:a + 1024] for key, v in test.items()}
                per.append(spec.loss_fn(module, batch).double().cpu())
                if spec.logits_fn is not None and "labels" in batch:
                    correct.append((spec.logits_fn(module, batch).argmax(-1) == batch["labels"]).cpu())
        losses[row] = torch.cat(per).numpy()
        if correct:
            acc[row] = float(torch.cat(correct).float().mean())
        if stage.device.type == "cuda":
            torch.cuda.synchronize(stage.device)
        seconds[row] = time.perf_counter() - t0
        final_train_loss[row] = history[-1]
        log.info("subset model %d: %.2fs, train loss %.4f, test loss %.4f, test accuracy %.4f", k, seconds[row],
                 history[-1], losses[row].mean(), acc[row])
        shown.update()
    shown.close()
    meta = {"kind": "lds subset models", "experiment": experiment, "n_models": int(n_models), "part": int(part),
            "parts": int(parts), "models": models, "fraction": float(fraction), "subset_seed": int(subset_seed),
            "vary_seed": bool(vary_seed), "n_train": int(n), "n_test": int(m), "model": model,
            "model_options": dict(model_options or {}), "train": settings, "provenance": stage.provenance()}
    _save_npz(out, meta, model_ids=np.asarray(models, dtype=np.int64), masks=masks, test_loss=losses,
              test_accuracy=acc, seconds=seconds, final_train_loss=final_train_loss)
    return meta


def load_parts(paths) -> dict:
    """Subset models of all parts, ordered by model index: masks (M, n), test_loss (M, m), meta."""
    import numpy as np

    metas, arrs = [], []
    for p in paths:
        meta, a = load_npz(p)
        metas.append(meta)
        arrs.append(a)
    if not metas:
        raise ValueError("no lds subset parts given")
    ref = {k: metas[0][k] for k in ("n_models", "parts", "fraction", "subset_seed", "n_train", "n_test", "vary_seed")}
    for p, meta in zip(paths, metas):
        other = {k: meta[k] for k in ref}
        if other != ref:
            raise ValueError(f"{p}: subset settings {other} differ from {paths[0]}'s {ref}")
    ids = np.concatenate([a["model_ids"] for a in arrs])
    order = np.argsort(ids)
    if len(set(ids.tolist())) != len(ids) or len(ids) != ref["n_models"]:
        raise ValueError(f"the parts hold models {sorted(ids.tolist())}, expected 0..{ref['n_models'] - 1} once each")
    cat = {k: np.concatenate([a[k] for a in arrs])[order] for k in arrs[0]}
    return {**cat, "meta": ref, "metas": metas}


# ----------------------------------------------------------------------------------------------
# Stage: LDS of one (method, r), every seed
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ScoreMethodOptions(MethodOptions):
    parts: tuple[Path, ...] = option("every subset part (.npz)")
    out: Path = option("metrics.csv to write")
    per_test_out: Path = option("per_test.npz to write", flag="--per-test")
    options: dict | None = option("JSON options for dropinf.influence", default=None)
    device: str = option("torch device, or 'auto'", default="auto")
    threads: int | None = option("torch CPU threads", default=None)
    experiment: str = option("experiment name recorded in the rows", default="")
    model: Path | None = option("fine-tuned model.pt: full-space methods recompute raw gradients from it when they "
                                "were not stored", default=None)
    recompute_batch_size: int = option("rows per recomputed chunk", default=64)


@command("lds score", ScoreMethodOptions, help="LDS of one method at one r, every seed")
def score_method(*, data, parts, out, per_test_out, method: str, r: int | None = None, grads: str | None = None,
                 seeds=(0,), damping="paper", options: dict | None = None, device: str = "auto",
                 threads: int | None = None, experiment: str = "", model: str | None = None,
                 recompute_batch_size: int = 64, curvature: str = "layer") -> list[dict]:
    """LDS of one method at one r. A full-space method whose raw gradients were not stored (over the
    identity budget) recomputes them from `model` (`dropinf.recompute`): train chunk by chunk, and the
    whole test split once (per-test-example scores need every test gradient: m x d floats).
    Curvature blocks as in the `score` stage (`curvature`: layer, tensor or global)."""
    import numpy as np
    import torch

    import dropinf
    from ..influence import influence
    from .common import Stage, log
    from .evaluate import write_rows
    from .extract import load_split
    from .metrics import lds_per_test
    from .methods import extraction_of, is_full_space, solver_of
    from .score import block_summary, solve_blocks
    from .storage import MANIFEST, read_manifest
    from ..layout import check_curvature

    check_curvature(curvature, "score.curvature")
    stage = Stage("lds_score", device=device, threads=threads)
    sub = load_parts(parts)
    masks, actual = sub["masks"], sub["test_loss"]
    n, m = sub["meta"]["n_train"], sub["meta"]["n_test"]
    options = dict(options or {})
    key = {"experiment": experiment, "method": method, "r": r}
    meta = {"kind": "lds per test example", "experiment": experiment, "method": method, "r": r, "damping": damping,
            "curvature": curvature, "blocks": {}, "options": options, "subsets": sub["meta"], "sign_convention": dropinf.SIGN_CONVENTION,
            "definition": "LDS_j = Spearman over subsets S of sum_{i in S} tau_j(z_i) against the subset model's "
                          "loss on test example j; tau_j = dropinf.influence(..., reduce=False)"}
    rows, per_test, seeds_done = [], [], []

    def finish(status, reason=None):
        prov = stage.provenance()
        out_rows = [{**prov, **row} for row in rows]
        write_rows(out, out_rows)
        _save_npz(per_test_out, {**meta, "status": status, "reason": reason, "seeds": seeds_done,
                                 "provenance": prov},
                  lds=np.asarray(per_test, dtype=np.float64).reshape(len(per_test), m))
        return out_rows

    recomputed = None
    if extraction_of(method) is None:
        jobs = [(int(s), None) for s in seeds]
    else:
        gm = read_manifest(grads)
        grads_dir = Path(grads).parent if Path(grads).name == MANIFEST else Path(grads)
        if gm.get("status") != "complete" and is_full_space(method) and model is not None:
            from .score import recomputed_gradients

            log.info("%s: raw gradients were not stored (%s); recomputing them from %s", method,
                     gm.get("reason", "unknown reason"), model)
            recomputed = recomputed_gradients(data, model, stage.device, recompute_batch_size, curvature)
            gm = {**gm, "status": "complete"}
            meta["gradients"] = f"raw gradients recomputed from {model} (not stored: {gm.get('reason')})"
        if gm.get("status") != "complete":
            reason = f"{gm.get('compressor')} extraction was skipped: {gm.get('reason', 'unknown reason')}"
            log.warning("SKIPPED lds of %s: %s", method, reason)
            return finish("skipped", reason)
        jobs = [(None, None)] if is_full_space(method) else [(int(s), None) for s in seeds]
    for seed, _ in jobs:
        t0 = time.perf_counter()
        if extraction_of(method) is None:
            scores = np.random.default_rng(int(seed)).standard_normal((n, m))
        else:
            if recomputed is not None:
                train, lazy_test, blocks = recomputed
                test = lazy_test[0:lazy_test.n].to(train.dtype)
            else:
                train = load_split(grads_dir, gm, seed, "train")
                test = torch.from_numpy(np.asarray(load_split(grads_dir, gm, seed, "test")[...]))
                blocks = solve_blocks(method, gm, train, curvature)
            meta["blocks"][str(seed)] = block_summary(curvature, blocks)
            if train.shape[0] != n or test.shape[0] != m:
                raise ValueError(f"gradients ({train.shape[0]} train, {test.shape[0]} test rows) do not match the "
                                 f"subset models' data ({n} train, {m} test)")
            chunk = {"chunk_rows": int(recompute_batch_size)} if recomputed is not None else {}
            scores = influence(train, test, solver_of(method), damping=damping, blocks=blocks, reduce=False,
                               device=stage.device, **chunk, **options).numpy()
        lds = lds_per_test(masks, scores, actual)
        secs = time.perf_counter() - t0
        ok = np.isfinite(lds)
        mean = float(lds[ok].mean()) if ok.any() else float("nan")
        std = float(lds[ok].std(ddof=1)) if ok.sum() > 1 else float("nan")
        for metric, value in zip(LDS_METRICS, (mean, std, int(ok.sum()), secs)):
            rows.append({**key, "seed": seed, "metric": metric, "value": value})
        per_test.append(lds)
        seeds_done.append(seed)
        log.info("%s r=%s seed=%s: LDS %.4f (std over %d test examples %.4f) in %.2fs", method, r, seed, mean,
                 int(ok.sum()), std, secs)
    return finish("complete")


# ----------------------------------------------------------------------------------------------
# Stage: summary table
# ----------------------------------------------------------------------------------------------

def _fmt(values) -> str:
    import numpy as np

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return "–"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


@dataclass(frozen=True, kw_only=True)
class SummarizeOptions:
    inputs: tuple[Path, ...] = option("the methods' metrics.csv files")
    parts: tuple[Path, ...] = option("every subset part (.npz)")
    out: Path = option("summary.csv to write")
    table: Path = option("lds_table.md to write")
    experiment: str = option("experiment name of the subset rows", default="")


@command("lds summarize", SummarizeOptions, help="summary.csv and lds_table.md")
def summarize(*, inputs, parts, out, table, experiment: str = "") -> list[dict]:
    """summary.csv: every (method, r, seed) row of `inputs` plus the subset models' rows; lds_table.md."""
    import csv

    import numpy as np

    from .common import atomic_path
    from .evaluate import write_rows

    sub = load_parts(parts)
    sm = sub["meta"]
    rows, skipped = [], {}
    for path in inputs:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
        npz = Path(path).with_name("per_test.npz")
        if npz.exists():
            meta, _ = load_npz(npz)
            if meta.get("status") == "skipped":
                skipped[meta["method"]] = meta.get("reason", "")
    prov = {k: sub["metas"][0]["provenance"].get(k) for k in
            ("git_commit", "git_dirty", "config_sha256", "dropinf_version", "torch_version", "device")}
    part_seconds = sum(meta["provenance"]["stage_seconds"] for meta in sub["metas"])
    acc = sub["test_accuracy"]
    sub_rows = [("subset_models", len(sub["model_ids"])), ("subset_fraction", sm["fraction"]),
                ("subset_test_loss_mean", float(sub["test_loss"].mean())),
                ("subset_test_accuracy_mean", float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")),
                ("subset_train_seconds_mean", float(sub["seconds"].mean()))]
    rows += [{"experiment": experiment, "method": "subsets", "r": None, "seed": None, "metric": k, "value": v,
              **prov, "stage_seconds": part_seconds, "started_at": sub["metas"][0]["provenance"].get("started_at")}
             for k, v in sub_rows]
    write_rows(out, rows)

    lines = ["| method | r | LDS (mean over test examples; mean ± std over seeds) | std of LDS_j over test examples "
             "(mean over seeds) | test examples with a defined LDS_j | seeds |", "|---|---|---|---|---|---|"]
    by = {}
    for row in rows:
        if row["metric"] in LDS_METRICS:
            by.setdefault((row["method"], row["r"] or ""), {}).setdefault(row["metric"], []).append(float(row["value"]))
    for (method, r), metrics in by.items():
        std_test = np.nanmean(metrics["lds_std_over_test"]) if metrics.get("lds_std_over_test") else float("nan")
        lines.append(f"| {method} | {r} | {_fmt(metrics['lds'])} | {std_test:.3f} | "
                     f"{int(min(metrics['lds_n_test']))}–{int(max(metrics['lds_n_test']))} of {sm['n_test']} | "
                     f"{len(metrics['lds'])} |")
    for method, why in skipped.items():
        lines.append(f"| {method} | | skipped | | | 0 |")
    text = [f"Linear datamodeling score on {len(sub['model_ids'])} models retrained on random "
            f"{sm['fraction']:.0%} subsets ({int(round(sm['fraction'] * sm['n_train']))} of {sm['n_train']} training "
            f"examples, subset seed {sm['subset_seed']}, "
            + ("a different initialisation/order seed per model" if sm["vary_seed"] else
               "the fine-tuning recipe's initialisation and minibatch-order seed for every model")
            + f"), {sm['n_test']} test examples. LDS_j = Spearman correlation over the subsets between "
            "sum_{i in S} tau_j(z_i) (tau_j = per-test-example influence, positive = raises the loss of test example "
            "j) and the subset model's loss on test example j; higher is better, random scores give ~0. The seeds are "
            "the compressor seeds (random-score seeds for `random`).", "", *lines, ""]
    for method, why in skipped.items():
        text.append(f"- **{method}** skipped by the workflow: {why}")
    text.append(f"Subset models: mean test loss {sub_rows[2][1]:.4f}, mean test accuracy {sub_rows[3][1]:.4f}, "
                f"{sub_rows[4][1]:.2f} s per model (wall, one job's view; {len(sub['metas'])} jobs, "
                f"{part_seconds:.1f} s of job wall time in all).")
    text.append(f"Provenance: git {prov['git_commit']} (dirty: {prov['git_dirty']}), config sha256 "
                f"{prov['config_sha256']}, dropinf {prov['dropinf_version']}, torch {prov['torch_version']}, "
                f"device {prov['device']}; every row of `summary.csv` carries its own.")
    with atomic_path(table) as tmp:
        Path(tmp).write_text("\n".join(text) + "\n")
    from .report import lds_plot  # LDS against r per method, beside the summary

    lds_plot(out, Path(out).with_name(LDS_PLOT), experiment)
    return rows
