"""Stored outputs prove themselves, data files run no code, bad arguments fail by name.

Zarr arrays: NaN fill, a crc32c checksum on every chunk, chunk counts in the manifest; a missing
or damaged chunk is named (with the command that recomputes it) by the readers and by `verify`.
Prepared data and weights are safetensors + JSON; pickles are refused. Config option keys are
checked against the registries' signatures before anything runs.
"""
from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dropinf.errors import DropinfError, IntegrityError, InvalidValueError, NonFiniteError
from dropinf.pipeline import options, storage
from dropinf.pipeline.evaluate import removal_count
from dropinf.pipeline.prepare import load_prepared, prepare_data
from dropinf.pipeline.score import score
from dropinf.pipeline.train import check_planned_extractions, finetune, load_saved, load_trained, save_weights
from dropinf.pipeline.verify import verify

REPO = Path(__file__).resolve().parents[2]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dropinf", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=120)


def _scores_dir(root: Path) -> Path:
    """A score-like directory: two arrays (one 2-D under seed0/) and a manifest written last."""
    d = root / "scores" / "m" / "r4"
    rng = np.random.default_rng(0)
    storage.save_array(d / "seed0" / "train.zarr", rng.standard_normal((10, 3)).astype(np.float32), {}, chunk_rows=4)
    storage.save_array(d / "scores.zarr", rng.standard_normal(10).astype(np.float32), {}, chunk_rows=4)
    storage.write_manifest(d, {"status": "complete"})
    return d


# ---- arrays ------------------------------------------------------------------------------------------------

def test_arrays_carry_checksums_nan_fill_and_manifest_counts(tmp_path):
    d = _scores_dir(tmp_path)
    arr = zarr.open_array(str(d / "seed0" / "train.zarr"), mode="r")
    assert storage.has_checksum(arr) and np.isnan(arr.metadata.fill_value)
    rec = json.loads((d / "manifest.json").read_text())["integrity"]
    assert rec["seed0/train.zarr"] == {"shape": [10, 3], "rows": 10, "chunk_rows": 4, "chunks": 3,
                                       "checksum": "crc32c"}
    assert rec["scores.zarr"]["chunks"] == 3
    # an all-zero chunk is still written (not left to the fill value)
    storage.save_array(tmp_path / "z.zarr", np.zeros((8, 2), np.float32), {}, chunk_rows=4)
    assert storage.present_chunks(tmp_path / "z.zarr") == {"c/0/0", "c/1/0"}
    assert np.array_equal(np.asarray(storage.open_array(tmp_path / "z.zarr")), np.zeros((8, 2)))


def test_missing_chunk_reads_nan_and_is_named_by_the_reader(tmp_path):
    d = _scores_dir(tmp_path)
    (d / "seed0" / "train.zarr" / "c" / "1" / "0").unlink()
    raw = zarr.open_array(str(d / "seed0" / "train.zarr"), mode="r")[...]
    assert np.isnan(raw[4:8]).all() and np.isfinite(raw[:4]).all()  # NaN, never zeros
    with pytest.raises(IntegrityError) as e:
        storage.open_array(d / "seed0" / "train.zarr")
    msg = str(e.value)
    assert "c/1/0 (rows 4-7)" in msg and "1 of 3 chunk(s) missing" in msg
    assert f"snakemake --forcerun {d / 'manifest.json'}" in msg


def test_truncated_or_flipped_chunk_raises_naming_it(tmp_path):
    d = _scores_dir(tmp_path)
    chunk = d / "scores.zarr" / "c" / "2"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern inside the compressed bytes
    chunk.write_bytes(bytes(data))
    arr = storage.open_array(d / "scores.zarr")  # the files are all there
    assert np.isfinite(arr[0:8]).all()  # undamaged chunks still read
    with pytest.raises(IntegrityError, match=r"chunk c/2 \(rows 8-9\) is corrupt.*checksum.*--forcerun"):
        arr[...]
    with open(d / "seed0" / "train.zarr" / "c" / "0" / "0", "r+b") as f:
        f.truncate(5)
    with pytest.raises(IntegrityError, match=r"train.zarr: chunk c/0/0 \(rows 0-3\) is corrupt"):
        np.asarray(storage.open_array(d / "seed0" / "train.zarr"))


def test_array_that_disagrees_with_its_manifest_is_refused(tmp_path):
    d = _scores_dir(tmp_path)
    storage.save_array(d / "scores.zarr", np.zeros(12, np.float32), {}, chunk_rows=4)  # replaced behind its back
    with pytest.raises(IntegrityError, match=r"shape is \[12\] but its manifest recorded \[10\]"):
        storage.open_array(d / "scores.zarr")


