"""Compressed arrays served from the stored raw gradients (`extract.from_identity`): equal to a direct
extraction, logged and recorded, and refused for another model, device type or an unfinished source."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

from dropinf.pipeline import extract as extract_mod
from dropinf.pipeline.prepare import prepare_data
from dropinf.pipeline.train import finetune

SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("from_identity")
    prepare_data(d / "data.pt", "digits", {"max_train": 300, "max_test": 100}, 0.2, 0, threads=1)
    finetune(d / "data.pt", d / "model.pt", d / "model.json", "mlp", {"hidden": [16]}, device="cpu", threads=1,
             epochs=3)
    grads = d / "grads"
    extract_mod.extract(d / "data.pt", d / "model.pt", grads / "identity" / "full", "identity", None,
                        device="cpu", threads=1, batch_size=64)
    return d


def _run(d, out, comp, r, **kw):
    kw = {"seeds": [0, 1], "device": "cpu", "threads": 1, "batch_size": 64, **kw}
    return extract_mod.extract(d / "data.pt", d / "model.pt", out, comp, r, **kw)


def _arrays(out, seeds=(0, 1)):
    return {(s, sp): zarr.open_array(str(out / f"seed{s}" / f"{sp}.zarr"), mode="r") for s in seeds for sp in SPLITS}


@pytest.mark.parametrize("comp", ["dropout", "gaussian", "logra", "sjlt"])
def test_served_arrays_equal_a_direct_extraction(trained, comp, caplog):
    grads = trained / "grads"
    with caplog.at_level(logging.INFO, logger="dropinf"):
        m = _run(trained, grads / comp / "r16", comp, 16)
    assert m["status"] == "complete" and m["served_from"] == str(grads / "identity" / "full")
    assert not m["seconds"]  # no pass: no extract_seconds rows in the summary
    assert set(m["compress_seconds"]) == {"0", "1"}
    assert any(r.getMessage().startswith("FROM_IDENTITY:") for r in caplog.records), caplog.text
    direct = _run(trained, trained / "direct" / comp / "r16", comp, 16, from_identity=False)
    assert direct["served_from"] is None and set(direct["seconds"]) == {"0", "1"}
    served, ref = _arrays(grads / comp / "r16"), _arrays(trained / "direct" / comp / "r16")
    for key, a in served.items():
        b = ref[key]
        assert a.shape == b.shape and a.dtype == np.float32
        x, y = np.asarray(a[...]), np.asarray(b[...])
        # float32 results of two summation orders: relative to the scale of the column values
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()))
        assert a.attrs["served_from"].endswith(f"identity/full/{key[1]}.zarr")
        assert a.attrs["projection_device"] == "cpu" and a.attrs["complete"] is True
        assert a.attrs["compressor_attrs"] == b.attrs["compressor_attrs"]
        assert "provenance" in a.attrs
    assert m["fingerprint"] == direct["fingerprint"]


def test_dropout_served_columns_are_the_raw_gradient_entries(trained):
    """Dropout's matrix path is a gather: the served columns are exactly the stored raw entries."""
    out = trained / "grads" / "dropout" / "r16"
    if not (out / "manifest.json").exists():
        _run(trained, out, "dropout", 16)
    raw = np.asarray(zarr.open_array(str(trained / "grads" / "identity" / "full" / "train.zarr"), mode="r")[...])
    a = zarr.open_array(str(out / "seed1" / "train.zarr"), mode="r")
    idx = np.asarray(a.attrs["compressor_attrs"]["indices"])
    np.testing.assert_array_equal(np.asarray(a[...]), raw[:, idx])


def _copy_identity(src, dst, edit=None):
    import shutil

    shutil.copytree(src, dst)
    if edit is not None:
        m = json.loads((dst / "manifest.json").read_text())
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["other-model", "other-device-type", "incomplete", "disabled"])
def test_not_served_unless_the_source_matches(trained, tmp_path, case):
    src = trained / "grads" / "identity" / "full"
    ident = tmp_path / "grads" / "identity" / "full"
    if case == "other-model":
        _copy_identity(src, ident, lambda m: m["fingerprint"].update(model_sha256="0" * 64))
    elif case == "other-device-type":  # e.g. raw gradients from a GPU node; the projection here is on cpu
        _copy_identity(src, ident, lambda m: m["fingerprint"].update(device_type="cuda"))
    elif case == "incomplete":
        _copy_identity(src, ident)
        (ident / "manifest.json").unlink()
    else:
        _copy_identity(src, ident)
    m = _run(trained, tmp_path / "grads" / "gaussian" / "r8", "gaussian", 8, seeds=[0],
             from_identity=case != "disabled")
    assert m["status"] == "complete" and m["served_from"] is None and set(m["seconds"]) == {"0"}


