"""The `attribute` target through real Snakemake on the embedded default (its data, model, training,
r values and settings; two of its methods and seeds): every test example's top-k training examples,
equal to the top of `dropinf.influence(..., reduce=False)` on the stored arrays."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def attributed(wf, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("attribute")
    cfg = wf.default_config()
    cfg.update(methods=["dropout", "gaussian", "orig", "random"], seeds=[0, 1], attribute={"k": 4})
    path = wf.write_config(workdir / "config.yaml", cfg)
    wf.snakemake(workdir, "attribute", config=path)
    return workdir / cfg["results_dir"] / cfg["experiment"], cfg, path, workdir


def test_attribute_writes_every_topk(attributed, wf):
    import dropinf
    from dropinf.pipeline.query import Attribution, top_k
    from dropinf.pipeline.score import solve_blocks

    res, cfg, path, workdir = attributed
    want = [f"{m}/r{r}/seed{s}" for m in ("dropout", "gaussian") for r in cfg["r"] for s in cfg["seeds"]] + \
        ["orig/full/unseeded"]
    for rel in want:
        df = pd.read_csv(res / "attributions" / rel / "topk.csv")
        method, tag, seedtag = rel.split("/")
        att = Attribution(res, method, None if tag == "full" else int(tag[1:]),
                          0 if seedtag == "unseeded" else int(seedtag[4:]))
        m = int(att.test.shape[0])
        assert len(df) == m * 2 * 4 and sorted(df["test_index"].unique()) == list(range(m))
        ref = dropinf.influence(att.train, att.test, "exact", blocks=solve_blocks(att.method, att.manifest, att.train,
                                                                                   "layer"),
                                reduce=False, dtype=torch.float64).numpy()
        for i in (0, m // 2, m - 1):
            for direction, idx in top_k(ref[:, i], 4).items():
                got = df[(df["test_index"] == i) & (df["direction"] == direction)].sort_values("rank")
                assert got["train_index"].tolist() == idx.tolist()
                np.testing.assert_allclose(got["score"], ref[idx, i], rtol=1e-9, atol=1e-12)
        assert (att.grads_dir / "preconditioned").is_dir()
    assert not (res / "attributions" / "random").exists()  # no gradients: not an attribution method
    dry = wf.snakemake(workdir, "attribute", "-n", config=path)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_query_reuses_the_workflow_cache(attributed):
    import dropinf
    from dropinf.pipeline.query import Attribution

    res = attributed[0]
    att = Attribution(res, "dropout", 64, 1)
    cache = att.cache_path(att.cache_key())
    stamp = (cache / "rows.npy").stat().st_mtime_ns
    df = dropinf.query(res, "dropout", 64, 1, test_index=[3], k=4)
    topk = pd.read_csv(res / "attributions/dropout/r64/seed1/topk.csv")
    for direction in ("helpful", "harmful"):
        a = df[df["direction"] == direction]["train_index"].tolist()
        b = topk[(topk["test_index"] == 3) & (topk["direction"] == direction)].sort_values("rank")["train_index"]
        assert a == b.tolist()
    assert (cache / "rows.npy").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("method,r", [("dropout", 16), ("gaussian", 64), ("orig", None)])
def test_new_input_on_served_arrays(attributed, method, r, tmp_path):
    """The workflow serves these arrays from the raw gradients (and r=16 by slicing r=64): a test image
    given as a new input at its label still gets its stored row's scores."""
    import json

    import dropinf
    from dropinf.pipeline.prepare import load_prepared
    from dropinf.pipeline.query import open_attribution

    res = attributed[0]
    manifest = json.loads((res / "grads" / ("identity" if r is None else method) / ("full" if r is None else f"r{r}")
                           / "manifest.json").read_text())
    assert method == "orig" or manifest.get("served_from") or manifest.get("sliced_from")
    blob = load_prepared(res / "data/dataset.pt")
    np.save(tmp_path / "x.npy", blob["test"]["x"][4].numpy())
    att = open_attribution(res, method, r, 1 if method != "orig" else 0)
    want = att.scores(att.test_rows([4]))[:, 0]
    df = dropinf.query(res, method, r, 1 if method != "orig" else 0, image=tmp_path / "x.npy",
                       label=int(blob["test"]["labels"][4]), k=att.n)
    got = df[df["direction"] == "helpful"].set_index("train_index")["score"].sort_index().to_numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
