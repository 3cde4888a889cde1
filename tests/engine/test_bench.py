"""The benchmark runs end to end on CPU (tiny GPT-2) and writes CSV rows with provenance."""
import csv
import time

import pytest
import torch

from dropinf import bench


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "b.csv"
    bench.main(["--arch", "gpt2-tiny", "--batch", "2", "--r", "8", "16", "--gaussian-r", "16", "--logra-r", "4",
                "--sjlt-r", "16", "--e2e", "--e2e-examples", "4", "--score-train", "50", "--score-test", "5",
                "--warmup", "0", "--repeats", "1", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    paths = {r["path"] for r in rows}
    assert {"floor_fwd_bwd", "limit_fwd_activation_bwd", "fused_dropout_r8", "fused_dropout_r16", "fused_gaussian",
            "fused_logra", "fused_sjlt", "e2e_extract_dropout_to_zarr", "score_exact_from_zarr",
            "self_check_dropout_r8"} <= paths
    check = next(r for r in rows if r["path"] == "self_check_dropout_r8")
    assert float(check["first_batch_checked_s"]) > 0 and 0 <= float(check["self_check_fraction"]) < 1
    checks = [float(r["rel_err_vs_autograd"]) for r in rows if r["path"].startswith("check_")]
    assert checks and max(checks) < 1e-4  # every timed path was checked against autograd first
    assert all(r["torch_version"] and r["git_commit"] and r["device"] for r in rows)
    # every timed path: its ratios to the floor and the limit of the same run, consistent with its seconds
    by_path = {r["path"]: r for r in rows}
    floor, limit = float(by_path["floor_fwd_bwd"]["seconds"]), float(by_path["limit_fwd_activation_bwd"]["seconds"])
    assert floor > 0 and limit > 0
    timed = [r for r in rows if r["path"].startswith(("floor", "limit", "fused_"))]
    assert len(timed) >= 7
    for r in timed:
        secs = float(r["seconds"])
        assert float(r["ratio_limit"]) * limit == pytest.approx(secs, rel=1e-12), r["path"]
        assert float(r["ratio_floor"]) * floor == pytest.approx(secs, rel=1e-12), r["path"]
        assert float(r["ms_per_example"]) == pytest.approx(1e3 * secs / 2, rel=1e-12)
    for name in ("fused_dropout_r8", "fused_sjlt", "fused_logra"):  # eager paths: also paired with the limit
        assert float(by_path[name]["ratio_limit_paired"]) > 0 and float(by_path[name]["limit_seconds_paired"]) > 0
        assert 0 < float(by_path[name]["host_seconds_paired"]) and 0 < float(by_path[name]["host_fraction_paired"])
    assert float(by_path["floor_fwd_bwd"]["ratio_floor"]) == 1.0
    assert float(by_path["limit_fwd_activation_bwd"]["ratio_limit"]) == 1.0
    table = bench.markdown_table([str(out)])
    assert "fused_dropout_r8" in table and table.count("\n") >= 6
    # the device each row was measured on (the benchmark takes a GPU where there is one)
    assert f"| {bench.provenance(None)['device']} | fused_dropout_r8 |" in table
    assert "× limit" in table
    # each eager row's host share, and its limit's, from the same pairs (on the CPU host is device: 1.00)
    row = next(line for line in table.splitlines() if "| fused_dropout_r8 |" in line)
    own = float(by_path["fused_dropout_r8"]["host_fraction_paired"])
    lim = float(by_path["fused_dropout_r8"]["limit_host_seconds_paired"]) / float(
        by_path["fused_dropout_r8"]["limit_seconds_paired"])
    assert f"| {own:.2f} ({lim:.2f}) |" in row
    assert sum(r["path"] == "self_check_dropout_r8" for r in rows) == 1  # one row per path


def test_limit_step_computes_no_weight_gradient_and_reaches_the_input():
    """The limit's backward runs through the whole network (the leaf's gradient is the one autograd
    gives with the weights live) and leaves every weight without a gradient."""
    import torch

    torch.manual_seed(0)
    for arch in ("gpt2-tiny", "resnet9"):
        model, loss_fn, make = bench.build_arch(arch, torch.float64, "cpu")
        model.eval()
        batch = make(2, torch.Generator().manual_seed(0))
        params = list(model.parameters())
        with bench.frozen(params):
            got = bench.limit_step(model, loss_fn, batch)
        assert all(p.requires_grad for p in params) and all(p.grad is None for p in params)
        if "input_ids" in batch:
            leaf = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            loss = bench.per_example_lm_loss(model(inputs_embeds=leaf, use_cache=False).logits, batch["input_ids"])
            assert torch.allclose(loss, loss_fn(model, batch))  # the same loss as through the ids
        else:
            leaf = batch["x"].detach().requires_grad_(True)
            loss = loss_fn(model, {**batch, "x": leaf})
        want = torch.autograd.grad(loss.sum(), leaf)[0]
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_rows_reach_the_csv_as_they_are_measured(tmp_path, monkeypatch):
    """A run stopped part-way (a job's time limit) keeps the rows measured so far."""
    out = tmp_path / "partial.csv"
    timings = []

    def stop_after_limit(fn, *a, **k):  # the first fused path's timing never returns
        timings.append(1)
        if len(timings) > 2:
            raise KeyboardInterrupt
        return real_cuda_time(fn, *a, **k)

    real_cuda_time = bench.cuda_time
    monkeypatch.setattr(bench, "cuda_time", stop_after_limit)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--arch", "gpt2-tiny", "--batch", "2", "--r", "8", "--compressors", "dropout", "--no-check", "--warmup", "0",
                    "--repeats", "1", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == ["floor_fwd_bwd", "limit_fwd_activation_bwd"]
    assert all(r["git_commit"] for r in rows)


def test_paired_ratio_times_each_pair_back_to_back_and_takes_the_median_ratio(monkeypatch):
    """A reference that slows down during the run (host drift) cancels out of the paired ratio."""
    clock = {"t": 0.0, "slow": 1.0}
    order = []

    def fn():
        order.append("fn")
        clock["t"] += 2.0 * clock["slow"]

    def ref():
        order.append("ref")
        clock["t"] += 1.0 * clock["slow"]
        clock["slow"] *= 1.5  # every call after this one is slower

    def timed(f):
        t0 = clock["t"]
        f()
        return clock["t"] - t0, 0.25 * (clock["t"] - t0)  # (device, host) seconds: a quarter on the host

    monkeypatch.setattr(bench, "timed_once", timed)
    got = bench.paired_ratio(fn, ref, warmup=1, repeats=5)
    assert order == ["ref", "fn"] * 6  # one warm-up pair, then five timed pairs in turn
    # fn runs right after ref's slow-down: 2 x 1.5 in every pair, however slow both have become
    for key in ("ratio_limit_paired", "ratio_limit_paired_min", "ratio_limit_paired_max"):
        assert got[key] == pytest.approx(2.0 * 1.5), key
    # the warm-up pair leaves the pace at 1.5; timed pair k runs ref at 1.5^k, fn at 2·1.5^(k+1)
    assert got["seconds_paired"] == pytest.approx(2.0 * 1.5 ** 4)  # pair 3 of 5: the median
    assert got["limit_seconds_paired"] == pytest.approx(1.5 ** 3)
    assert got["host_seconds_paired"] == pytest.approx(0.25 * 2.0 * 1.5 ** 4)
    assert got["limit_host_seconds_paired"] == pytest.approx(0.25 * 1.5 ** 3)
    assert got["host_fraction_paired"] == pytest.approx(0.25)


def test_timed_once_gives_the_host_time_until_the_call_returns():
    seconds, host = bench.timed_once(lambda: time.sleep(0.02))
    assert host >= 0.02 and seconds >= 0.02
    if not torch.cuda.is_available():
        assert seconds == host  # on the CPU both are the wall time


def test_host_cell_reads_the_paired_host_columns_and_marks_csvs_without_them():
    row = {"host_fraction_paired": "0.98", "limit_host_seconds_paired": "0.03", "limit_seconds_paired": "0.04"}
    assert bench._host_cell(row) == "0.98 (0.75)"
    assert bench._host_cell({"ratio_limit_paired": "1.1"}) == "–"  # a CSV from before the host columns
    assert bench._host_cell({**row, "limit_seconds_paired": ""}) == "–"
