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


# ---- CUDA: replaying the caching allocator's trace (pure; hand-built traces in the format of
# torch.cuda.memory._snapshot(): trace entries action/addr/size/stream/time_us, `frames` only on
# entries recorded with a context, here the allocs; segments with their blocks) ----

import json  # noqa: E402
import os  # noqa: E402

import dropinf  # noqa: E402
from dropinf import bench_memory as bm  # noqa: E402
from dropinf.errors import DropinfError  # noqa: E402

MiB = 2**20
BASE = 0x7F0000000000
DROPINF_DIR = os.path.dirname(os.path.abspath(dropinf.__file__))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
HOOK = {"filename": f"{DROPINF_DIR}/extraction.py", "line": 287, "name": "on_grad"}
LOSS = {"filename": f"{DROPINF_DIR}/bench.py", "line": 46, "name": "_lm_loss"}
MODEL = {"filename": "/env/lib/python3.11/site-packages/transformers/models/gpt2/modeling_gpt2.py", "line": 300,
         "name": "forward"}
TORCH = {"filename": f"{TORCH_DIR}/nn/modules/module.py", "line": 1775, "name": "_call_impl"}


def _entry(action, addr, size, frames=None):
    e = {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": 0}
    if frames is not None:  # the allocator gathers frames for allocs only (context="alloc")
        e["frames"] = list(frames)
    return e


def alloc(addr, size, *frames):
    return [_entry("alloc", addr, size, frames)]


def free(addr, size):
    return [_entry("free_requested", addr, size), _entry("free_completed", addr, size)]


def segment(address, blocks, kind="large"):
    """A segment of `blocks` = [(size, requested, state)], laid out from `address`."""
    out, addr = [], address
    for size, requested, state in blocks:
        out.append({"address": addr, "size": size, "requested_size": requested, "state": state, "frames": []})
        addr += size
    return {"device": 0, "address": address, "total_size": addr - address, "stream": 0, "segment_type": kind,
            "segment_pool_id": (0, 0), "is_expandable": False, "blocks": out,
            "allocated_size": sum(b["size"] for b in out if b["state"] == "active_allocated")}


def snap(segments, *events):
    return {"segments": segments, "device_traces": [[e for es in events for e in es]]}


def test_replay_peak_is_in_the_middle_with_block_sizes_and_preexisting_blocks():
    pre = segment(BASE, [(4 * MiB, 4 * MiB - 100, "active_allocated"), (16 * MiB, 0, "inactive")])
    a, b, c = BASE + 4 * MiB, BASE + 7 * MiB + 512, BASE + 64 * MiB
    trace = bm.replay_trace(snap(
        [pre],
        alloc(a, 3 * MiB + 1, HOOK, TORCH),  # rounded to 512 bytes; the 20 MiB block is split
        alloc(b, 2 * MiB, MODEL, LOSS),
        free(a, 3 * MiB + 1),
        [_entry("segment_alloc", c, 2 * MiB)], alloc(c, 1000, TORCH),  # a small-pool segment
        free(b, 2 * MiB), free(c, 1000)))
    assert trace.preexisting == 4 * MiB and trace.unplaced == 0 and trace.events == 10
    assert trace.peak == 4 * MiB + (3 * MiB + 512) + 2 * MiB
    assert sorted((x.addr, x.size, x.preexisting) for x in trace.at_peak) == [
        (BASE, 4 * MiB, True), (a, 3 * MiB + 512, False), (b, 2 * MiB, False)]
    assert trace.peak_alloc.addr == b and trace.end == 4 * MiB


def test_replay_hands_out_a_free_block_whole_when_the_rest_is_too_small_to_split():
    """Large pool: a block is split only if more than 1 MiB would remain; freed neighbours merge,
    so a later request sees the merged block."""
    seg = BASE
    trace = bm.replay_trace(snap(
        [],
        [_entry("segment_alloc", seg, 12 * MiB)],
        alloc(seg, 11 * MiB + 100, MODEL),  # 1 MiB - 612 bytes would remain: the whole 12 MiB
        free(seg, 11 * MiB + 100),
        alloc(seg, 5 * MiB, MODEL),  # 7 MiB remain: split
        alloc(seg + 5 * MiB, 6 * MiB + MiB // 2, MODEL),  # 0.5 MiB would remain: the whole 7 MiB
        free(seg, 5 * MiB), free(seg + 5 * MiB, 6 * MiB + MiB // 2),
        alloc(seg, 11 * MiB + MiB // 2, HOOK),  # fits only in the merged 12 MiB block
        free(seg, 11 * MiB + MiB // 2), [_entry("segment_free", seg, 12 * MiB)]))
    assert trace.unplaced == 0 and trace.peak == 12 * MiB and trace.end == 0
    assert [(x.size, x.requested) for x in trace.at_peak] == [(12 * MiB, 11 * MiB + 100)]
    # the last allocation is 12 MiB too, but does not raise the peak: the first one set it
    assert trace.peak_alloc.requested == 11 * MiB + 100


def test_replay_ends_a_block_at_free_requested_and_keeps_its_space_until_free_completed():
    """allocated_bytes (max_memory_allocated's statistic) drops at the requested free; the block is
    reusable only at free_completed (after work on another stream finishes)."""
    pre = segment(BASE, [(20 * MiB, 0, "inactive")])
    x, y = BASE, BASE + 4 * MiB  # y from the rest of the split block
    events = [_entry("free_requested", x, 4 * MiB)] + alloc(y, 4 * MiB, MODEL) + [_entry("free_completed", x, 4 * MiB)]
    trace = bm.replay_trace(snap([pre], alloc(x, 4 * MiB, MODEL), events))
    assert trace.peak == 4 * MiB and trace.end == 4 * MiB and trace.unplaced == 0
    # while x awaits its free, its address cannot be handed out again: the replay says so
    early = bm.replay_trace(snap([pre], alloc(x, 4 * MiB), [_entry("free_requested", x, 4 * MiB)], alloc(x, MiB)))
    assert early.unplaced == 1


def test_replay_counts_preexisting_blocks_freed_during_the_call_and_not_those_awaiting_their_free():
    pre = segment(BASE, [(8 * MiB, 8 * MiB, "active_allocated"), (2 * MiB, 2 * MiB, "active_pending_free"),
                         (10 * MiB, 0, "inactive")])
    trace = bm.replay_trace(snap(
        [pre, {**segment(BASE + 64 * MiB, [(2 * MiB, 2 * MiB, "active_allocated")]), "device": 1}],
        free(BASE, 8 * MiB),  # e.g. the previous call's weight gradients, set to None
        alloc(BASE, 3 * MiB, MODEL),
        [_entry("free_completed", BASE + 8 * MiB, 2 * MiB)],
        alloc(BASE + 3 * MiB, 16 * MiB + MiB // 2, MODEL)))  # the 3 -> 20 MiB free block, merged across the 2 MiB
    assert trace.preexisting == 8 * MiB  # another device's blocks and awaiting blocks do not count
    assert trace.peak == 3 * MiB + 17 * MiB and trace.unplaced == 0  # 17 MiB: 0.5 MiB left is not split off
    assert trace.peak_alloc.requested == 16 * MiB + MiB // 2
    start = bm.replay_trace(snap([pre], free(BASE, 8 * MiB)))
    assert start.peak == 8 * MiB and start.peak_alloc is None and start.end == 0


def test_sites_name_the_innermost_dropinf_or_model_frame():
    sites = bm.Sites()
    own = bm.Allocation(1, 512, 100, (TORCH, HOOK, MODEL, LOSS))
    model = bm.Allocation(2, 1024, 1024, (TORCH, MODEL, LOSS))
    user_only = bm.Allocation(3, 512, 512, (TORCH, MODEL))
    torch_only = bm.Allocation(4, 512, 512, (TORCH,))
    engine = bm.Allocation(5, 4096, 4096, ())
    pre = bm.Allocation(6, 2048, 2048, (), preexisting=True)
    assert sites.of(own) == "dropinf/extraction.py:287 on_grad"
    assert sites.of(model) == "modeling_gpt2.py:300 forward via dropinf/bench.py:46 _lm_loss"
    assert sites.of(user_only) == "modeling_gpt2.py:300 forward"
    assert sites.of(torch_only) == bm.TORCH_INTERNAL and sites.of(engine) == bm.NO_PYTHON_FRAME
    assert sites.of(pre) == bm.PREEXISTING and sites.of(None) == bm.PREEXISTING
    assert sites.stack(own) == ("dropinf/extraction.py:287 on_grad < modeling_gpt2.py:300 forward < "
                                "dropinf/bench.py:46 _lm_loss")
    relative = {**HOOK, "filename": os.path.relpath(HOOK["filename"])}  # a module imported by a relative path
    assert sites.of(bm.Allocation(9, 512, 512, (TORCH, relative))) == sites.of(own)
    stdlib = {"filename": f"{bm.sysconfig.get_paths()['stdlib']}/contextlib.py", "line": 81, "name": "inner"}
    assert sites.of(bm.Allocation(7, 512, 512, (stdlib, TORCH, HOOK))) == sites.of(own)
    grouped = sites.by_site([own, model, bm.Allocation(8, 512, 512, (HOOK,)), engine, pre])
    assert list(grouped) == [bm.NO_PYTHON_FRAME, bm.PREEXISTING, "dropinf/extraction.py:287 on_grad",
                             "modeling_gpt2.py:300 forward via dropinf/bench.py:46 _lm_loss"]
    assert grouped["dropinf/extraction.py:287 on_grad"] == [1024, 2]


def _two_paths():
    pre = [segment(BASE, [(4 * MiB, 4 * MiB, "active_allocated"), (60 * MiB, 0, "inactive")])]
    act, extra = BASE + 4 * MiB, BASE + 10 * MiB
    floor = bm.replay_trace(snap(pre, alloc(act, 3 * MiB, MODEL, LOSS), alloc(act + 3 * MiB, 2 * MiB, MODEL, LOSS),
                                 free(act, 3 * MiB)))
    fused = bm.replay_trace(snap(pre, alloc(act, 3 * MiB, MODEL, LOSS), alloc(act + 3 * MiB, 2 * MiB, MODEL, LOSS),
                                 alloc(extra, 3 * MiB, HOOK), alloc(extra + 3 * MiB, MiB + 4096, HOOK),
                                 free(extra, 3 * MiB)))
    return floor, fused


def test_added_vs_floor_by_site_and_by_size():
    floor, fused = _two_paths()
    assert floor.peak == 9 * MiB and fused.peak == 9 * MiB + 4 * MiB + 4096
    added = bm.added_vs(fused, floor, bm.Sites())
    assert added["sizes"] == {3 * MiB: 1, MiB + 4096: 1}
    assert added["sites"] == {"dropinf/extraction.py:287 on_grad": 4 * MiB + 4096}


def test_cuda_row_reports_both_peaks_and_warns_when_they_differ(capsys):
    floor, fused = _two_paths()
    sites = bm.Sites()
    row = bm.cuda_row({"arch": "x"}, "fused_dropout", 64, (fused, fused.peak, fused.end), sites, floor=floor)
    assert row["replay_minus_max_allocated_bytes"] == 0 and row["max_memory_allocated_mib"] == row["peak_mib"]
    assert row["mem_ratio_to_floor"] == pytest.approx(fused.peak / floor.peak)
    assert row["added_mib"] == pytest.approx((4 * MiB + 4096) / MiB) and row["added_vs_floor"] == \
        "3072.0 KiB x 1; 1028.0 KiB x 1"
    assert row["peak_at"] == "dropinf/extraction.py:287 on_grad"
    assert json.loads(row["sites_mib"])["dropinf/extraction.py:287 on_grad"] == {"mib": 4.004, "count": 2}
    assert json.loads(row["added_sites_mib"]) == {"dropinf/extraction.py:287 on_grad": 4.004}
    assert "WARNING" not in capsys.readouterr().err
    row = bm.cuda_row({}, "floor_fwd_bwd", None, (floor, floor.peak + 8 * bm._MIN_BLOCK, floor.end), sites)
    assert row["replay_minus_max_allocated_bytes"] == -8 * bm._MIN_BLOCK
    err = capsys.readouterr().err
    assert "WARNING" in err and str(floor.peak) in err and str(floor.peak + 8 * bm._MIN_BLOCK) in err


class _FakeAllocator:
    """torch.cuda's memory calls, for allocator_peak's sequence without a GPU: the recorded call's
    trace is `events`; `recording` tells fn whether history is on."""

    def __init__(self, monkeypatch, segments, events, settings=None):
        self.recording, self.calls, self.log = False, [], []
        for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: self.log.append(name))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 7 * MiB)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 4 * MiB)
        monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a: {
            "segments": segments, "device_traces": [list(events) if self.log.count("record") else []],
            "allocator_settings": settings or {"expandable_segments": False}})

        def record(enabled="all", **kw):
            self.recording = enabled is not None
            self.log.append("record" if self.recording else "stop")
            if self.recording:
                self.kw = kw
        monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record)

    def fn(self):
        self.calls.append(self.recording)


def test_allocator_peak_records_only_the_second_call_and_replays_it(monkeypatch):
    pre = [segment(BASE, [(4 * MiB, 4 * MiB, "active_allocated"), (16 * MiB, 0, "inactive")])]
    events = alloc(BASE + 4 * MiB, 3 * MiB, MODEL) + free(BASE + 4 * MiB, 3 * MiB)
    fake = _FakeAllocator(monkeypatch, pre, events)
    trace, max_allocated, allocated = bm.allocator_peak(fake.fn, torch.device("cuda", 0), max_entries=100)
    assert fake.calls == [False, True]  # warm-up unrecorded, then the recorded call
    assert fake.log[:3] == ["synchronize", "empty_cache", "reset_peak_memory_stats"] and fake.log[-1] == "stop"
    assert fake.kw == {"context": "alloc", "stacks": "python", "max_entries": 100, "clear_history": True}
    assert (trace.peak, trace.end, max_allocated, allocated) == (7 * MiB, 4 * MiB, 7 * MiB, 4 * MiB)
    with pytest.raises(DropinfError, match="max-entries"):  # a full ring buffer lost its oldest events
        bm.allocator_peak(_FakeAllocator(monkeypatch, pre, events).fn, torch.device("cuda", 0), max_entries=3)
    with pytest.raises(DropinfError, match="expandable segments"):
        bm.allocator_peak(_FakeAllocator(monkeypatch, pre, events, {"expandable_segments": True}).fn,
                          torch.device("cuda", 0))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_allocator_trace_replay_equals_max_memory_allocated_on_a_real_step():
    device = torch.device("cuda")
    model, loss_fn, make = bench.build_arch("gpt2-tiny", torch.float32, device)
    batch = make(4, torch.Generator().manual_seed(1))
    params = list(model.parameters())
    trace, max_allocated, allocated = bm.allocator_peak(lambda: bench.floor_step(model, loss_fn, batch, params),
                                                        device)
    assert trace.events > 0 and trace.unplaced == 0
    assert trace.peak == max_allocated and trace.end == allocated
    assert trace.preexisting >= sum(p.numel() * 4 for p in params)


@cuda
def test_memory_bench_on_cuda_matches_the_allocator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "memory.csv"
    bm.main(["--arch", "gpt2-tiny", "--batch", "4", "--r", "64", "--device", "cuda", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == ["floor_fwd_bwd", "fused_dropout"]
    for r in rows:
        assert r["profiled_device"] == "cuda" and r["method"] == "cuda_allocator_trace"
        assert int(r["replay_minus_max_allocated_bytes"]) == 0 and int(r["unplaced_events"]) == 0, r
        assert json.loads(r["sites_mib"]) and r["peak_at"]
    floor, fused = (float(r["peak_mib"]) for r in rows)
    assert float(rows[1]["mem_ratio_to_floor"]) == pytest.approx(fused / floor)
