"""Adding a compressor is one new file: a module outside dropinf (tests/workflow/plugin_modules/
toy_strided.py), named under the config's `plugins:` key, is a compressor of the DAG-time checks,
of `snakemake -n`, and of the extract and score stages, alone and paired with another solver."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

PLUGIN_DIR = Path(__file__).resolve().parent / "plugin_modules"
METHODS = ["toy_strided", "toy_strided+tracin"]


@pytest.fixture
def plugin_path(monkeypatch):
    """The plugin module is importable the way a user's would be: from PYTHONPATH."""
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]))


def toy_config(wf, **extra) -> dict:
    cfg = wf.default_config()
    cfg.update(experiment="toy-plugin", methods=METHODS, r=[8], seeds=[0, 1], plugins=["toy_strided"])
    cfg["finetune"]["epochs"] = 3
    cfg["evaluate"] = {"retrain": False}
    cfg["extract"]["compressor_options"] = {"toy_strided": {"phase": 3}}
    cfg.update(extra)
    return cfg


def test_plugin_compressor_is_planned(wf, tmp_path, plugin_path):
    path = wf.write_config(tmp_path / "c.yaml", toy_config(wf))
    out = wf.snakemake(tmp_path, "-n", "-p", config=path).stdout
    jobs = wf.planned_jobs(out)
    outputs = {o for _, o in jobs}
    assert "results/toy-plugin/grads/toy_strided/r8/manifest.json" in outputs
    for method in METHODS:
        assert f"results/toy-plugin/scores/{method}/r8/manifest.json" in outputs
    assert not any("/identity/" in o for o in outputs)  # no full-space method: no raw gradients


@pytest.mark.parametrize("change, expected", [
    ({"plugins": []}, "config error at 'methods[0]': 'toy_strided' is not one of"),
    ({"plugins": ["no_such_plugin_module"]}, "config error at 'plugins[0]': no importable module 'no_such_plugin_module'"),
    ({"extract": {"compressor_options": {"toy_strided": {"phaze": 1}}}},
     "config error at 'extract.compressor_options.toy_strided': unknown option(s) 'phaze'; allowed: phase"),
    ({"methods": ["toy_strided+exact"]}, "'toy_strided+exact' is the method 'toy_strided'"),
])
def test_plugin_config_errors_name_the_key(wf, tmp_path, plugin_path, change, expected):
    cfg = toy_config(wf)
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = wf.write_config(tmp_path / "c.yaml", cfg)
    proc = wf.snakemake(tmp_path, "-n", config=path, check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config error")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert expected in errors[0], errors[0]


@pytest.mark.slow
def test_plugin_compressor_extracts_and_scores(wf, tmp_path, plugin_path):
    """The stages import the plugin: its arrays are the raw gradients at its coordinates, and both
    methods' scores equal a direct float64 solve on those arrays."""
    import dropinf
    from dropinf.pipeline.prepare import load_prepared, model_inputs
    from dropinf.pipeline.train import load_trained

    path = wf.write_config(tmp_path / "c.yaml", toy_config(wf))
    res = tmp_path / "results" / "toy-plugin"
    targets = [f"results/toy-plugin/scores/{m}/r8/manifest.json" for m in METHODS]
    wf.snakemake(tmp_path, *targets, config=path, cores=1)

    gm = json.loads((res / "grads" / "toy_strided" / "r8" / "manifest.json").read_text())
    assert gm["status"] == "complete" and gm["compressor"] == "toy_strided"
    blob = load_prepared(res / "data" / "dataset.pt")
    spec, _ = load_trained(res / "model" / "model.pt", blob)
    params = dict(spec.module.named_parameters())
    for seed in (0, 1):
        train = zarr.open_array(str(res / "grads" / "toy_strided" / "r8" / f"seed{seed}" / "train.zarr"), mode="r")
        test = zarr.open_array(str(res / "grads" / "toy_strided" / "r8" / f"seed{seed}" / "test.zarr"), mode="r")
        attrs = dict(train.attrs)
        dim = attrs["dim"]
        step = dim // 8
        indices = (seed + 3 + np.arange(8) * step) % dim
        assert attrs["compressor_attrs"]["indices"] == indices.tolist()
        # reference: per-example autograd on the fine-tuned model, flattened in the layout's order
        inputs = model_inputs(blob["train"])
        for i in range(4):
            batch = {k: v[i:i + 1] for k, v in inputs.items()}
            spec.module.zero_grad()
            spec.loss_fn(spec.module, batch).sum().backward()
            flat = torch.cat([params[s["name"]].grad.flatten() for s in attrs["layout"]])
            np.testing.assert_allclose(np.asarray(train[i]), flat[indices].numpy(), rtol=1e-4, atol=1e-6)
        G = torch.from_numpy(np.asarray(train[...])).double()
        v = torch.from_numpy(np.asarray(test[...])).double().mean(0)
        blocks = dropinf.compressors.base.column_blocks_from_attrs(attrs, "layer")
        exact = torch.zeros(G.shape[0], dtype=torch.float64)
        tracin = -(G @ v)
        for cols in blocks.values():
            g, vb = G[:, cols], v[cols]
            lam = 0.1 * g.square().sum(1).mean() / g.shape[1]
            H = g.T @ g / g.shape[0] + lam * torch.eye(g.shape[1], dtype=torch.float64)
            exact -= g @ torch.linalg.solve(H, vb)
        for method, want in (("toy_strided", exact), ("toy_strided+tracin", tracin)):
            got = zarr.open_array(str(res / "scores" / method / "r8" / f"seed{seed}.zarr"), mode="r")
            assert got.attrs["method"] == method and got.attrs["solver"] == ("exact" if "+" not in method else "tracin")
            np.testing.assert_allclose(np.asarray(got[...]), want.numpy(), rtol=2e-4, atol=1e-6 * float(want.abs().max()))
