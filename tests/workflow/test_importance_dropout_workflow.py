"""importance_dropout through the workflow: planned beside uniform dropout, and a tiny real run."""
from __future__ import annotations

import json

import pandas as pd
import zarr


def _tiny(wf, tmp_path, **extract):
    cfg = wf.default_config()
    cfg.update(experiment="tiny-importance", methods=["dropout", "importance_dropout"], r=[4, 8], seeds=[0, 1])
    cfg["dataset"]["options"] = {"test_fraction": 0.2, "seed": 0, "max_train": 120, "max_test": 40}
    cfg["model"]["options"] = {"hidden": [8], "activation": "tanh"}
    cfg["finetune"]["epochs"] = 2
    cfg["evaluate"]["retrain"] = False
    cfg["extract"]["compressor_options"] = {"importance_dropout": {"probe": 32, "probe_seed": 1, **extract}}
    return cfg, wf.write_config(tmp_path / "tiny.yaml", cfg)


def test_dry_run_plans_importance_dropout_beside_dropout(wf, tmp_path):
    _, path = _tiny(wf, tmp_path)
    jobs = wf.planned_jobs(wf.snakemake(tmp_path, "-n", config=path).stdout)
    res = "results/tiny-importance"
    for comp in ("dropout", "importance_dropout"):
        # one gradient pass at the largest r; the smaller r is sliced from it (both nest in r)
        assert ("extract", f"{res}/grads/{comp}/r8/parts/pass-0of1.json") in jobs, jobs
        assert ("extract_nested", f"{res}/grads/{comp}/r4/parts/from-r8-0of1.json") in jobs, jobs
        for r in (4, 8):
            assert ("extract_finalize", f"{res}/grads/{comp}/r{r}/manifest.json") in jobs, jobs
            assert ("score", f"{res}/scores/{comp}/r{r}/manifest.json") in jobs, jobs


def test_tiny_run_completes_with_provenance(wf, tmp_path):
    cfg, path = _tiny(wf, tmp_path, weighting="block")
    wf.snakemake(tmp_path, config=path)
    res = tmp_path / "results" / "tiny-importance"
    summary = pd.read_csv(res / "summary.csv")
    auc = summary[(summary.method == "importance_dropout") & (summary.metric == "mislabel_auc")]
    assert sorted(zip(auc.r, auc.seed)) == [(4, 0), (4, 1), (8, 0), (8, 1)]
    assert auc.value.between(0, 1).all()
    # r=4 (a pass or sliced from r=8) keeps the first 4 coordinates of r=8 and equals its first 4 columns
    m4 = json.loads((res / "grads" / "importance_dropout" / "r4" / "manifest.json").read_text())
    m8 = json.loads((res / "grads" / "importance_dropout" / "r8" / "manifest.json").read_text())
    assert m4["status"] == m8["status"] == "complete"
    for seed in (0, 1):
        a4 = zarr.open_array(str(res / "grads" / "importance_dropout" / "r4" / f"seed{seed}" / "train.zarr"), mode="r")
        a8 = zarr.open_array(str(res / "grads" / "importance_dropout" / "r8" / f"seed{seed}" / "train.zarr"), mode="r")
        c4, c8 = a4.attrs["compressor_attrs"], a8.attrs["compressor_attrs"]
        assert c4["indices"] == c8["indices"][:4]
        assert (c8["probe"], c8["probe_seed"], c8["weighting"], c8["rescale"]) == (32, 1, "block", False)
        assert c8["weights_summary"]["positive"] > 0 and c8["probe_seconds"] > 0
        assert (a4[...] == a8[...][:, :4]).all()
    assert a4.attrs["options"] == {"probe": 32, "probe_seed": 1, "weighting": "block"}  # configured, not the weights
