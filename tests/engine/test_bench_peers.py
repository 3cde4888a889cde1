"""`python -m dropinf.bench peers` on CPU: one tiny GPT-2 run of the harness with dropinf's rows and
every installed peer, each in its own process, plus a peer that is not installed and one that fails."""
import csv
import importlib.util
import json
import os

import pytest
import torch

from dropinf import bench, bench_peers
from dropinf.bench_peers_worker import PEERS, Peer, conv1d_to_linear

TINY = ["--arch", "gpt2-tiny", "--examples", "8", "--seq", "16", "--batch", "4", "--device", "cpu",
        "--r", "16", "--dattri-k", "4", "--trak-proj-dim", "32", "--logix-rank", "4",
        "--warmup", "0", "--repeats", "1", "--no-compile", "--jobs", "2"]  # timings are not checked
# dropinf's SJLT and LoGra rows are left out to keep the run short (each process pays for importing torch
# and transformers); they run the same code as the dropout rows with another compressor
RUN = ["dropinf-dropout", "dropinf-dropout-linear", "dattri-bpif-random-mask", "dattri-logra", "dattri-factgrass",
       "traker", "logix-logra"]
PEER_ROWS = ["dattri-bpif-random-mask", "dattri-logra", "dattri-factgrass", "traker", "logix-logra"]


@pytest.fixture(scope="module")
def peer_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers") / "peers.csv"
    mp = pytest.MonkeyPatch()
    # a peer whose module is missing, and a run that fails inside its worker (dattri refuses a
    # FactGraSS intermediate size 16 x 3 that is not a square): both are rows, the others still run
    mp.setitem(PEERS, "missing-peer", Peer(
        "no-such-dist", ("no_such_module_for_dropinf_tests",), "a peer that is not installed", None))
    real = bench_peers.default_runs
    mp.setattr(bench_peers, "default_runs", lambda args: real(args) + [
        ("missing-peer", {}), ("dattri-factgrass", {"proj_dim": 16, "blowup": 3})])
    try:
        bench_peers.main(TINY + ["--peers", *RUN, "--out", str(out)])
    finally:
        mp.undo()
    return out, list(csv.DictReader(open(out)))


@pytest.mark.slow  # one process per row, each importing torch and transformers
def test_csv_columns_provenance_and_isolation(peer_rows):
    out, rows = peer_rows
    assert len(rows) == len(RUN) + 2
    for r in rows:  # provenance of the harness on every row
        assert r["git_commit"] and r["torch_version"] == torch.__version__ and r["device"] == "cpu"
        assert r["arch"] == "gpt2-tiny" and r["examples"] == "8" and r["seq_len"] == "16"
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["peer"] for r in ok} >= {"dropinf-dropout", "dropinf-dropout-linear"}
    pids = {r["worker_pid"] for r in ok}
    assert len(pids) == len(ok) and str(os.getpid()) not in pids  # one process per row, none this one
    assert all(r["harness_pid"] == str(os.getpid()) for r in rows)
    for r in ok:
        floor, secs = float(r["floor_ms_per_example"]), float(r["ms_per_example"])
        assert floor > 0 and secs > 0
        assert float(r["ratio_floor"]) == pytest.approx(secs / floor, rel=1e-9)
        assert float(r["seconds"]) == pytest.approx(secs * 4 / 1e3, rel=1e-9)  # per batch of 4
        assert r["out_finite"] == "True" and r["out_shape"] == f"8x{r['r']}" and int(r["r"]) > 0
        assert r["package_version"] and json.loads(r["settings"])
        assert r["torch_compile"] == "off"
    missing = next(r for r in rows if r["peer"] == "missing-peer")
    assert missing["status"] == "not installed" and "no_such_module_for_dropinf_tests" in missing["missing_modules"]
    assert not missing.get("ms_per_example")  # never a number for a peer that did not run
    failed = [r for r in rows if r["peer"] == "dattri-factgrass" and r["requested"] == json.dumps(
        {"blowup": 3, "proj_dim": 16}, sort_keys=True)]
    if importlib.util.find_spec("dattri") is not None:
        assert len(failed) == 1 and failed[0]["status"].startswith("error: ValueError") and "perfect square" in \
            failed[0]["status"] and not failed[0].get("ms_per_example")
    table = bench.markdown_table([str(out)])
    assert "| gpt2-tiny (B=4) | float32 | cpu | dropinf-dropout | 16 |" in table


