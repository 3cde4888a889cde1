"""Compressed arrays served from the stored raw gradients (`extract_from_identity`): equal to a direct
extraction, logged and recorded, refused for another model, device type or an unfinished source."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

from dropinf.errors import DropinfError
from dropinf.pipeline import extract as extract_mod
from dropinf.pipeline.methods import COMPRESSED
from dropinf.pipeline.serving import NESTS_IN_R

SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_digits_mlp):
    d = train_digits_mlp(tmp_path_factory.mktemp("from_identity"))
    extract_mod.extract(job=_job(d, d / "grads" / "identity" / "full", "identity", None))
    return d


def _job(d, out, comp, r, seeds=(0, 1)):
    return extract_mod.ExtractJob(data=d / "data.pt", model=d / "model.pt", out_dir=out, compressor=comp, r=r,
                                  seeds=seeds, device="cpu", threads=1, batch_size=64)


def _served(d, out, comp, r, source=None, **kw):
    source = d / "grads" / "identity" / "full" if source is None else source
    return extract_mod.extract_from_identity(job=_job(d, out, comp, r, **kw), source=source)


def _arrays(out, seeds=(0, 1)):
    return {(s, sp): zarr.open_array(str(out / f"seed{s}" / f"{sp}.zarr"), mode="r") for s in seeds for sp in SPLITS}


@pytest.mark.parametrize("comp", ["dropout", "gaussian", "logra", "sjlt"])
def test_served_arrays_equal_a_direct_extraction(trained, comp, caplog):
    grads = trained / "grads"
    with caplog.at_level(logging.INFO, logger="dropinf"):
        m = _served(trained, grads / comp / "r16", comp, 16)
    assert m["status"] == "complete" and m["served_from"] == str(grads / "identity" / "full")
    assert not m["seconds"]  # no pass: no extract_seconds rows in the summary
    assert set(m["compress_seconds"]) == {"0", "1"}
    assert any(r.getMessage().startswith("FROM_IDENTITY:") for r in caplog.records), caplog.text
    direct = extract_mod.extract(job=_job(trained, trained / "direct" / comp / "r16", comp, 16))
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
        assert "provenance" in a.attrs and a.attrs["compress_seconds"] >= 0
    assert m["fingerprint"] == direct["fingerprint"]


def test_dropout_served_columns_are_the_raw_gradient_entries(trained):
    """Dropout's matrix path is a gather: the served columns are exactly the stored raw entries."""
    out = trained / "grads" / "dropout" / "r16"
    if not (out / "manifest.json").exists():
        _served(trained, out, "dropout", 16)
    raw = np.asarray(zarr.open_array(str(trained / "grads" / "identity" / "full" / "train.zarr"), mode="r")[...])
    a = zarr.open_array(str(out / "seed1" / "train.zarr"), mode="r")
    idx = np.asarray(a.attrs["compressor_attrs"]["indices"])
    np.testing.assert_array_equal(np.asarray(a[...]), raw[:, idx])


def _copy_identity(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        m = json.loads((dst / "manifest.json").read_text())
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case,match", [("other-model", "another model_sha256"),
                                        ("other-device-type", "another device_type"),
                                        ("incomplete", "no readable manifest"),
                                        ("skipped", "is not complete")])
def test_refused_unless_the_source_matches(trained, tmp_path, case, match):
    """The workflow routes a compressor here only for matching stored raw gradients; anything else
    given explicitly is an error naming the source, and nothing looks finished."""
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
        _copy_identity(src, ident, lambda m: m.update(status="skipped", reason="over budget"))
    out = tmp_path / "grads" / "gaussian" / "r8"
    with pytest.raises(DropinfError, match=match):
        _served(trained, out, "gaussian", 8, source=ident, seeds=(0,))
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("comp", ["dropout", "gaussian"])
def test_sharded_parts_are_served_too(trained, tmp_path, comp):
    """Each part compresses its own rows of the raw gradients; the result equals the whole job's."""
    ident = trained / "grads" / "identity" / "full"
    whole = _served(trained, tmp_path / "w" / comp / "r16", comp, 16)
    sharded = extract_mod.extract_from_identity(job=_job(trained, tmp_path / "s" / comp / "r16", comp, 16),
                                                source=ident, shards=3)
    assert whole["served_from"] == sharded["served_from"] == str(ident)
    assert {rec["kind"] for rec in sharded["shard_records"]} == {"identity"} and not sharded["seconds"]
    assert set(sharded["compress_seconds"]) == {"0", "1"}
    ref, got = _arrays(tmp_path / "w" / comp / "r16"), _arrays(tmp_path / "s" / comp / "r16")
    for key, a in got.items():
        x, y = np.asarray(a[...]), np.asarray(ref[key][...])
        if comp == "dropout":
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * float(np.abs(y).max()))
        assert a.attrs["complete"] is True and a.attrs["served_from"] == ref[key].attrs["served_from"]


# ---- through Snakemake: which extraction serves which is in the DAG ---------------------------------------------

def _plan(wf, workdir, cfg, name):
    path = wf.write_config(workdir / f"{name}.yaml", cfg)
    out = wf.snakemake(workdir, "-n", config=path).stdout
    return out, _jobs_with_inputs(out)


def _jobs_with_inputs(out: str) -> list[dict]:
    """rule, input, output of every job in a `snakemake -n` listing."""
    import re

    jobs, job = [], None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            job = {"rule": m.group(1), "input": "", "output": ""}
            jobs.append(job)
        elif job is not None and re.match(r"^\s+(input|output): ", line):
            key, value = line.strip().split(": ", 1)
            job[key] = value
    return jobs