def test_nesting_is_preferred_and_a_failing_source_falls_back(trained, tmp_path, monkeypatch):
    import shutil

    grads = tmp_path / "grads"
    shutil.copytree(trained / "grads" / "identity", grads / "identity")
    big = _run(trained, grads / "dropout" / "r24", "dropout", 24, seeds=[0])
    assert big["served_from"] is not None
    small = _run(trained, grads / "dropout" / "r8", "dropout", 8, seeds=[0])
    assert small["sliced_from"] == str(grads / "dropout" / "r24") and small["served_from"] is None

    def broken(*a, **k):
        raise OSError("source vanished")

    monkeypatch.setattr(extract_mod, "compress_rows", broken)
    m = _run(trained, grads / "gaussian" / "r8", "gaussian", 8, seeds=[0])
    assert m["status"] == "complete" and m["served_from"] is None and set(m["seconds"]) == {"0"}


def test_waits_for_an_identity_extraction_in_progress(trained, tmp_path, caplog):
    """A compressed job started beside the identity job waits for it (fresh heartbeat), then is served;
    a stale heartbeat (a killed identity job) is not waited for."""
    import os
    import shutil
    import threading
    import time

    src = trained / "grads" / "identity" / "full"
    ident = tmp_path / "grads" / "identity" / "full"
    ident.mkdir(parents=True)
    beat = ident / ".extracting.somehost.123"
    beat.touch()

    def finish():  # the identity job completes 1.5 s later: arrays, then the manifest, heartbeat removed
        time.sleep(1.5)
        for p in src.iterdir():
            if p.name != "manifest.json":
                shutil.copytree(p, ident / p.name)
        shutil.copy(src / "manifest.json", ident / "manifest.json")
        beat.unlink()

    t = threading.Thread(target=finish)
    t.start()
    with caplog.at_level(logging.INFO, logger="dropinf"):
        m = _run(trained, tmp_path / "grads" / "sjlt" / "r8", "sjlt", 8, seeds=[0])
    t.join()
    assert m["served_from"] == str(ident), caplog.text
    assert "is in progress; waiting" in caplog.text and "finished after" in caplog.text

    other = tmp_path / "other" / "grads"
    (other / "identity" / "full").mkdir(parents=True)
    stale = other / "identity" / "full" / ".extracting.somehost.456"
    stale.touch()
    old = time.time() - extract_mod.HEARTBEAT_STALE_S - 5
    os.utime(stale, (old, old))
    t0 = time.monotonic()
    m = _run(trained, other / "sjlt" / "r8", "sjlt", 8, seeds=[0])
    assert m["served_from"] is None and time.monotonic() - t0 < 30


def test_identity_heartbeat_lives_only_while_the_job_runs(trained, tmp_path):
    seen = {}
    real = extract_mod._extract_whole

    def spy(job, *a):
        seen["during"] = extract_mod.identity_in_progress(job.out_dir)
        return real(job, *a)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(extract_mod, "_extract_whole", spy)
        extract_mod.extract(trained / "data.pt", trained / "model.pt", tmp_path / "identity" / "full", "identity",
                            None, device="cpu", threads=1, batch_size=64)
    assert seen["during"] is True
    assert not extract_mod.identity_in_progress(tmp_path / "identity" / "full")
    assert not list((tmp_path / "identity" / "full").glob(".extracting.*"))


def test_dag_orders_identity_first_without_depending_on_it(wf, tmp_path):
    """Identity gets the highest priority, larger r the next; no extract job has the identity
    manifest as an input (changing r must not rerun other r)."""
    import re

    out = wf.snakemake(tmp_path, "-n", config=wf.repo / "config.yaml").stdout
    prio, job = {}, None
    for line in out.splitlines():
        if re.match(r"^rule \w+:", line):
            job = {"rule": line.split()[1].rstrip(":")}
        elif job is not None and re.match(r"^\s+(input|output|priority): ", line):
            key, value = line.strip().split(": ", 1)
            job[key] = value
            if key == "priority" and job["rule"] == "extract":
                m = re.search(r"/grads/(\w+)/(\w+)/manifest.json$", job["output"])
                prio[(m.group(1), m.group(2))] = int(value)
                assert "grads/identity" not in job["input"], job
    assert prio[("identity", "full")] > max(p for k, p in prio.items() if k[0] != "identity")
    assert prio[("dropout", "r64")] > prio[("dropout", "r16")]


@pytest.mark.parametrize("comp", ["dropout", "gaussian"])
def test_sharded_jobs_are_served_too(trained, tmp_path, comp):
    """Each shard compresses its own rows of the raw gradients; the result equals the whole job's."""
    import shutil

    grads = tmp_path / "grads"
    shutil.copytree(trained / "grads" / "identity", grads / "identity")
    whole = _run(trained, grads / comp / "r16", comp, 16)
    sharded = _run(trained, tmp_path / "s" / "grads" / comp / "r16", comp, 16, shards=3,
                   identity_dir=grads / "identity" / "full")
    assert whole["served_from"] == sharded["served_from"] == str(grads / "identity" / "full")
    assert {rec["source"] for rec in sharded["shard_records"]} == {"identity"} and not sharded["seconds"]
    ref, got = _arrays(grads / comp / "r16"), _arrays(tmp_path / "s" / "grads" / comp / "r16")
    for key, a in got.items():
        x, y = np.asarray(a[...]), np.asarray(ref[key][...])
        if comp == "dropout":
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * float(np.abs(y).max()))
        assert a.attrs["complete"] is True and a.attrs["served_from"] == ref[key].attrs["served_from"]
