"""`python -m dropinf.bench throughput` on a tiny GPT-2 on the CPU: the extract stage into Zarr, the
floor, and the same extraction as 2 processes whose arrays equal the one-process run's bit for bit;
with --deterministic, in every process."""
from __future__ import annotations

import csv
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
zarr = pytest.importorskip("zarr")

from dropinf import bench, bench_throughput
from dropinf.pipeline.storage import read_manifest


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True])
def test_tiny_cpu_run_with_two_shards(tmp_path, monkeypatch, deterministic):
    out, work = tmp_path / "tp.csv", tmp_path / "work"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored afterwards (the option sets it)
    monkeypatch.setattr(sys, "argv", ["bench", "throughput", "--arch", "gpt2-tiny", "--examples", "64",
                                      "--test-examples", "8", "--seq", "16", "--batch", "8", "--r", "32",
                                      "--device", "cpu", "--threads", "1", "--shards", "2", "--repeats", "2",
                                      "--workdir", str(work), "--out", str(out)]
                        + ["--deterministic"] * deterministic)
    flag = torch.are_deterministic_algorithms_enabled()
    bench.main()  # through the benchmark's dispatch
    assert torch.are_deterministic_algorithms_enabled() == flag  # the bench process's setting is restored
    rows = {r["path"]: r for r in csv.DictReader(open(out))}
    assert {r["deterministic"] for r in rows.values()} == {str(deterministic)}
    for d in ("one", "shards2"):  # the one-process stage and the shard processes ran with it
        assert read_manifest(work / d)["deterministic"] is deterministic
    assert set(rows) == {"floor_fwd_bwd", "extract_to_zarr", "extract_to_zarr_shards2"}
    floor = float(rows["floor_fwd_bwd"]["examples_per_s"])
    assert floor == pytest.approx(8 / float(rows["floor_fwd_bwd"]["seconds"]))
    for path in ("extract_to_zarr", "extract_to_zarr_shards2"):
        r = rows[path]
        assert r["n_examples"] == "72" and r["r"] == "32" and r["device"].startswith("cpu") and r["git_commit"]
        eps = float(r["examples_per_s"])
        assert eps == pytest.approx(72 / float(r["seconds"])) and float(r["floor_examples_per_s"]) == floor
        assert float(r["throughput_vs_floor"]) == pytest.approx(eps / floor)
        assert float(r["ratio_floor"]) == pytest.approx(floor / eps)
        assert float(r["stall_seconds"]) == pytest.approx(float(r["compute_wait_seconds"]) + float(r["drain_seconds"]))
        assert float(r["writer_wait_seconds"]) >= 0 and int(r["blocks_written"]) >= 2 and r["pinned"] == "False"
        assert r["repeatable_batches"] == "True" and r["repeated_batches"] == "4"
    sh = rows["extract_to_zarr_shards2"]
    assert sh["bitwise_equal"] == "True" and sh["differing_rows"] == "0" and sh["compared_rows"] == "72"
    assert sh["shards"] == "2" and float(sh["processes_wall_seconds"]) > float(sh["seconds"])
    # the comparison sees a single changed bit
    one = work / "one"
    manifest = read_manifest(one)
    shutil.copytree(one, work / "changed")
    arr = zarr.open_array(str(work / "changed" / manifest["arrays"]["0"]["train"]), mode="r+")
    row = np.asarray(arr[40:48])
    row[3, 5] = np.nextafter(row[3, 5], np.float32(np.inf))
    arr[40:48] = row
    eq = bench_throughput.compare_arrays(one, work / "changed", manifest)
    assert eq == {"bitwise_equal": False, "differing_rows": 1, "compared_rows": 72,
                  "max_abs_diff": pytest.approx(float(abs(np.spacing(row[3, 5]))), rel=0.5)}


def test_a_difference_without_deterministic_says_to_rerun_with_it():
    plain = bench_throughput.differ_message(4, 864, deterministic=False)
    assert plain.startswith("the 4-shard arrays differ from the one-process run's in 864 rows; without "
                            "--deterministic, non-deterministic kernels (e.g. the attention backward)")
    assert plain.endswith("rerun with --deterministic to compare bits")
    assert bench_throughput.differ_message(4, 3, deterministic=True) == \
        "the 4-shard arrays differ from the one-process run's in 3 rows"
