"""The linear datamodeling score (`python -m dropinf lds`, workflow/rules/lds.smk), on the CPU.

* The vectorised computation (average ranks, per-column Spearman, masks @ scores) against a
  brute-force reference written independently (loops, pairwise rank counting).
* A toy linear regression where the influence is exact up to scale (homoscedastic noise: the
  empirical Fisher is proportional to the Hessian): LDS must be ~1 with our sign convention, ~-1
  with the sign flipped, ~0 for random scores.
* The stage end to end through Snakemake on a tiny config (digits, a small MLP, 12 subset models in
  2 parts), and that the `lds` target stays outside `all`.
"""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import dropinf
from dropinf.pipeline.lds import load_npz, load_parts, part_models, subset_indices, subset_masks
from dropinf.pipeline.metrics import average_ranks, lds_per_test, spearman_columns


def _brute_ranks(values):
    """Average 1-based ranks by counting: rank = #smaller + (#equal + 1) / 2."""
    return [sum(1 for w in values if w < v) + (sum(1 for w in values if w == v) + 1) / 2 for v in values]


def _brute_spearman(a, b):
    ra, rb = _brute_ranks(list(a)), _brute_ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return float("nan") if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


def _brute_lds(masks, scores, actual):
    out = []
    for j in range(scores.shape[1]):
        predicted = [sum(scores[i, j] for i in range(masks.shape[1]) if masks[k, i]) for k in range(masks.shape[0])]
        out.append(_brute_spearman(predicted, [actual[k, j] for k in range(masks.shape[0])]))
    return np.array(out)


def test_ranks_and_spearman_match_brute_force():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(15, 6)).astype(float)  # many ties
    b = rng.standard_normal((15, 6))
    b[:, 2] = 3.0  # a constant column: no correlation defined
    for j in range(a.shape[1]):
        assert np.allclose(average_ranks(a)[:, j], _brute_ranks(list(a[:, j])))
    rho = spearman_columns(a, b)
    ref = np.array([_brute_spearman(a[:, j], b[:, j]) for j in range(a.shape[1])])
    assert np.isnan(rho[2]) and np.isnan(ref[2])
    assert np.allclose(rho, ref, equal_nan=True)
    scipy_stats = pytest.importorskip("scipy.stats")
    for j in (0, 1, 3, 4, 5):
        assert rho[j] == pytest.approx(scipy_stats.spearmanr(a[:, j], b[:, j]).statistic)


def test_lds_matches_brute_force():
    rng = np.random.default_rng(2)
    n, m, M = 40, 7, 12
    masks = subset_masks(n, range(M), 0.5, seed=3)
    scores = rng.standard_normal((n, m))
    actual = rng.standard_normal((M, m))
    assert np.allclose(lds_per_test(masks, scores, actual), _brute_lds(masks, scores, actual))


def test_subsets_are_seeded_and_independent_of_the_split_into_parts():
    n = 101
    masks = subset_masks(n, range(9), 0.5, seed=7)
    assert (masks.sum(1) == round(0.5 * n)).all()
    assert np.array_equal(subset_masks(n, [4, 5], 0.5, seed=7), masks[4:6])
    assert np.array_equal(np.flatnonzero(masks[3]), subset_indices(n, 3, 0.5, 7))
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(subset_masks(n, [0], 0.5, seed=8)[0], masks[0])
    # parts tile the models exactly once
    assert sum((part_models(50, p, 5) for p in range(5)), []) == list(range(50))
    assert sum((part_models(7, p, 3) for p in range(3)), []) == list(range(7))