def test_verify_cli_names_every_problem_and_exit_codes(tmp_path):
    d = _scores_dir(tmp_path)
    ok = _cli("verify", tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 arrays (6 chunks decoded)" in ok.stdout and "0 problem(s)" in ok.stdout
    (d / "seed0" / "train.zarr" / "c" / "2" / "0").unlink()
    with open(d / "scores.zarr" / "c" / "0", "r+b") as f:
        f.truncate(3)
    bad = _cli("verify", tmp_path)
    assert bad.returncode == 2
    lines = [line for line in bad.stdout.splitlines() if "recover with" in line]
    assert len(lines) == 2, bad.stdout
    assert any("train.zarr" in line and "c/2/0 (rows 8-9)" in line for line in lines)
    assert any("scores.zarr" in line and "chunk c/0 (rows 0-3) is corrupt" in line for line in lines)
    assert all(f"snakemake --forcerun {d / 'manifest.json'}" in line for line in lines)
    # a manifest listing an array that is gone, and an unreadable manifest
    import shutil
    shutil.rmtree(d / "seed0")
    (tmp_path / "scores" / "x").mkdir()
    (tmp_path / "scores" / "x" / "manifest.json").write_text("{not json")
    problems, _ = verify(tmp_path)
    assert any("seed0/train.zarr: recorded by" in p and "but missing" in p for p in problems)
    assert any("unreadable manifest" in p for p in problems)
    assert _cli("verify", tmp_path / "nowhere").returncode == 2


def test_verify_reports_nan_rows_and_arrays_without_checksum(tmp_path):
    v = np.ones((6, 2), np.float32)
    v[4, 1] = np.nan
    storage.save_array(tmp_path / "a" / "n.zarr", v, {}, chunk_rows=4)
    zarr.create_array(store=str(tmp_path / "a" / "old.zarr"), shape=(4,), chunks=(4,), dtype="float32",
                      attributes={"complete": True})[...] = 1.0
    torch.save({"state_dict": {}}, tmp_path / "a" / "model.pt")  # a pickle from an older version
    problems, counts = verify(tmp_path)
    assert counts["arrays"] == 2 and counts["files"] == 1
    assert any("model.pt is a pickle" in p and "snakemake --forcerun" in p for p in problems)
    assert any("n.zarr: chunk c/1/0 holds NaN/inf at rows [4]" in p for p in problems)
    assert any("old.zarr: its chunks carry no checksum" in p for p in problems)


# ---- a failing score job keeps the previous outputs -------------------------------------------------------

def _fake_identity(d: Path, n=12, k=5) -> Path:
    rng = np.random.default_rng(1)
    for split, rows in (("train", n), ("test", 4)):
        storage.save_array(d / f"{split}.zarr", rng.standard_normal((rows, k)).astype(np.float32), {}, chunk_rows=4)
    storage.write_manifest(d, {"status": "complete", "compressor": "identity", "arrays": {"None": {
        "train": "train.zarr", "test": "test.zarr"}}, "blocks": [[0, k]], "out_dim": k, "dim": k,
        "layout": [{"name": "weight", "shape": [k], "offset": 0}]})
    return d / "manifest.json"


def test_failing_score_keeps_previous_complete_outputs(tmp_path):
    blob_path = tmp_path / "data.pt"
    prepare_data(out=blob_path, dataset="digits", dataset_options={"max_train": 12, "max_test": 4}, threads=1)
    grads = _fake_identity(tmp_path / "grads")
    out = tmp_path / "scores"
    first = score(data=blob_path, out_dir=out, method="tracin", grads=grads, device="cpu", threads=1)
    before = np.asarray(storage.open_array(out / "scores.zarr"))
    manifest = (out / "manifest.json").read_text()
    with open(tmp_path / "grads" / "train.zarr" / "c" / "1" / "0", "r+b") as f:
        f.truncate(4)
    with pytest.raises(IntegrityError, match=r"train.zarr: chunk c/1/0 \(rows 4-7\) is corrupt"):
        score(data=blob_path, out_dir=out, method="tracin", grads=grads, device="cpu", threads=1)
    assert (out / "manifest.json").read_text() == manifest and first["status"] == "complete"
    assert np.array_equal(np.asarray(storage.open_array(out / "scores.zarr")), before)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "scores.zarr"]


