"""extract.deterministic through the workflow: the extract rule's gradient pass runs with
--deterministic (its manifest says so), and switching the option reruns nothing."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")


@pytest.mark.slow
def test_the_option_reaches_the_pass_and_reruns_nothing(wf, tmp_path):
    cfg = wf.reduced_config()
    cfg["extract"]["deterministic"] = True
    on = wf.write_config(tmp_path / "on.yaml", cfg)
    target = f"{cfg['results_dir']}/{cfg['experiment']}/grads/identity/full/manifest.json"
    wf.snakemake(tmp_path, target, config=on, cores=1)
    m = json.loads((tmp_path / target).read_text())
    assert m["status"] == "complete" and m["deterministic"] is True
    log = tmp_path / "logs" / cfg["experiment"] / "extract" / "identity-full.log"
    assert log.exists()
    cfg["extract"]["deterministic"] = False
    off = wf.write_config(tmp_path / "off.yaml", cfg)
    out = wf.snakemake(tmp_path, target, "-n", config=off).stdout
    assert wf.planned_jobs(out) == [], out[-3000:]