def _toy(seed=0, n=400, d=5, m=30, M=60):
    """Least squares on random 50% subsets; test loss 0.5 (x_j^T theta_S - y_j)^2."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    beta = rng.standard_normal(d)
    y = X @ beta + 0.5 * rng.standard_normal(n)
    Xt = 1.5 * rng.standard_normal((m, d))
    yt = Xt @ beta + 0.5 * rng.standard_normal(m) + 1.0  # shifted: the test residuals are not small

    def fit(idx):
        return np.linalg.lstsq(X[idx], y[idx], rcond=None)[0]

    theta = fit(np.arange(n))
    G = (X @ theta - y)[:, None] * X       # per-example training-loss gradients at the full fit
    T = (Xt @ theta - yt)[:, None] * Xt    # per-test-example loss gradients
    masks = subset_masks(n, range(M), 0.5, seed=seed)
    actual = np.stack([0.5 * (Xt @ fit(np.flatnonzero(mk)) - yt) ** 2 for mk in masks])
    return G, T, masks, actual


def test_toy_linear_model_exact_influence_has_lds_near_one():
    G, T, masks, actual = _toy()
    # homoscedastic noise: the empirical Fisher G^T G / n is ~ sigma^2 X^T X / n, the Hessian up to
    # scale, so the exact-solver influence is the exact influence up to a positive factor
    tau = dropinf.influence(torch.from_numpy(G), torch.from_numpy(T), "exact", damping=1e-8, reduce=False).numpy()
    assert tau.shape == (G.shape[0], T.shape[0])
    lds = lds_per_test(masks, tau, actual)
    assert np.isfinite(lds).all()
    assert lds.mean() > 0.95 and lds.min() > 0.85, lds
    # the sign convention: positive = up-weighting raises the test loss; the opposite sign anti-correlates
    assert lds_per_test(masks, -tau, actual).mean() < -0.95
    # reduce=True is the mean over test examples of reduce=False
    red = dropinf.influence(torch.from_numpy(G), torch.from_numpy(T), "exact", damping=1e-8).numpy()
    assert np.allclose(red, tau.mean(1), rtol=1e-6, atol=1e-9)
    # random scores carry no information; a compressed (dropout-like) subset of the coordinates keeps some
    rand = lds_per_test(masks, np.random.default_rng(5).standard_normal(tau.shape), actual)
    assert abs(rand.mean()) < 0.1
    keep = [0, 2, 4]
    tau_c = dropinf.influence(torch.from_numpy(G[:, keep]), torch.from_numpy(T[:, keep]), "exact", damping=1e-8,
                              reduce=False).numpy()
    assert rand.mean() < lds_per_test(masks, tau_c, actual).mean() < lds.mean()


TINY = {
    "experiment": "lds-tiny",
    "dataset": {"name": "digits", "options": {"test_fraction": 0.2, "seed": 0, "max_train": 300, "max_test": 20}},
    "label_noise": 0.0,
    "model": {"name": "mlp", "options": {"hidden": [16], "activation": "tanh"}},
    "finetune": {"epochs": 10, "batch_size": 64, "lr": 0.01, "optimizer": "adam", "seed": 0},
    "methods": ["random", "tracin", "dropout"],
    "r": [16],
    "seeds": [0, 1],
    "device": "cpu",
    "threads": 1,
    "lds": {"n_models": 12, "fraction": 0.5, "seed": 0, "parts": 2},
}


def test_lds_target_is_not_part_of_all(wf, tmp_path):
    cfg = wf.write_config(tmp_path / "cfg.yaml", TINY)
    out = wf.snakemake(tmp_path, "-n", config=cfg).stdout
    assert "lds_train" not in out and "lds_score" not in out
    out = wf.snakemake(tmp_path, "-n", "lds", config=cfg).stdout
    for rule, count in (("lds_train", 2), ("lds_score", 3), ("lds_summarize", 1), ("finetune", 1)):
        assert f"rule {rule}:" in out and out.count(f"rule {rule}:") == count, (rule, out[-3000:])
    assert "rule evaluate:" not in out and "rule score:" not in out  # LDS scores its own way (reduce=False)


@pytest.mark.slow
def test_lds_stage_end_to_end(wf, tmp_path):
    cfg = wf.write_config(tmp_path / "cfg.yaml", TINY)
    wf.snakemake(tmp_path, "lds", config=cfg)
    lds_dir = tmp_path / "results" / "lds-tiny" / "lds"
    parts = sorted((lds_dir / "subsets").glob("part*of2.npz"))
    assert len(parts) == 2
    sub = load_parts(parts)
    assert sub["masks"].shape == (12, 300) and sub["test_loss"].shape == (12, 20)
    assert (sub["masks"].sum(1) == 150).all() and np.array_equal(sub["model_ids"], np.arange(12))
    assert np.array_equal(sub["masks"], subset_masks(300, range(12), 0.5, 0))
    assert np.isfinite(sub["test_loss"]).all() and (sub["seconds"] > 0).all()
    # the subset models differ (their data differ), so the actual losses vary over the subsets
    assert (sub["test_loss"].std(0) > 0).all()

    with open(lds_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lds = {}
    for row in rows:
        if row["metric"] == "lds":
            lds.setdefault(row["method"], []).append(float(row["value"]))
        assert row["git_commit"] and row["dropinf_version"], row
    assert sorted(lds) == ["dropout", "random", "tracin"]
    assert len(lds["random"]) == 2 and len(lds["dropout"]) == 2 and len(lds["tracin"]) == 1
    assert all(-1 <= v <= 1 for vs in lds.values() for v in vs)
    # influence on the full-space gradients predicts the subset models far better than chance
    assert lds["tracin"][0] > 0.3 and lds["tracin"][0] > max(lds["random"]) + 0.2, lds
    assert any(r["method"] == "subsets" and r["metric"] == "subset_models" and float(r["value"]) == 12 for r in rows)

    meta, arrays = load_npz(lds_dir / "dropout" / "r16" / "per_test.npz")
    assert meta["status"] == "complete" and meta["seeds"] == [0, 1] and arrays["lds"].shape == (2, 20)
    with open(lds_dir / "dropout" / "r16" / "metrics.csv", newline="") as f:
        drop = [float(r["value"]) for r in csv.DictReader(f) if r["metric"] == "lds"]
    assert np.allclose(drop, np.nanmean(arrays["lds"], axis=1))
    table = (lds_dir / "lds_table.md").read_text()
    assert "| dropout | 16 |" in table and "Spearman" in table and "12 models" in table
    assert (tmp_path / "logs" / "lds-tiny" / "lds" / "train-part0of2.log").is_file()

    # over the identity budget, tracin's LDS comes from raw gradients recomputed from the model
    from dropinf.pipeline import extract as extract_mod
    from dropinf.pipeline.lds import score_method

    res = tmp_path / "results" / "lds-tiny"
    skipped = tmp_path / "identity-skipped"
    extract_mod.extract(job=extract_mod.ExtractJob(data=res / "data" / "dataset.pt", model=res / "model" / "model.pt",
                                                   out_dir=skipped, compressor="identity", budget_mb=0.01,
                                                   device="cpu", threads=1))
    got = score_method(data=res / "data" / "dataset.pt", parts=parts, out=tmp_path / "m.csv",
                       per_test_out=tmp_path / "p.npz", method="tracin", grads=skipped / "manifest.json",
                       model=res / "model" / "model.pt", device="cpu", recompute_batch_size=64)
    lds_got = [float(r["value"]) for r in got if r["metric"] == "lds"]
    assert lds_got == pytest.approx(lds["tracin"], abs=0.02)
    _, stored = load_npz(lds_dir / "tracin" / "full" / "per_test.npz")
    meta_r, recomputed = load_npz(tmp_path / "p.npz")
    assert meta_r["gradients"].startswith("raw gradients recomputed from")
    np.testing.assert_allclose(recomputed["lds"], stored["lds"], atol=0.05)
