"""Stage `evaluate`: metrics of one (method, r) over its seeds, as tidy rows.

* `mislabel_auc`: ROC AUC of the scores against the flipped-label mask (positive = harmful, so
  mislabeled examples should score high; 0.5 = chance).
* `mislabel_auc_self`: the same AUC of the method's self-influence g_k^T (H + lambda I)^{-1} g_k
  (high = mislabeled), when the score stage wrote it (`score.self`).
* `retrain_test_acc@F`: remove the fraction F of training examples with the most negative scores
  (the most helpful), retrain from the same initialisation with the fine-tuning settings, and
  measure test accuracy. Lower = the method found more valuable examples; compare with `random`.
  Models without logits (language models) report `retrain_test_loss@F` (mean test loss; higher =
  more valuable examples removed).
* `extract_seconds`, `score_seconds`: wall time of the gradient pass (both splits) and the solver;
  `compress_seconds`: a compressor served from stored raw gradients, the projection's time.
  A full-space method on recomputed raw gradients has no extract_seconds; its score_seconds
  include the recomputation, also reported alone as `recompute_seconds`.

Rows: experiment, method, r, seed, metric, value + provenance columns (`metrics.COLUMNS`).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidValueError
from ..progress import bar
from .commands import RSIZE, command, option
from .common import Stage, atomic_path, log
from .metrics import COLUMNS, mislabel_auc, most_helpful_first
from .prepare import load_prepared, model_inputs
from .storage import read_manifest, open_array

def write_rows(path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})


def retrain_metric(blob, saved: dict, keep: np.ndarray, device, inputs: dict | None = None) -> tuple[str, float]:
    """Retrain on rows `keep` with the fine-tuning settings, from the same initial weights (the
    pretrained ones when the model was fine-tuned from a pretraining run); ('acc', test accuracy) for
    classifiers, ('loss', mean test loss) for models without logits (language models).

    `inputs`: {"train": ..., "test": ...} model inputs already on `device` (`device_inputs`), so
    that a sweep of retrainings copies the data to the device once."""
    from .train import accuracy, build, fit, mean_loss

    inputs = inputs or device_inputs(blob, device)
    settings = saved["train"]
    spec = build(blob, saved["model"], saved["model_options"], settings.get("seed", 0), saved.get("init"))
    fit(spec, inputs["train"], device=device, indices=torch.from_numpy(np.sort(keep)), **settings)
    test = inputs["test"]
    if spec.logits_fn is None:
        return "loss", mean_loss(spec, test, device)
    return "acc", accuracy(spec, test, device)


def device_inputs(blob, device) -> dict:
    """Model inputs of both splits, moved to `device` once."""
    return {split: {k: v.to(device) for k, v in model_inputs(blob[split]).items()} for split in ("train", "test")}


def removal_count(fraction: float, n: int) -> int:
    """round(fraction * n) examples to remove; an error when that removes none or all of them (the
    retraining result would then say nothing about the scores)."""
    k = int(round(float(fraction) * n))
    if k < 1:
        raise InvalidValueError(f"evaluate.retrain_fractions: {fraction:g} of n = {n} training examples removes "
                                f"none (round({fraction:g} * {n}) = 0); use a fraction of at least {0.5 / n:.3g}")
    if k >= n:
        raise InvalidValueError(f"evaluate.retrain_fractions: {fraction:g} of n = {n} training examples removes all "
                                f"of them; use a smaller fraction")
    return k


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    data: Path = option("prepared data")
    model: Path = option("fine-tuned model.pt")
    scores: Path = option("score manifest.json")
    out: Path = option("metrics.csv to write")
    method: str = option("method name")
    r: int | None = option("compressed size ('full' for full-space methods)", default=None, codec=RSIZE)
    experiment: str = option("experiment name recorded in the rows", default="")
    fractions: tuple[float, ...] = option("fractions of the training set removed before retraining", default=())
    retrain: bool = option("retrain after removing the most helpful examples", default=True)
    device: str = option("torch device, or 'auto'", default="auto")
    threads: int | None = option("torch CPU threads", default=None)


@command("evaluate", EvaluateOptions, help="mislabel AUC and retraining after removing the most helpful examples")
def evaluate(*, data, model, scores, out, method: str, r: int | None = None, experiment: str = "",
             fractions=(), retrain: bool = True, device: str = "auto", threads: int | None = None) -> list[dict]:
    stage = Stage("evaluate", device=device, threads=threads)
    sm = read_manifest(scores)
    scores_dir = Path(scores).parent
    key = {"experiment": experiment, "method": method, "r": r}
    rows: list[dict] = []
    if sm.get("status") != "complete":
        log.warning("SKIPPED evaluation of %s: %s", method, sm.get("reason"))
        write_rows(out, rows)
        return rows
    blob = load_prepared(data)
    flipped = blob["train"].get("flipped")
    flipped = None if flipped is None else flipped.numpy().astype(bool)
    n = next(iter(blob["train"].values())).shape[0]
    removed = {float(f): removal_count(f, n) for f in fractions} if retrain else {}
    from .train import load_saved

    saved = load_saved(model) if (retrain and fractions) else None
    inputs = device_inputs(blob, stage.device) if saved is not None else None
    timing_rows = []
    shown = bar(total=len(sm["scores"]) * len(removed) if saved is not None else 0, unit="model",
                desc=f"retrain without the most helpful examples ({method}{'' if r is None else f' r={r}'})")
    for seed_key, rel in sm["scores"].items():
        seed = None if seed_key == "None" else int(seed_key)
        values = np.asarray(open_array(scores_dir / rel)[...], dtype=np.float64)
        found = []
        if flipped is not None and 0 < flipped.sum() < n:
            auc = mislabel_auc(flipped, values)
            found.append(("mislabel_auc", auc))
            own = (sm.get("self") or {}).get(seed_key)
            if own is not None:
                own = np.asarray(open_array(scores_dir / own)[...], dtype=np.float64)
                found.append(("mislabel_auc_self", mislabel_auc(flipped, own)))
        elif flipped is not None:
            log.info("no mislabel AUC: %d of %d labels flipped", int(flipped.sum()), n)
        if saved is not None:
            order = most_helpful_first(values)
            for f in fractions:
                k = removed[float(f)]
                kind, value = retrain_metric(blob, saved, order[k:], stage.device, inputs)
                found.append((f"retrain_test_{kind}@{f:g}", value))
                shown.update()
        for metric, value in found:
            rows.append({**key, "seed": seed, "metric": metric, "value": value})
        log.info("%s r=%s seed=%s: %s", method, r, seed, ", ".join(f"{m}={v:.4f}" for m, v in found))
        # timings come with the provenance of the stage that spent them
        ext = sm.get("extract_provenance") or {}
        secs = (sm.get("extract_seconds") or {}).get(seed_key)
        if secs is not None and not sm.get("sliced_from"):
            timing_rows.append({**key, "seed": seed, "metric": "extract_seconds", "value": secs, **ext})
        proj = (sm.get("compress_seconds") or {}).get(seed_key)
        if proj is not None:
            timing_rows.append({**key, "seed": seed, "metric": "compress_seconds", "value": proj, **ext})
        if seed_key in sm.get("seconds", {}):
            timing_rows.append({**key, "seed": seed, "metric": "score_seconds", "value": sm["seconds"][seed_key],
                                **(sm.get("provenance") or {})})
        if sm.get("recompute"):
            cost = sm["recompute"]
            timing_rows.append({**key, "seed": seed, "metric": "recompute_seconds",
                                "value": cost["train_seconds"] + cost["test_seconds"], **(sm.get("provenance") or {})})
    shown.close()
    prov = stage.provenance()
    rows = [{**prov, **row} for row in rows] + timing_rows
    for row in rows:
        if isinstance(row.get("value"), float) and not math.isfinite(row["value"]):
            log.warning("non-finite %s for %s seed %s", row["metric"], method, row["seed"])
    write_rows(out, rows)
    return rows
