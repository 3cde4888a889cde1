"""score.curvature through the workflow: dropout keeping every coordinate (r = d) equals orig under
each curvature setting, the setting is recorded with every score, and changing it reruns the
scores (and the projections whose blocks follow it), not the training or the raw gradients.

A tiny version of the embedded default: digits, the same MLP (d = 2,410), few examples and epochs.
"""
from __future__ import annotations

import json

import numpy as np
import torch

D = 2410  # the embedded default's MLP: 64*32 + 32 + 32*10 + 10


def tiny_config(wf, curvature: str) -> dict:
    cfg = wf.default_config()
    cfg["experiment"] = "digits-curvature"
    cfg["dataset"]["options"].update(max_train=150, max_test=40)
    cfg["finetune"]["epochs"] = 3
    cfg["methods"] = ["orig", "dropout", "gaussian"]
    cfg["r"] = [D]
    cfg["seeds"] = [0]
    cfg["evaluate"] = {"retrain": False}
    cfg["score"]["curvature"] = curvature
    return cfg


def _scores(results, method):
    from dropinf.pipeline.storage import open_array

    rtag = "full" if method == "orig" else f"r{D}"
    m = json.loads((results / "scores" / method / rtag / "manifest.json").read_text())
    arr = open_array(results / "scores" / method / rtag / m["scores"]["None" if method == "orig" else "0"])
    return m, arr


def test_dropout_at_full_width_equals_orig_for_each_curvature(wf, tmp_path):
    import dropinf
    from dropinf.pipeline.storage import open_array

    results = tmp_path / "results" / "digits-curvature"
    for curvature in ("layer", "tensor", "global"):
        path = wf.write_config(tmp_path / f"{curvature}.yaml", tiny_config(wf, curvature))
        out = wf.snakemake(tmp_path, config=path, cores=1, timeout=900).stdout
        if curvature != "layer":  # a changed setting reruns scores, never training or raw gradients
            assert "rule finetune" not in out and "wildcards: compressor=identity" not in out
        om, orig = _scores(results, "orig")
        dm, drop = _scores(results, "dropout")
        gm, gauss = _scores(results, "gaussian")
        for m, a in ((om, orig), (dm, drop), (gm, gauss)):
            assert m["curvature"] == curvature and a.attrs["curvature"] == curvature
        n_blocks = {"layer": 2, "tensor": 4, "global": 1}[curvature]
        assert orig.attrs["n_blocks"] == drop.attrs["n_blocks"] == gauss.attrs["n_blocks"] == n_blocks
        assert gauss.attrs["projection_blocks"] == ("global" if curvature == "global" else curvature)
        # stored scores are float32: equal at that resolution
        a, b = np.asarray(orig[...], np.float64), np.asarray(drop[...], np.float64)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
        # in float64 from the stored gradient arrays, blocks read from their attributes (the API default)
        gdir = results / "grads"
        ident = json.loads((gdir / "identity" / "full" / "manifest.json").read_text())
        dman = json.loads((gdir / "dropout" / f"r{D}" / "manifest.json").read_text())
        arr = {s: open_array(gdir / "identity" / "full" / ident["arrays"]["None"][s]) for s in ("train", "test")}
        darr = {s: open_array(gdir / "dropout" / f"r{D}" / dman["arrays"]["0"][s]) for s in ("train", "test")}
        full = dropinf.influence(arr["train"], torch.from_numpy(arr["test"][...]), "orig", blocks=curvature)
        kept = dropinf.influence(darr["train"], torch.from_numpy(darr["test"][...]), "exact", blocks=curvature)
        assert ((kept - full).norm() / full.norm()).item() < 1e-10
        assert np.abs(full.numpy() - a).max() <= 1e-5 * np.abs(a).max()
        if curvature == "global":
            assert not torch.allclose(full, dropinf.influence(arr["train"], torch.from_numpy(arr["test"][...]),
                                                              "orig", blocks="tensor"), rtol=1e-3)


def test_schema_default_and_bad_value():
    from pathlib import Path

    import jsonschema
    import yaml

    schema = yaml.safe_load((Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml")
                            .read_text())
    props = schema["properties"]["score"]["properties"]["curvature"]
    assert props["default"] == "layer" and props["enum"] == ["layer", "tensor", "global"]
    bad = {"experiment": "x", "dataset": {"name": "digits"}, "model": {"name": "mlp"}, "methods": ["orig"],
           "r": [16], "seeds": [0], "score": {"curvature": "per-layer"}}
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(bad)]
    assert len(errors) == 1 and "per-layer" in errors[0]
