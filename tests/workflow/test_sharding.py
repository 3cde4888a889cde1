"""Sharded extraction (`extract.shards`): parts fill disjoint chunk-aligned rows of one array each,
commit with a record, a killed part reruns alone, and the finished arrays equal an unsharded run's
bit for bit (same device)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

from dropinf.errors import DropinfError
from dropinf.pipeline import extract as extract_mod
from dropinf.pipeline.sharding import part_path, shard_plan
from dropinf.pipeline.storage import is_complete

SPLITS = ("train", "test")
SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


@pytest.mark.parametrize("n,shards,batch,width", [
    (1437, 2, 256, 16), (1437, 4, 256, 2410), (1437, 3, 100, 16), (360, 4, 256, 16), (5, 3, 2, 4), (0, 2, 8, 4),
    (3200, 4, 64, 74000), (100000, 8, 256, 16), (1437, 2, 100, 10**6), (7, 1, 4, 3)])
def test_shard_plan_tiles_rows_on_chunk_and_batch_boundaries(n, shards, batch, width):
    chunk, ranges = shard_plan(n, shards, batch, width)
    assert len(ranges) == shards and chunk >= 1
    pos = 0
    for a, b in ranges:
        assert a == pos and b >= a
        pos = b
        if shards > 1:
            assert a % chunk == 0 and a % batch == 0
            assert b == n or (b % chunk == 0 and b % batch == 0)
    assert pos == n
    assert shard_plan(n, shards, batch, width) == (chunk, ranges)  # every shard computes the same plan


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_digits_mlp):
    d = train_digits_mlp(tmp_path_factory.mktemp("sharding"))
    return d


IGNORED_ATTRS = {"provenance", "extract_seconds", "chunk_rows", "shards", "shard_records"}


def _extract(d, out, comp, r, *, shards=1, shard=None, seeds=(0, 1), **kw):
    job = extract_mod.ExtractJob(data=d / "data.pt", model=d / "model.pt", out_dir=out, compressor=comp, r=r,
                                 seeds=seeds, device="cpu", threads=1, batch_size=16, **kw)
    return extract_mod.extract(job=job, shards=shards, shard=shard)


def _parts(out, shards):
    return [part_path(out, kind="pass", shard=k, shards=shards) for k in range(shards)]


def _assert_same_arrays(a_dir, b_dir, manifest):
    for seed, splits in manifest["arrays"].items():
        for split, rel in splits.items():
            a = zarr.open_array(str(a_dir / rel), mode="r")
            b = zarr.open_array(str(b_dir / rel), mode="r")
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))  # bitwise, same device
            strip = lambda attrs: {k: v for k, v in attrs.items() if k not in IGNORED_ATTRS}  # noqa: E731
            assert strip(dict(a.attrs)) == strip(dict(b.attrs))
            assert a.attrs["complete"] is True and b.attrs["complete"] is True


@pytest.mark.parametrize("comp,r", [("identity", None), ("dropout", 8), ("gaussian", 8), ("logra", 16),
                                    ("sjlt", 8)])
def test_sharded_equals_unsharded_bitwise(trained, comp, r):
    root = trained / "eq" / comp
    whole = _extract(trained, root / "whole", comp, r)
    sharded = _extract(trained, root / "sharded", comp, r, shards=3)
    assert sharded["status"] == "complete" and sharded["shards"] == 3
    assert sharded["parts"] == [f"parts/pass-{k}of3.json" for k in range(3)]
    assert whole["parts"] == ["parts/pass-0of1.json"]
    for key in ("compressor", "r", "seeds", "splits", "n", "fingerprint", "arrays", "dim", "out_dim", "layout",
                "blocks"):
        assert json.loads(json.dumps(sharded[key])) == json.loads(json.dumps(whole[key])), key
    assert set(sharded["seconds"]) == set(whole["seconds"])
    _assert_same_arrays(root / "sharded", root / "whole", whole)
    rows = [rec["rows"]["train"] for rec in sharded["shard_records"]]
    assert rows[0][0] == 0 and rows[-1][1] == 300 and all(b - a > 0 for a, b in rows)  # three real shards
    assert not list((root / "sharded").rglob(".*"))  # no scratch left behind


def test_finalize_refuses_missing_or_disagreeing_shards(trained, tmp_path):
    out = tmp_path / "dropout" / "r8"
    for k in (0, 2):
        _extract(trained, out, "dropout", 8, shards=3, shard=k)
    with pytest.raises(DropinfError, match=r"1 of 3 part\(s\) not done: .*pass-1of3.json"):
        extract_mod.finalize(out_dir=out, parts=_parts(out, 3))
    assert not (out / "manifest.json").exists()
    with pytest.raises(DropinfError, match=r"parts \[0, 2\] given, expected 0..2 of 3"):
        extract_mod.finalize(out_dir=out, parts=_parts(out, 3)[::2])
    _extract(trained, out, "dropout", 8, shards=3, shard=1, seeds=[0])  # another configuration's part
    with pytest.raises(DropinfError, match="differs from part 0 in 'seeds'"):
        extract_mod.finalize(out_dir=out, parts=_parts(out, 3))
    assert not (out / "manifest.json").exists() and not is_complete(out / "seed0" / "train.zarr")


def test_sharded_identity_over_budget_is_skipped_with_reason(trained, tmp_path):
    out = tmp_path / "identity" / "full"
    m = _extract(trained, out, "identity", None, shards=2, budget_mb=0.01)
    assert m["status"] == "skipped" and "budget" in m["reason"] and m["shards"] == 2
    assert not list(out.glob("*.zarr"))


KILLER = textwrap.dedent("""
    # Run one shard, SIGKILL this process right after its second chunk write of seed 1 (mid-array).
    import os, signal, sys
    from dropinf.pipeline import storage
    storage.WRITER_BLOCK_BYTES = 1  # one chunk per write
    writes = {"n": 0}
    real = storage.BackgroundRowWriter._write_block
    def write(self, first, count, view):
        real(self, first, count, view)
        if "seed1" in str(self.arr.store_path):
            writes["n"] += 1
            if writes["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
    storage.BackgroundRowWriter._write_block = write
    from dropinf.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def _cli(d, out, comp, r, shard, shards, script=None):
    args = ["extract", "--data", str(d / "data.pt"), "--model", str(d / "model.pt"), "--compressor", comp,
            "--r", str(r), "--seeds", "0,1", "--batch-size", "16", "--device", "cpu", "--threads", "1",
            "--out-dir", str(out), "--shards", str(shards), "--shard", str(shard)]
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "dropinf", *args]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _mtimes(directory):
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_killed_shard_reruns_alone_and_result_is_identical(trained, tmp_path):
    whole_dir = tmp_path / "whole"
    whole = _extract(trained, whole_dir, "gaussian", 8)
    out = tmp_path / "sharded"
    for k in (0, 2):
        assert _cli(trained, out, "gaussian", 8, k, 3).returncode == 0
    killed = _cli(trained, out, "gaussian", 8, 1, 3, script=KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # nothing looks finished: no record for the killed part, no manifest, arrays not complete
    parts = _parts(out, 3)
    assert not parts[1].exists() and parts[0].exists() and parts[2].exists()
    assert not (out / "manifest.json").exists()
    assert not any(is_complete(out / f"seed{s}" / f"{sp}.zarr") for s in (0, 1) for sp in SPLITS)
    with pytest.raises(DropinfError, match="1of3"):
        extract_mod.finalize(out_dir=out, parts=parts)
    # the killed part wrote some of its rows of seed 1 (the array is filled in place)
    chunk_rows = zarr.open_array(str(out / "seed1" / "train.zarr"), mode="r").chunks[0]
    rows = json.loads(parts[0].read_text())["rows"]["train"]
    assert rows[1] % chunk_rows == 0
    before = _mtimes(out)
    rerun = _cli(trained, out, "gaussian", 8, 1, 3)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _mtimes(out)
    # parts 0 and 2 were not touched: their records and their chunks keep their mtimes
    for k in (0, 2):
        assert before[parts[k]] == after[parts[k]]
    own = json.loads(parts[1].read_text())["rows"]
    train_chunks = [p for p in before if p.parent.parent.name == "c" and p.parent.parent.parent.name == "train.zarr"]
    others = [p for p in train_chunks if not own["train"][0] <= int(p.parent.name) * chunk_rows < own["train"][1]]
    assert others and all(before[p] == after[p] for p in others)
    m = extract_mod.finalize(out_dir=out, parts=parts)
    assert m["status"] == "complete"
    _assert_same_arrays(out, whole_dir, whole)



# ---- through Snakemake: parts are separate jobs, extract_finalize writes the manifest -------------------------


def _sharded_config(wf, r):
    cfg = wf.reduced_config()
    cfg.update(methods=["orig", "dropout"], r=r, seeds=[0, 1])
    cfg["extract"].update(shards=2, nest=False, from_identity=False)  # gradient passes only
    cfg["evaluate"]["retrain"] = False
    return cfg


@pytest.fixture(scope="module")
def sharded_run(wf, default_run, tmp_path_factory):
    """A copy of the default run, rerun with two shards: prepare_data and finetune are reused (so
    the model is the unsharded run's, byte for byte), the identity extraction runs again as two
    part jobs (the record names carry the part count) and dropout r16, removed, as two passes."""
    import shutil

    work = tmp_path_factory.mktemp("sharded_run") / "w"
    shutil.copytree(default_run.workdir, work, symlinks=True)
    # made afresh by passes (a finished extraction keeps the kind of job that made it)
    shutil.rmtree(work / default_run.results.relative_to(default_run.workdir) / "grads" / "dropout")
    cfg = _sharded_config(wf, [16])
    path = wf.write_config(work / "sharded.yaml", cfg)
    wf.snakemake(work, config=path)
    return work, cfg


def _res(work, cfg):
    return work / cfg["results_dir"] / cfg["experiment"]


def test_sharded_workflow_matches_the_unsharded_run(sharded_run, default_run):
    work, cfg = sharded_run
    res, exp = _res(work, cfg), cfg["experiment"]
    for comp, tag in (("identity", "full"), ("dropout", "r16")):
        m = json.loads((res / "grads" / comp / tag / "manifest.json").read_text())
        assert m["status"] == "complete" and m["shards"] == 2
        assert [rec["shard"] for rec in m["shard_records"]] == [0, 1]
        for k in (0, 1):  # each shard ran as its own job, with its own log
            assert (work / "logs" / exp / "extract" / f"{comp}-{tag}-shard{k}of2.log").exists()
        assert (work / "logs" / exp / "extract" / f"{comp}-{tag}-finalize.log").exists()
        ref = json.loads((default_run.results / "grads" / comp / tag / "manifest.json").read_text())
        assert m["fingerprint"] == ref["fingerprint"] and "shards" not in ref
        for seed, splits in m["arrays"].items():
            for split, rel in splits.items():
                a = zarr.open_array(str(res / "grads" / comp / tag / rel), mode="r")
                b = zarr.open_array(str(default_run.results / "grads" / comp / tag / rel), mode="r")
                assert a.attrs["complete"] is True and a.attrs["shards"] == 2
                x, y = np.asarray(a[...]), np.asarray(b[...])
                if m["served_from"] is None and m["sliced_from"] is None and ref["served_from"] is None and \
                        ref["sliced_from"] is None:  # both ran passes: bitwise equal
                    np.testing.assert_array_equal(x, y)
                else:  # one was served from the raw gradients (float32 rounding)
                    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()))
    assert (res / "summary.csv").exists()


