"""score.pairwise and score.self through the workflow on a tiny embedded default: the stored arrays
equal `dropinf.influence(reduce=False)` / `dropinf.self_influence` on the stored gradients and a
float64 direct inverse, summary.csv and the report carry the self-influence AUC, `verify` passes and
then names a damaged tile."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import torch

EXP = "digits-pairwise"


def tiny_config(wf) -> dict:
    cfg = wf.default_config()
    cfg["experiment"] = EXP
    cfg["dataset"]["options"].update(max_train=150, max_test=40)
    cfg["finetune"]["epochs"] = 3
    cfg["methods"] = ["orig", "lissa", "dropout", "random"]
    cfg["r"] = [64]
    cfg["seeds"] = [0]
    cfg["evaluate"] = {"retrain": False}
    cfg["score"].update(pairwise=True, self=True)
    return cfg


def test_pairwise_and_self_outputs_of_a_run(wf, tmp_path):
    import dropinf
    from dropinf.layout import Layout
    from dropinf.pipeline.storage import open_array

    path = wf.write_config(tmp_path / "pairwise.yaml", tiny_config(wf))
    wf.snakemake(tmp_path, config=path, cores=1, timeout=900)
    res = tmp_path / "results" / EXP
    grads = res / "grads"

    def stored(compressor, rtag, seed):
        m = json.loads((grads / compressor / rtag / "manifest.json").read_text())
        return m, {s: open_array(grads / compressor / rtag / m["arrays"][seed][s]) for s in ("train", "test")}

    ident, raw = stored("identity", "full", "None")
    layer = Layout.from_json(ident["layout"]).coordinate_blocks("layer")
    for method, rtag, seed, (gm, arrays) in (("orig", "full", "None", (ident, raw)), ("lissa", "full", "None", (ident, raw)),
                                            ("dropout", "r64", "0", stored("dropout", "r64", "0"))):
        sdir = res / "scores" / method / rtag
        man = json.loads((sdir / "manifest.json").read_text())
        P, S = open_array(sdir / man["pairwise"][seed]), open_array(sdir / man["self"][seed])
        assert P.shape == (40, 150) and S.shape == (150,)
        train, test = arrays["train"], torch.from_numpy(arrays["test"][...])
        blocks = layer if method != "dropout" else "layer"  # dropout: blocks from the array's attributes
        solver = "exact" if method == "dropout" else method
        ref = dropinf.influence(train, test, solver, blocks=blocks, reduce=False).T.numpy()
        scale = np.abs(ref).max()
        assert np.abs(P[...] - ref).max() <= 1e-5 * scale, method
        assert np.abs(P[...].mean(0) - open_array(sdir / man["scores"][seed])[...]).max() <= 1e-5 * scale
        own = dropinf.self_influence(train, solver, blocks=blocks).numpy()
        assert np.abs(S[...] - own).max() <= 1e-5 * np.abs(own).max(), method
    # orig (n = 150 below both layer widths: the Woodbury path) against a float64 direct inverse
    G = raw["train"][...].astype(np.float64)
    T = raw["test"][...].astype(np.float64)
    P = open_array(res / "scores" / "orig" / "full" / "scores.pairwise.zarr")[...]
    S = open_array(res / "scores" / "orig" / "full" / "scores.self.zarr")[...]
    Pref, Sref = np.zeros_like(P, dtype=np.float64), np.zeros(G.shape[0])
    for idx in layer.values():
        idx = np.asarray(idx)
        g, t = G[:, idx], T[:, idx]
        A = g.T @ g / len(g) + 0.1 * (g ** 2).sum(1).mean() / len(idx) * np.eye(len(idx))
        Ainv = np.linalg.inv(A)
        Pref -= t @ Ainv @ g.T
        Sref += np.einsum("ik,kl,il->i", g, Ainv, g)
    assert np.abs(P - Pref).max() <= 1e-5 * np.abs(Pref).max()
    assert np.abs(S - Sref).max() <= 1e-5 * Sref.max() and (S > 0).all()
    rnd = json.loads((res / "scores" / "random" / "full" / "manifest.json").read_text())
    assert rnd["pairwise"] == {} and "no gradients" in rnd["not_applicable"]

    summary = pd.read_csv(res / "summary.csv")
    own = summary[summary.metric == "mislabel_auc_self"]
    assert sorted(own.method) == ["dropout", "lissa", "orig"]
    assert own["value"].between(0, 1).all()
    table = pd.read_csv(res / "report" / "auc_table.csv").set_index("method")
    assert "auc_self_mean" in table and np.isnan(table.loc["random", "auc_self_mean"])
    assert table.loc["orig", "auc_self_mean"] == own.set_index("method").loc["orig", "value"]

    env = {**os.environ, "PYTHONPATH": str(wf.repo / "src")}
    ok = subprocess.run([sys.executable, "-m", "dropinf", "verify", str(res)], capture_output=True, text=True, env=env,
                        timeout=300)
    assert ok.returncode == 0, ok.stdout
    tile = res / "scores" / "dropout" / "r64" / "seed0.pairwise.zarr" / "c" / "0" / "0"
    data = bytearray(tile.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tile.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "dropinf", "verify", str(res)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2
    assert "seed0.pairwise.zarr: chunk c/0/0 (rows 0-39) is corrupt" in bad.stdout
    assert "snakemake --forcerun" in bad.stdout and "scores/dropout/r64/manifest.json" in bad.stdout
