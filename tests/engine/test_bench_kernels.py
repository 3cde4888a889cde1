"""`python -m dropinf.bench kernels`: op counts per step of the floor, the limit and fused extraction,
from a CPU profile; an op added per hooked module must show up in the counted excess."""
import csv

import pytest
import torch

from dropinf import bench, modules
from dropinf.bench_kernels import main

PROVENANCE = ("git_commit", "torch_version", "started_at")


def _rows(tmp_path, arch, dtype="float32", extra=()):
    out = tmp_path / f"kernels_{arch}.csv"
    main(["--arch", arch, "--dtype", dtype, "--batch", "2", "--r", "64", "--warmup", "1", "--repeats", "1",
          "--out", str(out), *extra])
    return {r["path"]: r for r in csv.DictReader(open(out))}


@pytest.mark.parametrize("arch", ["gpt2-tiny", "llama-tiny"])
def test_counts_floor_limit_fused(tmp_path, arch, capsys):
    rows = _rows(tmp_path, arch, extra=["--table", "10"])
    assert {"floor_fwd_bwd", "limit_fwd_activation_bwd", "plan_fused_dropout", "fused_dropout"} <= set(rows)
    for path in ("floor_fwd_bwd", "limit_fwd_activation_bwd", "fused_dropout"):
        r = rows[path]
        assert all(r[k] for k in PROVENANCE) and r["profiled_device"] == "cpu"
        for key in ("aten_ops_top", "aten_ops_all", "autograd_nodes"):
            assert r[key] == str(int(r[key])) and int(r[key]) > 0, (path, key, r[key])
        assert int(r["aten_ops_all"]) >= int(r["aten_ops_top"]) > int(r["aten_ops_top_metadata"]) > 0
        assert float(r["wall_ms"]) > 0
    limit, fused, floor = rows["limit_fwd_activation_bwd"], rows["fused_dropout"], rows["floor_fwd_bwd"]
    excess = int(fused["excess_aten_ops_top"])
    assert excess == int(fused["aten_ops_top"]) - int(limit["aten_ops_top"]) > 0
    assert int(limit["excess_aten_ops_top"]) == 0
    assert 0 < int(fused["excess_aten_ops_top_metadata"]) < excess  # views (slices of slots) and real work
    assert int(floor["excess_aten_ops_top"]) > 0  # the weight gradients' matmuls
    plan = rows["plan_fused_dropout"]
    hooked = int(plan["hooked_modules"])
    assert hooked > 0 and int(plan["param_slots"]) >= hooked and int(fused["hooked_modules"]) == hooked
    assert float(fused["excess_ops_top_per_hooked_module"]) == pytest.approx(excess / hooked)
    # the excess names ops that truly ran: the kept coordinates are gathered with index_select
    added = dict(part.rsplit(" +", 1) for part in fused["top_added_ops"].split("; "))
    assert all(name.startswith("aten::") and int(n) > 0 for name, n in added.items())
    assert "aten::index_select" in added, added
    printed = capsys.readouterr().out
    assert "ops added over the limit, by dispatched count" in printed and "aten::index_select" in printed
    assert "by self time" in printed


def test_one_extra_op_per_hooked_module_is_counted(tmp_path, monkeypatch):
    """Each handler's emit doing one more torch.add raises the fused path's counted excess by at least
    the number of hooked modules (each hooked module's gradient is emitted at least once a step)."""
    before = _rows(tmp_path, "gpt2-tiny")
    hooked = int(before["plan_fused_dropout"]["hooked_modules"])
    calls = []
    originals = {cls: cls.emit for cls in modules.HANDLERS}  # bound before any is replaced

    def patched(original):
        def emit(module, saved, delta, slots, comp, out):
            calls.append(module)
            torch.add(delta, 1.0)
            return original(module, saved, delta, slots, comp, out)
        return staticmethod(emit)

    for cls, original in originals.items():
        monkeypatch.setattr(cls, "emit", patched(original))
    after = _rows(tmp_path, "gpt2-tiny")
    assert calls, "the patched emit never ran"

    def grew(path, key):
        return int(after[path][key]) - int(before[path][key])

    assert grew("fused_dropout", "excess_aten_ops_top_metadata") == 0  # an add writes a new tensor: not a view
    for key in ("excess_aten_ops_top", "excess_aten_ops_all"):
        assert grew("fused_dropout", key) >= hooked, (key, grew("fused_dropout", key), hooked)
    assert grew("limit_fwd_activation_bwd", "aten_ops_top") == 0


def test_kernels_is_a_bench_subcommand():
    assert bench.SUBCOMMANDS["kernels"]() is main


def test_an_r_the_compressor_refuses_is_a_row_not_a_crash(tmp_path):
    out = tmp_path / "k.csv"
    main(["--arch", "gpt2-tiny", "--batch", "2", "--r", "2", "64", "--compressors", "sjlt", "--warmup", "1",
          "--repeats", "1", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    refused = [r for r in rows if r["path"] == "fused_sjlt" and r["r"] == "2"]
    assert len(refused) == 1 and "r=2" in refused[0]["error"] and not refused[0]["aten_ops_top"]
    assert [r for r in rows if r["path"] == "fused_sjlt" and r["r"] == "64" and int(r["aten_ops_top"]) > 0]


def test_device_events_are_counted_as_kernels():
    """The CUDA columns from a profile's events: kernels (memcpy apart) with their device time, the
    host's launch calls, and views told from ops that compute (a CPU-built event list in the shape a
    CUDA profile has: a device event is a FunctionEvent whose device_type is CUDA)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    from dropinf.bench_kernels import count_events

    def ev(i, name, start, end, device=DeviceType.CPU):  # nesting comes from the time intervals
        return FunctionEvent(i, name, thread=0, start_us=start, end_us=end, device_type=device, stack=[])

    mm = ev(0, "aten::mm", 0, 10)
    launch = ev(1, "cudaLaunchKernel", 1, 2)
    view = ev(2, "aten::view", 11, 12)
    to = ev(3, "aten::to", 13, 20)  # a conversion: calls _to_copy, so not a view
    copy = ev(4, "aten::_to_copy", 14, 19)
    launch2 = ev(5, "cudaLaunchKernel", 15, 16)
    kernels = [ev(6, "sm90_gemm", 3, 8, DeviceType.CUDA), ev(7, "elementwise_kernel", 16, 18, DeviceType.CUDA),
               ev(8, "Memcpy HtoD (Pageable -> Device)", 20, 30, DeviceType.CUDA)]

    events = EventList([mm, launch, view, to, copy, launch2, *kernels])
    events._build_tree()  # nesting from the time intervals, as the profiler does
    assert copy.cpu_parent is to and launch.cpu_parent is mm

    class Prof:
        def events(self):
            return events

        def key_averages(self):
            return events.key_averages()

    c = count_events(Prof())
    assert (c.aten_ops_top, c.aten_ops_all, c.aten_ops_top_metadata) == (3, 4, 1)
    assert (c.cuda_launches, c.cuda_kernels, c.kernels_by_name["sm90_gemm"]) == (2, 2, 1)
    assert c.kernel_ms == pytest.approx(7e-3)
    assert c.by_name["aten::mm"][:2] == [1, 1] and c.by_name["aten::_to_copy"][:2] == [1, 0]
