"""The pass's background Zarr writer (`storage.BackgroundRowWriter`): arrays bitwise equal to the
sequential `RowWriter`'s (directly, and through the extract stage for identity, dropout and gaussian
on a fresh random model, with batches and chunks that do not align, and sharded), a failing write
raised once in the caller naming the file with nothing left that looks finished, bounded memory."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr")

from dropinf.errors import DropinfError
from dropinf.pipeline import extract as extract_mod
from dropinf.pipeline import sharding, storage
from dropinf.pipeline.common import read_json
from dropinf.pipeline.storage import BackgroundRowWriter, RowWriter, create_array, is_complete

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bits(a) -> np.ndarray:
    return np.asarray(a[...], dtype=np.float32).view(np.uint32)  # bitwise, NaN included


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dropinf-writer")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,start,stop,chunk,batch,block_bytes,depth", [
    (100, 0, None, 7, 5, 1, 1),           # one chunk per block, one block: every batch waits for the writer
    (100, 0, None, 7, 5, 7 * 12 * 4 * 3, 2),  # blocks of 3 chunks, batches straddle them
    (100, 14, 63, 7, 13, 1, 3),           # a shard's range inside the array
    (97, 32, None, 16, 40, 10**9, 3),     # batches larger than chunks, one block to n (not chunk-aligned)
    (5, 0, None, 8, 2, 1, 2),             # fewer rows than a chunk
])
def test_rows_equal_the_sequential_writer_bitwise(tmp_path, device, n, start, stop, chunk, batch, block_bytes,
                                                  depth):
    g = torch.Generator().manual_seed(n + chunk + batch)
    rows = torch.randn(n, 12, generator=g, dtype=torch.float64)
    rows[3 % n, 1] = float("-0.0")
    end = n if stop is None else stop
    seq = create_array(tmp_path / "seq.zarr", n, 12, {}, chunk_rows=chunk)
    bg = create_array(tmp_path / "bg.zarr", n, 12, {}, chunk_rows=chunk)
    ref = RowWriter(seq, start, stop)
    with BackgroundRowWriter(bg, start, stop, path="bg.zarr", block_bytes=block_bytes, depth=depth) as w:
        for a in range(start, end, batch):
            part = rows[a:min(a + batch, end)].to(device)  # float64 in: cast to the array's float32 on copy
            ref(a - start, part)
            w(a - start, part)
    ref.close()
    np.testing.assert_array_equal(_bits(bg), _bits(seq))
    s = w.stats()
    assert s["block_rows"] % bg.chunks[0] == 0  # whole chunks (create_array caps a chunk at n rows)
    assert s["blocks_written"] == -(-(end - start) // s["block_rows"])
    assert s["pinned"] == (device == "cuda") and len(w._blocks) <= depth
    assert all(s[k] >= 0 for k in ("compute_wait_seconds", "drain_seconds", "writer_wait_seconds", "write_seconds"))
    assert not _writer_threads()


def test_numpy_rows_and_order_checks(tmp_path):
    arr = create_array(tmp_path / "a.zarr", 10, 3, {}, chunk_rows=4)
    x = np.arange(30, dtype=np.float64).reshape(10, 3) / 7
    with pytest.raises(ValueError, match="not aligned"):
        BackgroundRowWriter(arr, 2, 8)
    w = BackgroundRowWriter(arr, block_bytes=1)  # blocks of one chunk
    w(0, x[:3])
    with pytest.raises(ValueError, match="out of order"):
        w(4, x[4:6])
    with pytest.raises(ValueError, match="more rows"):
        w(3, np.zeros((8, 3)))
    w(3, x[3:9])
    with pytest.raises(ValueError, match=r"wrote rows \[0, 9\) but the range is \[0, 10\)"):
        w.close()
    np.testing.assert_array_equal(arr[:8], x[:8].astype(np.float32))  # the two whole blocks were written


def test_caller_error_stops_the_writer_without_waiting(tmp_path):
    arr = create_array(tmp_path / "a.zarr", 64, 4, {}, chunk_rows=8)
    with pytest.raises(RuntimeError, match="compute failed"):
        with BackgroundRowWriter(arr, block_bytes=1, depth=2) as w:
            w(0, torch.ones(20, 4))
            raise RuntimeError("compute failed")
    assert not _writer_threads() and w._closed


def test_failed_write_is_raised_in_the_caller_naming_the_file(tmp_path, monkeypatch):
    arr = create_array(tmp_path / "a.zarr", 64, 4, {}, chunk_rows=8)
    _fail_writes_from_threads(monkeypatch, after=1)
    w = BackgroundRowWriter(arr, path=tmp_path / "a.zarr", block_bytes=1, depth=2)
    failed = r"writing rows 8-15 of .*a\.zarr failed \(OSError: \[Errno 28\] No space left"
    with pytest.raises(DropinfError, match=failed):
        for a in range(0, 64, 4):  # the caller is never blocked for good by the failed writer
            w(a, torch.ones(4, 4))
        w.close()
    w._stop()
    assert not _writer_threads()


# ---- through the extract stage -----------------------------------------------------------------------------

class SequentialWriter(RowWriter):
    """The sequential writer in the background writer's place (what a pass used before)."""

    def __init__(self, arr, start=0, stop=None, *, path=None):
        super().__init__(arr, start, stop)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()

    def stats(self):
        return {k: 0.0 for k in sharding.WRITER_SECONDS}


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """Random data and a randomly initialized MLP (no training): data.pt and model.pt."""
    from dropinf.pipeline.common import Stage
    from dropinf.pipeline.prepare import load_prepared, save_tensors
    from dropinf.pipeline.train import build, save_weights

    d = tmp_path_factory.mktemp("writer")
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(157, 10, generator=g), torch.randint(3, (157,), generator=g)
    split = lambda a, b: {"x": x[a:b].contiguous(), "labels": y[a:b].contiguous()}  # noqa: E731
    header = {"name": "random", "task": "classification", "num_classes": 3, "meta": {}, "label_noise": 0.0,
              "noise_seed": 0, "dataset_options": {}, "provenance": Stage("prepare_data").provenance()}
    save_tensors(d / "data.pt", {"train": split(0, 118), "test": split(118, 157)}, header)
    options = {"hidden": [6]}
    spec = build(load_prepared(d / "data.pt"), "mlp", options, seed=3)
    save_weights(d / "model.pt", spec.module, {"model": "mlp", "model_options": options, "train": {"seed": 3},
                                               "init": None})
    return d


