"""Changing r reruns only the extraction/score/evaluate jobs of the affected r (+ summarize/report),
never prepare_data, finetune or another r's extraction, and leaves the other r's outputs untouched;
a smaller nested r is served by slicing the complete largest-r array."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

import dropinf  # noqa: E402
import torch  # noqa: E402
from dropinf.layout import Layout  # noqa: E402
from dropinf.pipeline.methods import COMPRESSED  # noqa: E402


@pytest.mark.parametrize("new_r", [[16, 32, 64], [8, 64]], ids=["add-32", "replace-16-by-8"])
def test_dry_run_plan_after_changing_r(default_run, wf, new_r):
    cfg = dict(default_run.config, r=new_r)
    path = wf.write_config(default_run.workdir / f"plan-{'-'.join(map(str, new_r))}.yaml", cfg)
    out = wf.snakemake(default_run.workdir, "-n", config=path).stdout
    jobs = wf.planned_jobs(out)
    rules = {r for r, _ in jobs}
    # raw gradients are stored: dropout/gaussian slice r64, logra/sjlt compress them; no gradient pass
    assert rules == {"extract_nested", "extract_from_identity", "extract_finalize", "score", "evaluate",
                     "summarize", "report", "all"}, out[-3000:]
    new = [r for r in new_r if r not in default_run.config["r"]]
    for rule, output in jobs:
        if rule.startswith("extract") or rule in ("score", "evaluate"):
            assert any(f"/r{r}/" in output for r in new), (rule, output)
    # each compressed method x new r values: one extraction (finalize), score and evaluate each
    n_comp = sum(m in COMPRESSED for m in default_run.config["methods"])
    for stage in ("extract_finalize", "score", "evaluate"):
        assert sum(r == stage for r, _ in jobs) == n_comp * len(new)
    assert sum(r in ("extract_nested", "extract_from_identity") for r, _ in jobs) == n_comp * len(new)


def test_adding_a_larger_r_reruns_no_slice(default_run, wf):
    """r16 was sliced from r64 (the largest r then, as its manifest records): adding r128 makes
    r128 the largest, but r16 keeps its source, so only r128 is extracted."""
    cfg = dict(default_run.config, r=[16, 64, 128])
    path = wf.write_config(default_run.workdir / "plan-add-128.yaml", cfg)
    jobs = wf.planned_jobs(wf.snakemake(default_run.workdir, "-n", config=path).stdout)
    extractions = [o for r, o in jobs if r.startswith("extract")]
    assert extractions and all("/r128/" in o for o in extractions), extractions


def test_rerun_with_smaller_r_slices_and_leaves_others_untouched(default_run, wf, tmp_path):
    """A real incremental run (copy of the default run): r=8 added for the nested compressors."""
    work = tmp_path / "inc"
    shutil.copytree(default_run.workdir, work, symlinks=True)
    res = work / default_run.results.relative_to(default_run.workdir)
    before = {p: p.stat().st_mtime_ns for p in res.rglob("*") if p.is_file()
              and "/r8/" not in str(p) and not str(p).startswith(str(res / "report")) and p.name != "summary.csv"}
    cfg = dict(default_run.config, r=[8, 16, 64], methods=["dropout", "gaussian"])
    path = wf.write_config(work / "inc.yaml", cfg)
    wf.snakemake(work, config=path)
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [str(p.relative_to(res)) for p in before if before[p] != after[p]]
    assert not changed, changed
    exp = cfg["experiment"]
    for comp in ("dropout", "gaussian"):
        log = (work / "logs" / exp / "extract" / f"{comp}-r8-from-r64.log").read_text()
        assert "NESTED: serving" in log and "r=64" in log, log  # the largest configured r
        for seed in cfg["seeds"]:
            small = zarr.open_array(str(res / "grads" / comp / "r8" / f"seed{seed}" / "train.zarr"), mode="r")
            big = zarr.open_array(str(res / "grads" / comp / "r64" / f"seed{seed}" / "train.zarr"), mode="r")
            assert small.attrs["r"] == 8 and small.attrs["sliced_from"].endswith(f"r64/seed{seed}/train.zarr")
            want = np.asarray(big[:, :8])
            if comp == "gaussian":  # rescaled per curvature block: its own compressor's nest
                ca = big.attrs["compressor_attrs"]
                c = dropinf.compressor("gaussian", dim=ca["dim"], r=64, seed=seed, blocks=ca["blocks"],
                                       layout=Layout.from_json(big.attrs["layout"]))
                want = c.nest(torch.from_numpy(np.asarray(big[...])), 8).numpy()
            np.testing.assert_allclose(np.asarray(small[...]), want, rtol=1e-6)
    assert not list((work / "logs" / exp / "extract").glob("sjlt-r8*.log"))
    # the finetune log was not rewritten: finetune did not run again
    assert (work / "logs" / exp / "finetune.log").stat().st_mtime_ns == \
        (default_run.workdir / "logs" / exp / "finetune.log").stat().st_mtime_ns