@pytest.mark.slow
def test_fresh_plan_slices_from_the_largest_r_and_waits_for_the_identity_checkpoint(wf, tmp_path):
    """A fresh run: one gradient pass (identity), the smaller r of dropout/importance_dropout/gaussian sliced from
    r64 (its manifest an input), every other extraction's parts to be known once the identity
    manifest says whether raw gradients were stored (input <TBD>)."""
    out, jobs = _plan(wf, tmp_path, wf.default_config(), "fresh")
    exp = "results/digits-mlp/grads"
    passes = [j for j in jobs if j["rule"] == "extract"]
    assert [j["output"] for j in passes] == [f"{exp}/identity/full/parts/pass-0of1.json"], out[-3000:]
    nested = {j["output"]: j["input"] for j in jobs if j["rule"] == "extract_nested"}
    assert set(nested) == {f"{exp}/{c}/r16/parts/from-r64-0of1.json" for c in NESTS_IN_R}
    for output, inputs in nested.items():
        assert output.replace("r16/parts/from-r64-0of1.json", "r64/manifest.json") in inputs.split(", ")
    finals = {j["output"]: j["input"] for j in jobs if j["rule"] == "extract_finalize"}
    compressed = [m for m in wf.default_config()["methods"] if m in COMPRESSED]
    assert len(finals) == 1 + 2 * len(compressed)  # identity + each compressor x 2 r
    assert finals[f"{exp}/identity/full/manifest.json"] == f"{exp}/identity/full/parts/pass-0of1.json"
    for c in compressed:
        assert finals[f"{exp}/{c}/r64/manifest.json"] == "<TBD>"
    assert "DAG of jobs will be updated after completion" in out


def test_plan_after_a_run_serves_new_r_from_the_arrays_it_reads(default_run, wf):
    """After the default run (raw gradients stored): a new r is sliced from r64 (dropout, gaussian)
    or compressed from grads/identity/full (logra, sjlt), each job listing that manifest as input."""
    cfg = dict(default_run.config, r=[8, 16, 64])
    out, jobs = _plan(wf, default_run.workdir, cfg, "plan-r8")
    grads = f"{default_run.config['results_dir']}/{default_run.config['experiment']}/grads"
    kinds = {}
    for j in jobs:
        if j["rule"].startswith("extract"):
            assert "/r8/" in j["output"], j
            kinds.setdefault(j["rule"], []).append(j)
    assert set(kinds) == {"extract_nested", "extract_from_identity", "extract_finalize"}, out[-3000:]
    for j in kinds["extract_nested"]:
        comp = j["output"].split("/grads/")[1].split("/")[0]
        assert comp in NESTS_IN_R and f"{grads}/{comp}/r64/manifest.json" in j["input"].split(", ")
    for j in kinds["extract_from_identity"]:
        comp = j["output"].split("/grads/")[1].split("/")[0]
        assert comp in ("logra", "sjlt") and f"{grads}/identity/full/manifest.json" in j["input"].split(", ")
    compressed = [m for m in cfg["methods"] if m in COMPRESSED]
    assert len(kinds["extract_nested"]) == sum(c in NESTS_IN_R for c in compressed)
    assert len(kinds["extract_from_identity"]) == sum(c not in NESTS_IN_R for c in compressed)

    # switched off: gradient passes for the new r; what exists keeps how it was made (no rerun)
    cfg["extract"] = {**cfg["extract"], "nest": False, "from_identity": False}
    out, jobs = _plan(wf, default_run.workdir, cfg, "plan-r8-passes")
    assert {j["rule"] for j in jobs if j["rule"].startswith("extract")} == {"extract", "extract_finalize"}
    assert all("/r8/" in j["output"] for j in jobs if j["rule"].startswith("extract")), out[-3000:]


@pytest.mark.slow
def test_over_budget_identity_means_gradient_passes(wf, tmp_path):
    """The identity job (the checkpoint) stores nothing over its budget: the compressor is then
    extracted by its own pass, decided after the identity job ran, and nothing waited."""
    cfg = wf.reduced_config()
    cfg.update(methods=["tracin", "sjlt"], r=[16], seeds=[0])
    cfg["extract"]["identity_budget_mb"] = 0.01
    cfg["evaluate"]["retrain"] = False
    path = wf.write_config(tmp_path / "budget.yaml", cfg)
    wf.snakemake(tmp_path, config=path)
    grads = tmp_path / "results" / cfg["experiment"] / "grads"
    assert json.loads((grads / "identity" / "full" / "manifest.json").read_text())["status"] == "skipped"
    m = json.loads((grads / "sjlt" / "r16" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["served_from"] is None and set(m["seconds"]) == {"0"}
    assert sorted(p.name for p in (grads / "sjlt" / "r16" / "parts").iterdir()) == ["pass-0of1.json"]
    again = wf.snakemake(tmp_path, "-n", config=path)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_failing_extraction_keeps_the_previous_complete_arrays(trained, tmp_path, monkeypatch):
    """The job's manifest goes first (nothing looks finished), but the earlier arrays stay until new
    ones replace them; a later success then removes what it did not write (a dropped seed)."""
    from dropinf.extraction import Extractor

    out = tmp_path / "grads" / "dropout" / "r8"
    extract_mod.extract(job=_job(trained, out, "dropout", 8, seeds=(0, 1)))
    before = {k: np.asarray(a[...]) for k, a in _arrays(out).items()}

    def broken(self, *a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(Extractor, "run", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        extract_mod.extract(job=_job(trained, out, "dropout", 8, seeds=(0, 1)))
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    for k, a in _arrays(out).items():
        assert np.array_equal(np.asarray(a[...]), before[k]), k
    extract_mod.extract(job=_job(trained, out, "dropout", 8, seeds=(0,)))
    assert (out / "seed0").is_dir() and not (out / "seed1").exists()