def _run(d, out, comp, r, batch, *, shards=1, shard=None):
    job = extract_mod.ExtractJob(data=d / "data.pt", model=d / "model.pt", out_dir=out, compressor=comp, r=r,
                                 seeds=(0, 2), device="cpu", threads=1, batch_size=batch)
    return extract_mod.extract(job=job, shards=shards, shard=shard)


def _assert_same(a_dir, b_dir, manifest):
    for seed, splits in manifest["arrays"].items():
        for split, rel in splits.items():
            a, b = zarr.open_array(str(a_dir / rel), mode="r"), zarr.open_array(str(b_dir / rel), mode="r")
            assert a.shape == b.shape == (manifest["n"][split], manifest["out_dim"])
            np.testing.assert_array_equal(_bits(a), _bits(b))
            assert a.attrs["complete"] is True and b.attrs["complete"] is True


@pytest.mark.parametrize("comp,r", [("identity", None), ("dropout", 9), ("gaussian", 7)])
@pytest.mark.parametrize("chunk,batch", [(7, 5), (16, 12), (4, 64)])
def test_stage_arrays_equal_the_sequential_writer(random_model, tmp_path, monkeypatch, comp, r, chunk, batch):
    monkeypatch.setattr(sharding, "chunk_rows_for", lambda width, itemsize=4: chunk)  # small chunks, misaligned
    monkeypatch.setattr(storage, "WRITER_BLOCK_BYTES", 1)  # one chunk per block: many handovers
    monkeypatch.setattr(storage, "WRITER_DEPTH", 2)
    bg = _run(random_model, tmp_path / "bg", comp, r, batch)
    with monkeypatch.context() as m:
        m.setattr(extract_mod._Pass, "writer", SequentialWriter)
        seq = _run(random_model, tmp_path / "seq", comp, r, batch)
    assert bg["status"] == seq["status"] == "complete"
    _assert_same(tmp_path / "bg", tmp_path / "seq", seq)
    assert set(bg["writer_seconds"]) == set(bg["arrays"]) == ({"None"} if comp == "identity" else {"0", "2"})
    for seed in bg["arrays"]:  # the writer's waits, per seed and split
        for split in ("train", "test"):
            assert set(bg["writer_seconds"][seed][split]) == set(sharding.WRITER_SECONDS)
            assert all(v >= 0 for v in bg["writer_seconds"][seed][split].values())
    rec = read_json(tmp_path / "bg" / "parts" / "pass-0of1.json")
    seed = min(bg["arrays"])
    assert rec["writer"][seed]["train"]["blocks_written"] == -(-118 // chunk)
    if comp == "dropout" and chunk == 7:  # and sharded: the parts' background writers fill one array
        sharded = _run(random_model, tmp_path / "sh", comp, r, batch, shards=3)
        assert sharded["shards"] == 3 and len(sharded["shard_records"]) == 3
        _assert_same(tmp_path / "sh", tmp_path / "seq", seq)
        assert all(rec["writer"]["2"]["test"]["block_rows"] >= 1 for rec in sharded["shard_records"]
                   if rec["rows"]["test"][1] > rec["rows"]["test"][0])


def _fail_writes_from_threads(monkeypatch, after: int):
    """Zarr writes from a thread other than the main one fail after `after` successful ones."""
    real, calls = zarr.Array.__setitem__, {"n": 0}

    def setitem(self, key, value):
        if threading.current_thread() is not threading.main_thread():
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(28, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)


@pytest.mark.parametrize("shards,shard", [(1, None), (2, 0)])
def test_failed_write_in_the_stage_leaves_nothing_finished(random_model, tmp_path, monkeypatch, shards, shard):
    monkeypatch.setattr(sharding, "chunk_rows_for", lambda width, itemsize=4: 8)
    monkeypatch.setattr(storage, "WRITER_BLOCK_BYTES", 1)
    out = tmp_path / "dropout" / "r9"
    _fail_writes_from_threads(monkeypatch, after=3)
    with pytest.raises(DropinfError) as err:
        _run(random_model, out, "dropout", 9, 8, shards=shards, shard=shard)
    msg = str(err.value)
    assert msg.startswith("writing rows 24-31 of ") and "No space left on device" in msg
    assert str(out / "seed0" / "train.zarr") in msg  # the array's own name, not its temporary one
    assert not _writer_threads()
    assert not (out / "manifest.json").exists() and not list((out / "parts").glob("*.json"))
    assert not any(is_complete(p.parent) for p in out.rglob("zarr.json"))
    if shards == 1:  # written under a temporary name: nothing is left at all
        assert not list(out.rglob("zarr.json"))
    monkeypatch.undo()  # the disk has room again: the same command completes
    m = _run(random_model, out, "dropout", 9, 8, shards=shards, shard=shard)
    assert m["status"] == "complete"
