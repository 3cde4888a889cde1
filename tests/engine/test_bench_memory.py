"""`python -m dropinf.bench memory`: peaks from the profiler's memory timeline, and what extraction
adds to a training step's peak (CPU, deterministic)."""
import csv

import pytest
import torch

from dropinf import bench, modules


def test_norm_handlers_keep_the_input_autograd_holds_not_a_copy():
    """A normalized copy kept from the forward to the backward hook is one extra activation per norm
    layer; the handlers keep the input tensor itself (shared storage) and normalize in the hook."""
    torch.manual_seed(0)
    for module, x in ((torch.nn.LayerNorm(8), torch.randn(2, 5, 8)), (torch.nn.RMSNorm(8), torch.randn(2, 5, 8)),
                      (torch.nn.BatchNorm2d(3).eval(), torch.randn(2, 3, 4, 4))):
        handler = modules.handler_for(module)
        saved = handler.capture(module, x)
        kept = modules._kept_input(module, saved)
        assert kept.data_ptr() == x.data_ptr() and kept.shape == x.shape, type(module).__name__


def test_memory_bench_on_gpt2_tiny_adds_at_most_one_activation(tmp_path, monkeypatch):
    """Fused dropout's peak is the floor's plus at most one hidden-state tensor (the clone where the
    activation graph starts); each LayerNorm's normalized input used to add one more (1.05x)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "memory.csv"
    from dropinf.bench_memory import main

    main(["--arch", "gpt2-tiny", "--batch", "4", "--r", "64", "512", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == ["floor_fwd_bwd", "fused_dropout", "fused_dropout"]
    assert all(r["git_commit"] and r["torch_version"] and r["profiled_device"] == "cpu" for r in rows)
    floor = float(rows[0]["peak_mib"])
    assert floor > 1.0 and "ACTIVATION" in rows[0]["by_category_mib"]
    hidden = 4 * 32 * 64 * 4 / 1024  # B x T x n_embd float32, in KiB
    for r in rows[1:]:
        ratio = float(r["mem_ratio_to_floor"])
        assert ratio == pytest.approx(float(r["peak_mib"]) / floor)
        assert ratio <= 1.02, r
        added = dict(part.split(" KiB x ") for part in r["added_vs_floor"].split("; ") if part)
        assert int(added.get(f"{hidden:.1f}", 0)) <= 1, r["added_vs_floor"]