# ---- no pickle -------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_prepared_data_and_weights_are_safetensors_and_pickles_are_refused(tmp_path):
    data = tmp_path / "data.pt"
    prepare_data(out=data, dataset="digits", dataset_options={"max_train": 40, "max_test": 20}, label_noise=0.25,
                 noise_seed=0, threads=1)
    assert data.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a zip/pickle
    blob = load_prepared(data)
    assert blob["train"]["x"].shape == (40, 64) and blob["train"]["flipped"].dtype == torch.bool
    assert int(blob["train"]["flipped"].sum()) == 10 and blob["label_noise"] == 0.25 and blob["task"] == "classification"
    model = tmp_path / "model.pt"
    finetune(data=data, out=model, metrics_out=tmp_path / "m.json", model="mlp", model_options={"hidden": [8]},
             settings={"epochs": 1}, device="cpu", threads=1)
    spec, saved = load_trained(model, blob)
    assert saved["model"] == "mlp" and saved["train"]["epochs"] == 1
    for k, v in spec.module.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k])
    # a pickle in place of either file: refused, never unpickled (the payload would create `marker`)
    marker = tmp_path / "PWNED"
    for path, loader in ((data, load_prepared), (model, load_saved)):
        torch.save({"x": _Payload(marker)}, path)
        with pytest.raises(IntegrityError, match=r"is a pickle .* not loaded .*snakemake --forcerun"):
            loader(path)
        path.write_bytes(pickle.dumps(_Payload(marker)))
        with pytest.raises(IntegrityError, match="is a pickle"):
            loader(path)
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
        with pytest.raises(IntegrityError, match="damaged or not a dropinf file"):
            loader(path)
    assert not marker.exists()


def test_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

    m = Tied()
    save_weights(tmp_path / "w.pt", m, {"note": "tied"})
    saved = load_saved(tmp_path / "w.pt")
    fresh = Tied()
    fresh.load_state_dict(saved["state_dict"])
    assert torch.equal(fresh.a.weight, m.a.weight) and fresh.a.weight is fresh.b.weight and saved["note"] == "tied"


def test_cifar10_batches_use_a_restricted_unpickler(tmp_path):
    from dropinf.data.cifar10 import load_batch

    good = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), b"labels": [1, 2],
            b"batch_label": b"x", b"filenames": [b"a.png", b"b.png"]}
    (tmp_path / "ok").write_bytes(pickle.dumps(good, protocol=2))
    got = load_batch(tmp_path / "ok")
    assert np.array_equal(got[b"data"], good[b"data"]) and got[b"labels"] == [1, 2]
    marker = tmp_path / "PWNED"
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": _Payload(marker)}, protocol=2))
    with pytest.raises(DropinfError, match=r"evil is not a plain CIFAR-10 batch .*posix.system|evil is not a plain"):
        load_batch(tmp_path / "evil")
    assert not marker.exists()
    (tmp_path / "obj").write_bytes(pickle.dumps({b"data": np.array([1, "a"], dtype=object)}, protocol=2))
    with pytest.raises(DropinfError, match="object-dtype"):
        load_batch(tmp_path / "obj")


# ---- bad values, named ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"r": True}, "r must be an integer, got True"),
    ({"r": 2.5}, "r must be an integer, got 2.5"),
    ({"r": "8"}, "r must be an integer, got '8'"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"seed": 2**70}, "seed must be <= 9223372036854775807"),
    ({"seed": False}, "seed must be an integer, got False"),
    ({"r": 0}, r"r must be in \[1, dim=20\]"),
    ({"bogus": 1}, r"unknown option\(s\) \['bogus'\]; allowed: \['layout', 'chunk_elems'\]"),
])
def test_compressor_arguments_are_strict(kwargs, match):
    import dropinf

    args = {"dim": 20, "r": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match) as e:
        dropinf.compressor("dropout", **args)
    assert isinstance(e.value, DropinfError)
    assert dropinf.compressor("dropout", dim=20, r=4.0, seed=np.int64(3)).r == 4  # integral values are fine


def test_non_finite_features_are_named_at_prepare(tmp_path, monkeypatch):
    from dropinf.data import DATASETS, TaskData

    def broken():
        x = torch.zeros(6, 3)
        x[4, 2] = float("nan")
        x[5, 0] = float("inf")
        return TaskData("broken", "classification", {"x": x, "labels": torch.zeros(6, dtype=torch.long)},
                        {"x": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)}, num_classes=2)

    monkeypatch.setitem(DATASETS, "broken", broken)
    with pytest.raises(NonFiniteError, match=r"train feature 'x' has NaN/inf values in 2 row\(s\), first \[4, 5\]"):
        prepare_data(out=tmp_path / "d.pt", dataset="broken")
    assert not (tmp_path / "d.pt").exists()


