"""Pairwise and self-influence outputs of the score stage: equal to the API on the stored arrays and
to a float64 direct inverse, complete or absent, tiled, verified, evaluated and reported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dropinf.errors import DropinfError, IntegrityError
from dropinf.influence import influence, self_influence
from dropinf.pipeline import score as score_mod
from dropinf.pipeline import storage
from dropinf.pipeline.evaluate import evaluate
from dropinf.pipeline.prepare import load_prepared, prepare_data
from dropinf.pipeline.verify import verify

REPO = Path(__file__).resolve().parents[2]
N, M, K = 40, 10, 6


@pytest.fixture()
def stored(tmp_path):
    """Prepared digits (25% flipped labels) and a raw-gradient-like extraction of fresh random rows."""
    data = tmp_path / "data.pt"
    prepare_data(out=data, dataset="digits", dataset_options={"max_train": N, "max_test": M}, label_noise=0.25,
                 noise_seed=0, threads=1)
    rng = np.random.default_rng(7)
    g = tmp_path / "grads"
    arrays = {"train": rng.standard_normal((N, K)), "test": rng.standard_normal((M, K))}
    for split, rows in arrays.items():
        storage.save_array(g / f"{split}.zarr", rows.astype(np.float32), {}, chunk_rows=8)
    storage.write_manifest(g, {"status": "complete", "compressor": "identity", "out_dim": K, "dim": K,
                               "arrays": {"None": {"train": "train.zarr", "test": "test.zarr"}},
                               "layout": [{"name": "0.weight", "shape": [4], "offset": 0},
                                          {"name": "1.weight", "shape": [2], "offset": 4}]})
    # the float32 values the stage reads, in float64
    return data, g / "manifest.json", {s: a.astype(np.float32).astype(np.float64) for s, a in arrays.items()}


def run(stored, out, method="orig", **kw):
    data, grads, _ = stored
    return score_mod.score(data=data, out_dir=out, method=method, r=None, grads=grads, device="cpu", threads=1, **kw)


def direct(train, blocks):
    """(H + Lambda)^{-1} with 'paper' damping per block, by a plain float64 inverse."""
    n, k = train.shape
    A = np.zeros((k, k))
    for lo, hi in blocks:
        g = train[:, lo:hi]
        lam = 0.1 * (g ** 2).sum(1).mean() / (hi - lo)
        A[lo:hi, lo:hi] = g.T @ g / n + lam * np.eye(hi - lo)
    return np.linalg.inv(A)


@pytest.mark.parametrize("method", ["orig", "lissa", "datainf", "tracin"])
def test_stage_pairwise_and_self_equal_the_api(stored, tmp_path, monkeypatch, method):
    monkeypatch.setattr(score_mod, "PAIRWISE_TILE", 4)  # many tiles: every block boundary is exercised
    out = tmp_path / "scores"
    man = run(stored, out, method, pairwise=True, self_influence=True)
    assert man["pairwise"] == {"None": "scores.pairwise.zarr"} and man["self"] == {"None": "scores.self.zarr"}
    P = storage.open_array(out / "scores.pairwise.zarr")
    S = storage.open_array(out / "scores.self.zarr")
    assert P.shape == (M, N) and P.chunks == (4, 4) and S.shape == (N,)
    assert P.attrs["complete"] and "P[j, k]" in P.attrs["sign_convention"] and "S[k]" in S.attrs["sign_convention"]
    written = json.loads((out / "manifest.json").read_text())["integrity"]
    assert written["scores.pairwise.zarr"]["chunks"] == 3 * 10 and "scores.self.zarr" in written
    _, _, arrays = stored
    G, T = (torch.from_numpy(arrays[s]) for s in ("train", "test"))
    blocks = [(0, 4), (4, 6)]  # the layout's two layers
    ref = influence(G, T, method, blocks=blocks, reduce=False).T.numpy()
    np.testing.assert_allclose(P[...], ref, rtol=2e-5, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(P[...].mean(0), storage.open_array(out / "scores.zarr")[...], rtol=1e-4,
                               atol=1e-6 * np.abs(ref).max())
    own = self_influence(G, method, blocks=blocks).numpy()
    np.testing.assert_allclose(S[...], own, rtol=2e-5)
    if method == "orig":
        Hinv = direct(arrays["train"], blocks)
        np.testing.assert_allclose(P[...], -arrays["test"] @ Hinv @ arrays["train"].T, rtol=2e-5,
                                   atol=1e-6 * np.abs(ref).max())
        np.testing.assert_allclose(S[...], np.einsum("ik,kl,il->i", arrays["train"], Hinv, arrays["train"]), rtol=2e-5)
        assert (S[...] > 0).all()


def test_off_by_default_and_random_has_none(stored, tmp_path):
    man = run(stored, tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["manifest.json", "scores.zarr"]
    assert man["pairwise"] == {} and man["self"] == {}
    data, _, _ = stored
    rnd = score_mod.score(data=data, out_dir=tmp_path / "random", method="random", r=None, grads=None, seeds=(0,), device="cpu", threads=1,
                          pairwise=True, self_influence=True)
    assert "no gradients" in rnd["not_applicable"] and rnd["pairwise"] == {}
    assert sorted(p.name for p in (tmp_path / "random").iterdir()) == ["manifest.json", "seed0.zarr"]


def test_recomputed_raw_gradients_are_refused_naming_the_key(stored, tmp_path):
    data, grads, _ = stored
    with pytest.raises(DropinfError, match=r"score\.self: orig runs on raw gradients recomputed.*score\.self: false"):
        score_mod.score(data=data, out_dir=tmp_path / "s", method="orig", r=None, grads=None, device="cpu", threads=1, gradients="recompute",
                        model=tmp_path / "model.pt", self_influence=True)
    assert not (tmp_path / "s").exists()


def test_interrupted_pairwise_write_leaves_no_array_and_keeps_the_previous_outputs(stored, tmp_path, monkeypatch):
    out = tmp_path / "scores"
    run(stored, out, pairwise=True)
    before = storage.open_array(out / "scores.pairwise.zarr")[...]
    manifest = (out / "manifest.json").read_text()
    inf = sys.modules["dropinf.influence"]  # the module (the package binds the name to the function)
    real = inf.pairwise_blocks

    def killed(*a, **kw):  # the job dies after its first block
        blocks = real(*a, **kw)
        yield next(blocks)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(inf, "pairwise_blocks", killed)
    monkeypatch.setattr(score_mod, "PAIRWISE_TILE", 4)
    with pytest.raises(KeyboardInterrupt):
        run(stored, out, pairwise=True, self_influence=True)
    # nothing of the new run is there, not even its temporary array; the old outputs are untouched
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "scores.pairwise.zarr", "scores.zarr"]
    assert (out / "manifest.json").read_text() == manifest
    assert np.array_equal(storage.open_array(out / "scores.pairwise.zarr")[...], before)
    # a first run killed the same way leaves no array at all
    with pytest.raises(KeyboardInterrupt):
        run(stored, tmp_path / "fresh", pairwise=True)
    assert not (tmp_path / "fresh").exists() or list((tmp_path / "fresh").iterdir()) == []


def test_a_corrupt_tile_is_named_by_verify_and_by_the_reader(stored, tmp_path, monkeypatch):
    monkeypatch.setattr(score_mod, "PAIRWISE_TILE", 4)
    out = tmp_path / "res" / "scores" / "orig" / "full"
    run(stored, out, pairwise=True)
    problems, counts = verify(tmp_path / "res")
    assert problems == [] and counts["arrays"] == 2
    tile = out / "scores.pairwise.zarr" / "c" / "1" / "7"
    data = bytearray(tile.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tile.write_bytes(bytes(data))
    problems, _ = verify(tmp_path / "res")
    assert len(problems) == 1, problems
    assert "scores.pairwise.zarr: chunk c/1/7 (rows 4-7) is corrupt" in problems[0]
    assert f"snakemake --forcerun {out / 'manifest.json'}" in problems[0]
    arr = storage.open_array(out / "scores.pairwise.zarr")
    assert np.isfinite(arr[0:4]).all() and np.isfinite(arr[:, 0:28]).all()  # other tiles still read
    with pytest.raises(IntegrityError, match=r"chunk c/1/7 \(rows 4-7\) is corrupt"):
        arr[4:8]
    (out / "scores.pairwise.zarr" / "c" / "2" / "0").unlink()
    with pytest.raises(IntegrityError, match=r"chunk\(s\) missing on disk: c/2/0"):
        storage.open_array(out / "scores.pairwise.zarr")
    cli = subprocess.run([sys.executable, "-m", "dropinf", "verify", str(tmp_path / "res")], capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 2 and "c/2/0" in cli.stdout


def test_evaluate_reports_the_self_influence_auc_and_the_report_shows_it(stored, tmp_path):
    from sklearn.metrics import roc_auc_score

    from dropinf.pipeline.report import report, summarize

    data, _, _ = stored
    out = tmp_path / "res" / "scores" / "orig" / "full"
    run(stored, out, self_influence=True)
    rows = evaluate(data=data, model=None, scores=out / "manifest.json", out=tmp_path / "res" / "eval.csv", method="orig", retrain=False,
                    device="cpu", threads=1)
    got = {r["metric"]: r["value"] for r in rows if r["metric"].startswith("mislabel")}
    flipped = load_prepared(data)["train"]["flipped"].numpy()
    own = storage.open_array(out / "scores.self.zarr")[...]
    assert got["mislabel_auc_self"] == pytest.approx(roc_auc_score(flipped, own))
    assert got["mislabel_auc"] == pytest.approx(roc_auc_score(flipped, storage.open_array(out / "scores.zarr")[...]))
    plain = tmp_path / "res" / "scores" / "tracin" / "full"
    run(stored, plain, "tracin")
    evaluate(data=data, model=None, scores=plain / "manifest.json", out=tmp_path / "res" / "eval2.csv", method="tracin", retrain=False,
             device="cpu", threads=1)
    summary = tmp_path / "res" / "summary.csv"
    summarize(inputs=[tmp_path / "res" / "eval.csv", tmp_path / "res" / "eval2.csv"], out=summary)
    report(summary=summary, out_dir=tmp_path / "res" / "report", experiment="toy")
    table = pd.read_csv(tmp_path / "res" / "report" / "auc_table.csv")
    assert list(table.columns) == ["method", "r", "mean", "std", "count", "auc_self_mean", "auc_self_std",
                                   "auc_self_count"]
    row = table.set_index("method")
    assert row.loc["orig", "auc_self_mean"] == pytest.approx(got["mislabel_auc_self"])
    assert np.isnan(row.loc["tracin", "auc_self_mean"])
    html = (tmp_path / "res" / "report" / "tables.html").read_text()
    assert "AUC (self-influence)" in html and f"{got['mislabel_auc_self']:.3f}" in html


def test_verify_names_the_tile_holding_nan(tmp_path):
    v = np.ones((6, 10), np.float32)
    v[5, 7] = np.nan
    with storage.write_array(tmp_path / "p.zarr", 6, 10, {}, chunk_rows=4, chunk_cols=3) as arr:
        arr[...] = v
    problems, counts = verify(tmp_path)
    assert counts["chunks"] == 2 * 4  # every tile decoded
    assert any("p.zarr: chunk c/1/2 holds NaN/inf at rows [5]" in p for p in problems), problems


def test_a_killed_jobs_temporary_array_is_no_array_and_the_next_run_removes_it(stored, tmp_path):
    import shutil

    out = tmp_path / "res" / "scores"
    run(stored, out, pairwise=True)
    # what SIGKILL during a pairwise write leaves: a temporary directory beside the outputs
    left = out / ".scores.pairwise.zarr.tmp-99999"
    shutil.copytree(out / "scores.pairwise.zarr", left)
    problems, counts = verify(tmp_path / "res")
    assert problems == [] and counts["arrays"] == 2  # not an array of the results
    assert storage.arrays_under(out) == [out / "scores.pairwise.zarr", out / "scores.zarr"]
    run(stored, out, pairwise=True)
    assert not left.exists()