@pytest.mark.slow
def test_dropinf_rows_checked_against_autograd(peer_rows):
    _, rows = peer_rows
    by = {r["peer"]: r for r in rows}
    r = by["dropinf-dropout"]
    assert r["status"] == "ok" and float(r["rel_err_vs_autograd"]) < 1e-4 and int(r["r"]) == 16
    assert r["tracked_params"] == r["floor_params"]  # all parameters, as the floor
    linear = by["dropinf-dropout-linear"]  # the nn.Linear layers only (dattri's scope), on the same floor
    assert linear["status"] == "ok" and float(linear["rel_err_vs_autograd"]) < 1e-4
    assert int(linear["tracked_params"]) < int(linear["floor_params"]) and linear["model_layers"] == "nn.Linear"


@pytest.mark.slow
@pytest.mark.parametrize("peer", PEER_ROWS)
def test_peer_row(peer_rows, peer):
    _, rows = peer_rows
    row = next(r for r in rows if r["peer"] == peer and r["requested"] != json.dumps(
        {"blowup": 3, "proj_dim": 16}, sort_keys=True))
    if any(importlib.util.find_spec(m) is None for m in PEERS[peer].modules):
        assert row["status"] == "not installed"
        pytest.skip(f"{peer} is not installed")
    assert row["status"] == "ok", row["status"]
    assert row["package_version"] and int(row["r"]) > 0
    # the per-layer settings asked for: 4 x 4 = 16 per layer on the 9 Linear layers of the tiny GPT-2
    expected = {"dattri-bpif-random-mask": 16 * 9, "dattri-logra": 16 * 9, "dattri-factgrass": 16 * 9,
                "traker": 32, "logix-logra": 16 * 9}[peer]
    assert int(row["r"]) == expected
    assert row["model_layers"] == ("as built" if peer == "traker" else "nn.Linear")


def test_conv1d_to_linear_computes_the_same_function():
    torch.manual_seed(0)
    model, loss_fn, make = bench.build_arch("gpt2-tiny", torch.float64, "cpu")
    model.eval()
    batch = make(2, torch.Generator().manual_seed(0))
    want = model(input_ids=batch["input_ids"]).logits
    n_params = sum(p.numel() for p in model.parameters())
    conv1d_to_linear(model)
    from transformers.pytorch_utils import Conv1D

    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 9  # 4 per block + lm_head
    assert sum(p.numel() for p in model.parameters()) == n_params
    torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, want, rtol=1e-12, atol=1e-12)


def test_worker_reports_a_missing_device_part_before_timing(tmp_path, monkeypatch):
    """A peer installed without a part it needs on this device (FactGraSS's SJLT extension on CUDA)
    is a "not installed" row, written before any model is built or floor is timed."""
    from dropinf import bench_peers_worker

    monkeypatch.setitem(PEERS, "needs-extension", Peer("dattri", ("dattri",), "a peer missing a CUDA extension",
                                                       None, missing=lambda device: f"ext (on {device.type})"))
    monkeypatch.setattr(bench_peers_worker.bench, "build_arch", lambda *a: pytest.fail("built a model"))
    out = tmp_path / "row.json"
    bench_peers_worker.main(["--peer", "needs-extension", "--arch", "gpt2-tiny", "--examples", "8", "--batch", "4",
                             "--device", "cpu", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["status"] == "not installed: ext (on cpu)" and "floor_ms_per_example" not in row
    assert bench_peers_worker._sjlt_missing(torch.device("cpu")) is None  # SJLT is only needed on CUDA