def test_retraining_fraction_that_removes_nothing_is_an_error():
    assert removal_count(0.1, 100) == 10
    with pytest.raises(InvalidValueError, match=r"0.001 of n = 100 .* removes none"):
        removal_count(0.001, 100)
    with pytest.raises(ValueError, match="removes all"):
        removal_count(0.9, 2)


def test_planned_r_is_checked_against_d_before_training():
    from dropinf.data import load_dataset
    from dropinf.models import build_model

    spec = build_model("mlp", load_dataset("digits", max_train=20, max_test=10), hidden=[4])
    d = 64 * 4 + 4 + 4 * 10 + 10
    check_planned_extractions(spec, {"dropout": {"r": [16, d]}, "logra": {"r": [16]}})
    with pytest.raises(DropinfError, match=rf"'r' = 100000 exceeds d = {d}"):
        check_planned_extractions(spec, {"logra": {"r": [16, 100000]}})
    with pytest.raises(DropinfError, match="unknown option"):
        check_planned_extractions(spec, {"sjlt": {"r": [4], "options": {"mask": 2}}})
    # a compressor whose options come from the data (importance_dropout's probe) is checked for r <= d only
    check_planned_extractions(spec, {"importance_dropout": {"r": [16, d], "options": {"probe": 8}}})
    with pytest.raises(DropinfError, match=rf"'r' = {d + 1} exceeds d = {d}"):
        check_planned_extractions(spec, {"importance_dropout": {"r": [d + 1]}})


# ---- DAG-time tables match the registries -----------------------------------------------------------------

def _keywords(fn, skip=()):
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [n for n, p in sig.parameters.items() if p.kind is not p.VAR_POSITIONAL and n not in skip]


def test_option_tables_equal_the_live_signatures():
    from dropinf.compressors.base import COMPRESSORS
    from dropinf.data import DATASETS
    from dropinf.models import MODELS

    tables = options.dataset_options()
    for name, fn in DATASETS.items():
        found, allowed = options._lookup(tables, name)
        assert found and allowed == _keywords(fn), name
    tables = options.model_options()
    for name, fn in MODELS.items():
        found, allowed = options._lookup(tables, name)
        assert found and allowed == _keywords(fn, {"data"}), name
    comps = options.compressor_options()
    assert set(comps) == set(COMPRESSORS)
    for name, cls in COMPRESSORS.items():
        assert comps[name] == _keywords(cls.__init__, options.STAGE_SET["compressor"]), name
    sig = inspect.signature(sys.modules["dropinf.influence"].influence)
    assert options.solver_options() == [n for n, p in sig.parameters.items()
                                        if p.kind is p.KEYWORD_ONLY and n not in options.STAGE_SET["solver"]]


def test_option_errors_name_key_and_allowed():
    errors = options.option_errors({
        "dataset": {"name": "glue_mrpc", "options": {"n_trian": 5}},
        "model": {"name": "mlp", "options": {"hidden": [4], "hiden": 3}},
        "extract": {"compressor_options": {"sjlt": {"mask_factor": 2, "mask": 4}}},
        "score": {"method_options": {"lissa": {"lissa_iter": 3}}},
    })
    assert errors == [
        "config error at 'dataset.options': unknown option(s) 'n_trian'; allowed: tokenizer, max_length, n_train, "
        "n_test, seed, train_split, test_split, pad_to_max_length, path, dataset",
        "config error at 'model.options': unknown option(s) 'hiden'; allowed: hidden, activation, init_seed",
        "config error at 'extract.compressor_options.sjlt': unknown option(s) 'mask'; allowed: mask_factor, "
        "blocks, chunk_elems",
        "config error at 'score.method_options.lissa': unknown option(s) 'lissa_iter'; allowed: dtype, lissa_iters, "
        "lissa_scale, lissa_power_iters, woodbury",
    ]
    assert options.option_errors({"dataset": {"name": "digits", "options": {"seed": 1}}}) == []


def test_duplicate_yaml_keys_are_found(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("experiment: a\nfinetune:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    assert options.duplicate_key_error(str(p)) == (f"config error in {p} line 5: duplicate key 'epochs' (first at "
                                                   f"line 3); each key may appear once")
    p.write_text("experiment: a\nfinetune: {epochs: 3, lr: 0.1}\n")
    assert options.duplicate_key_error(str(p)) is None
