"""A sharded extraction run by Snakemake's local executor with `--resources gpu=N` on one node:
each GPU job binds its own device (`dropinf.pipeline.devices`), no two jobs hold the same device
slot at once, a device held by someone else is left alone, and the arrays equal an unsharded
extraction's bit for bit.

On CPUs the node's devices are pretended (DROPINF_FAKE_DEVICES; computation on the CPU); on a
machine with CUDA the `cuda` case runs the same workflow on its real GPUs, several jobs per GPU."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

from dropinf.pipeline import devices
from dropinf.pipeline import extract as extract_mod
from dropinf.pipeline.devices import Candidate, Settings

pytestmark = pytest.mark.slow  # a Snakemake run of prepare_data, finetune and the extraction parts


def _config(wf, *, shards, lock_dir, jobs_per_gpu):
    cfg = wf.reduced_config()
    cfg.update(experiment="multi-device", methods=["dropout"], r=[16], seeds=[0, 1])
    cfg["finetune"]["epochs"] = 2
    cfg["extract"].update(shards=shards, nest=False, from_identity=False)
    cfg["device_binding"] = {"lock_dir": str(lock_dir), "jobs_per_gpu": jobs_per_gpu, "wait_minutes": 0}
    return cfg


def _held_intervals(records):
    """(device slot, [bound, end]) of each job: the stage ran inside the time its binding was held."""
    out = []
    for rec in records:
        b = rec["provenance"]["device_binding"]
        assert b is not None, "a GPU job ran without a device binding"
        out.append(((b["id"], b["slot"]), (b["bound_at"], b["bound_at"] + rec["provenance"]["stage_seconds"])))
    return out


@pytest.mark.parametrize("kind", ["fake", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_sharded_workflow_binds_distinct_devices_and_matches_unsharded(kind, wf, tmp_path, monkeypatch):
    for key in (devices.ENV_FAKE, devices.ENV_LOCK_DIR, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    devices.release()
    lock_dir = tmp_path / "locks"
    if kind == "fake":  # a node with three devices, fake0 taken by another user of the node all along
        shards, jobs_per_gpu, gpus = 2, 1, 2
        monkeypatch.setenv(devices.ENV_FAKE, "3")
        other = devices.acquire([Candidate(i, f"fake{i}") for i in range(3)], Settings(lock_dir=lock_dir))
        assert other.ident == "fake0"
    else:  # every visible GPU, three jobs on each
        jobs_per_gpu = 3
        shards = gpus = jobs_per_gpu * torch.cuda.device_count()
        other = None
    work = tmp_path / "w"
    work.mkdir()
    cfg = _config(wf, shards=shards, lock_dir=lock_dir, jobs_per_gpu=jobs_per_gpu)
    path = wf.write_config(work / "config.yaml", cfg)
    res = work / cfg["results_dir"] / cfg["experiment"]
    target = str((res / "grads" / "dropout" / "r16" / "manifest.json").relative_to(work))
    try:
        wf.snakemake(work, target, "--resources", f"gpu={gpus}", config=path, cores=max(2, gpus))
    finally:
        if other is not None:
            other.release()
    monkeypatch.delenv(devices.ENV_FAKE, raising=False)

    grads = res / "grads" / "dropout" / "r16"
    records = [json.loads((grads / "parts" / f"pass-{k}of{shards}.json").read_text()) for k in range(shards)]
    finetune = json.loads((res / "model" / "finetune.json").read_text())
    jobs = _held_intervals(records)
    ids = {slot[0] for slot, _ in jobs}
    if kind == "fake":
        assert ids <= {"fake1", "fake2"}, jobs  # never the device held outside the run
        ft = finetune["provenance"]["device_binding"]
        assert ft is not None and ft["id"] in {"fake1", "fake2"}, finetune  # every GPU stage binds
    for (slot_a, (a0, a1)), (slot_b, (b0, b1)) in itertools.combinations(jobs, 2):
        if a0 < b1 and b0 < a1:  # ran at the same time: on different device slots
            assert slot_a != slot_b, jobs
    manifest = json.loads((grads / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["shards"] == shards

    # the same extraction in one part, in this process
    whole_dir = tmp_path / "whole"
    job = extract_mod.ExtractJob(data=res / "data" / "dataset.pt", model=res / "model" / "model.pt",
                                 out_dir=whole_dir, compressor="dropout", r=16, seeds=(0, 1),
                                 batch_size=cfg["extract"]["batch_size"], device=cfg["device"], threads=1)
    try:
        whole = extract_mod.extract(job=job)
    finally:
        devices.release()
    assert whole["fingerprint"] == manifest["fingerprint"]
    for seed, splits in whole["arrays"].items():
        for split, rel in splits.items():
            a = zarr.open_array(str(grads / rel), mode="r")
            b = zarr.open_array(str(whole_dir / rel), mode="r")
            assert a.attrs["complete"] is True and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))  # bitwise