def test_sharded_plan_after_changing_r_reruns_only_that_r(sharded_run, wf, tmp_path):
    work, cfg = sharded_run
    path = wf.write_config(tmp_path / "plan.yaml", {**cfg, "r": [8, 16]})
    out = wf.snakemake(work, "-n", config=path).stdout
    jobs = wf.planned_jobs(out)
    assert {r for r, _ in jobs} == {"extract", "extract_finalize", "score", "evaluate", "summarize", "report",
                                   "all"}, out[-3000:]
    for rule, output in jobs:
        if rule.startswith("extract") or rule in ("score", "evaluate"):
            assert "/r8/" in output, (rule, output)
    assert sorted(o for r, o in jobs if r == "extract") == sorted(
        f"{cfg['results_dir']}/{cfg['experiment']}/grads/dropout/r8/parts/pass-{k}of2.json" for k in (0, 1))
    assert sum(r == "extract_finalize" for r, _ in jobs) == 1


def test_failed_shard_job_reruns_alone(sharded_run, wf, tmp_path):
    """What a failed or killed part job leaves: no record (Snakemake removes a failed job's output)
    and no manifest (the part removed it when it started). The next run reruns that part and
    extract_finalize only, and the arrays come out identical."""
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(sharded_run[0], work, symlinks=True)
    cfg = sharded_run[1]
    grads = _res(work, cfg) / "grads" / "dropout" / "r16"
    before = {p: np.asarray(zarr.open_array(str(grads / f"seed{s}" / f"{sp}.zarr"), mode="r")[...])
              for s in (0, 1) for sp in SPLITS for p in [f"seed{s}/{sp}"]}
    part_path(grads, kind="pass", shard=1, shards=2).unlink()
    (grads / "manifest.json").unlink()
    other = part_path(grads, kind="pass", shard=0, shards=2)
    other_mtime = other.stat().st_mtime_ns
    path = wf.write_config(work / "sharded.yaml", cfg)
    target = str((grads / "manifest.json").relative_to(work))  # as if the downstream jobs never ran
    plan = wf.snakemake(work, "-n", target, config=path).stdout
    jobs = [(r, o) for r, o in wf.planned_jobs(plan) if r.startswith("extract")]
    assert sorted(jobs) == [("extract", str(part_path(grads.relative_to(work), kind="pass", shard=1, shards=2))),
                            ("extract_finalize", str((grads / "manifest.json").relative_to(work)))], plan[-3000:]
    wf.snakemake(work, target, config=path)
    assert other.stat().st_mtime_ns == other_mtime
    for key, data in before.items():
        np.testing.assert_array_equal(np.asarray(zarr.open_array(str(grads / f"{key}.zarr"), mode="r")[...]), data)
