"""The benchmark runs end to end on CPU (tiny GPT-2) and writes CSV rows with provenance."""
import csv

from dropinf import bench


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "b.csv"
    bench.main(["--arch", "gpt2-tiny", "--batch", "2", "--r", "8", "16", "--gaussian-r", "16", "--logra-r", "4",
                "--sjlt-r", "16", "--e2e", "--e2e-examples", "4", "--score-train", "50", "--score-test", "5",
                "--warmup", "0", "--repeats", "1", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    paths = {r["path"] for r in rows}
    assert {"floor_fwd_bwd", "fused_dropout_r8", "fused_dropout_r16", "fused_gaussian", "fused_logra",
            "fused_sjlt", "e2e_extract_dropout_to_zarr", "score_exact_from_zarr", "self_check_dropout_r8"} <= paths
    check = next(r for r in rows if r["path"] == "self_check_dropout_r8")
    assert float(check["first_batch_checked_s"]) > 0 and 0 <= float(check["self_check_fraction"]) < 1
    checks = [float(r["rel_err_vs_autograd"]) for r in rows if r["path"].startswith("check_")]
    assert checks and max(checks) < 1e-4  # every timed path was checked against autograd first
    assert all(r["torch_version"] and r["git_commit"] and r["device"] for r in rows)
    table = bench.markdown_table([str(out)])
    assert "fused_dropout_r8" in table and table.count("\n") >= 6
    assert "| cpu | fused_dropout_r8 |" in table  # the device each row was measured on
