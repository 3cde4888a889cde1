"""Stage functions in-process: label noise, row writing, complete-or-absent outputs, nesting, training."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

from dropinf.errors import DropinfError
from dropinf.pipeline import extract as extract_mod
from dropinf.pipeline.prepare import flip_labels, load_prepared
from dropinf.pipeline.storage import RowWriter, create_array, is_complete, write_array
from dropinf.pipeline.train import _Optimizer, finetune


def test_flip_labels_exact_and_seeded():
    y = torch.arange(1000) % 10
    noisy, flipped = flip_labels(y, 10, 0.2, seed=3)
    assert int(flipped.sum()) == 200
    assert (noisy[flipped] != y[flipped]).all() and (noisy[~flipped] == y[~flipped]).all()
    assert ((noisy >= 0) & (noisy < 10)).all()
    again, _ = flip_labels(y, 10, 0.2, seed=3)
    other, _ = flip_labels(y, 10, 0.2, seed=4)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    with pytest.raises(DropinfError, match="label_noise"):
        flip_labels(y, 10, 1.0, seed=0)


@pytest.mark.parametrize("kind,wd", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.01), ("sgd", 0.01)])
def test_optimizer_matches_torch_optim(kind, wd):
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    m2 = copy.deepcopy(m1)
    ref = {"adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=wd),
           "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=wd),
           "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, weight_decay=wd, momentum=0.9)}[kind](m1.parameters())
    mine = _Optimizer(m2.parameters(), kind, 1e-2, wd)
    for _ in range(30):
        x = torch.randn(8, 5)
        for m, opt in ((m1, ref), (m2, mine)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_row_writer_chunks_and_ranges(tmp_path):
    arr = create_array(tmp_path / "a.zarr", 10, 3, {"x": 1}, chunk_rows=4)
    assert arr.chunks == (4, 3) and arr.attrs["complete"] is False
    with pytest.raises(ValueError, match="aligned"):
        RowWriter(arr, 2, 8)
    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    w = RowWriter(arr, 4, 10)  # a shard: rows [4, 10)
    w(0, data[4:7])
    with pytest.raises(ValueError, match="out of order"):
        w(0, data[7:8])
    w(3, data[7:10])
    assert w.close() == 6
    w0 = RowWriter(arr, 0, 4)
    w0(0, torch.from_numpy(data[0:4]))
    w0.close()
    np.testing.assert_array_equal(arr[...], data)
    short = RowWriter(arr, 0, 4)
    short(0, data[:2])
    with pytest.raises(ValueError, match="range"):
        short.close()


def test_write_array_is_complete_or_absent(tmp_path):
    path = tmp_path / "x.zarr"
    with pytest.raises(RuntimeError):
        with write_array(path, 5, 2, {}) as arr:
            arr[:2] = 1.0
            raise RuntimeError("killed")
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with write_array(path, 5, 2, {}) as arr:
        arr[...] = 1.0
    assert is_complete(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_digits_mlp):
    d = train_digits_mlp(tmp_path_factory.mktemp("stage"))
    return d


def test_prepared_data(trained):
    blob = load_prepared(trained / "data.pt")
    assert blob["train"]["x"].shape == (300, 64) and int(blob["train"]["flipped"].sum()) == 60
    assert torch.equal(blob["train"]["labels"] != blob["train"]["labels_clean"], blob["train"]["flipped"])
    rec = json.loads((trained / "model.json").read_text())
    assert rec["n_params"] == 64 * 16 + 16 + 16 * 10 + 10 and 0 < rec["metrics"]["test_accuracy"] <= 1


def _job(d, out, comp, r, **kw):
    return extract_mod.ExtractJob(data=d / "data.pt", model=d / "model.pt", out_dir=out, compressor=comp, r=r,
                                  device="cpu", threads=1, **kw)


def test_killed_extract_leaves_nothing_complete_then_reruns(trained, monkeypatch):
    from dropinf.extraction import Extractor

    out = trained / "grads" / "dropout" / "r8"
    real = Extractor.run
    calls = {"n": 0}

    def dying(self, loader, sink=None, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # second seed, train split
            raise KeyboardInterrupt("killed")
        return real(self, loader, sink=sink, **kw)

    monkeypatch.setattr(Extractor, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_mod.extract(job=_job(trained, out, "dropout", 8, seeds=(0, 1)))
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "seed1" / "train.zarr").exists()
    monkeypatch.setattr(Extractor, "run", real)
    m = extract_mod.extract(job=_job(trained, out, "dropout", 8, seeds=(0, 1)))
    assert m["status"] == "complete" and (out / "manifest.json").exists()
    assert all(is_complete(out / f"seed{s}" / f"{sp}.zarr") for s in (0, 1) for sp in ("train", "test"))


@pytest.mark.parametrize("comp", ["dropout", "gaussian"])
def test_nested_extraction_equals_a_direct_pass(trained, comp):
    root = trained / "nest" / comp
    extract_mod.extract(job=_job(trained, root / "r24", comp, 24, seeds=(0, 1)))
    m = extract_mod.extract_nested(job=_job(trained, root / "r8", comp, 8, seeds=(0, 1)), source=root / "r24")
    assert m["sliced_from"] == str(root / "r24")
    direct = extract_mod.extract(job=_job(trained, root / "direct" / "r8", comp, 8, seeds=(0, 1)))
    assert direct["sliced_from"] is None
    for seed in (0, 1):
        for split in ("train", "test"):
            a = zarr.open_array(str(root / "r8" / f"seed{seed}" / f"{split}.zarr"), mode="r")
            b = zarr.open_array(str(root / "direct" / "r8" / f"seed{seed}" / f"{split}.zarr"), mode="r")
            # float32: Gaussian nesting rescales a sum of d terms computed at another scale, so entries
            # that nearly cancel differ by float32 rounding of the terms (seen: 1.3e-6 on one entry
            # of 2,400, on one CPU); tolerance relative to the array's scale, far below any real bug
            b_ = b[...]
            np.testing.assert_allclose(a[...], b_, rtol=1e-5, atol=1e-5 * float(np.abs(b_).max()))
            assert a.attrs["compressor_attrs"] == b.attrs["compressor_attrs"]
            if comp == "dropout":  # a slice: exactly the larger r's first columns
                big = zarr.open_array(str(root / "r24" / f"seed{seed}" / f"{split}.zarr"), mode="r")
                np.testing.assert_array_equal(a[...], big[:, :8])
    assert m["fingerprint"] == direct["fingerprint"]


@pytest.mark.parametrize("case,match", [("other-model", "another model_sha256"), ("sjlt", "does not nest"),
                                        ("smaller", "not dropout at an r larger than 8"),
                                        ("missing-seed", r"no seed\(s\) \[1\]")])
def test_nesting_refuses_what_cannot_be_sliced(trained, tmp_path, case, match):
    """A larger-r array of a different model, a compressor that does not nest, a source that is
    not larger or lacks a seed: an error naming it, and nothing looks finished."""
    root = tmp_path / "grads" / ("sjlt" if case == "sjlt" else "dropout")
    comp = "sjlt" if case == "sjlt" else "dropout"
    r_src = 4 if case == "smaller" else 24
    extract_mod.extract(job=_job(trained, root / f"r{r_src}", comp, r_src, seeds=(0,)))
    if case == "other-model":
        m = json.loads((root / "r24" / "manifest.json").read_text())
        m["fingerprint"]["model_sha256"] = "0" * 64
        (root / "r24" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DropinfError, match=match):
        extract_mod.extract_nested(job=_job(trained, root / "r8", comp, 8, seeds=(0, 1) if case == "missing-seed"
                                            else (0,)), source=root / f"r{r_src}")
    assert not (root / "r8" / "manifest.json").exists()


def test_identity_over_budget_is_skipped_with_reason(trained, tmp_path):
    from dropinf.pipeline.score import score

    g = tmp_path / "grads" / "identity" / "full"
    m = extract_mod.extract(job=_job(trained, g, "identity", None, budget_mb=0.01))
    assert m["status"] == "skipped" and "budget" in m["reason"]
    s = score(data=trained / "data.pt", out_dir=tmp_path / "scores" / "orig" / "full", method="orig",
              grads=g / "manifest.json", device="cpu", threads=1, gradients="stored")
    assert s["status"] == "skipped" and "budget" in s["reason"]
    with pytest.raises(DropinfError, match="no --model"):
        score(data=trained / "data.pt", out_dir=tmp_path / "scores" / "tracin" / "full", method="tracin",
              grads=g / "manifest.json", device="cpu", threads=1)


@pytest.mark.parametrize("method,passes", [("tracin", 1), ("datainf", 3), ("lissa", 17), ("orig", None)])
def test_full_space_methods_on_recomputed_gradients_equal_stored(trained, tmp_path, method, passes):
    """Over the identity budget, 'auto' recomputes raw gradients chunk by chunk from the model; the
    scores equal those computed from the stored raw gradients of the same model."""
    from dropinf.pipeline.score import score
    from dropinf.pipeline.storage import open_array

    kw = dict(device="cpu", threads=1)
    stored, skipped = tmp_path / "identity-stored", tmp_path / "identity-skipped"
    extract_mod.extract(job=_job(trained, stored, "identity", None))
    extract_mod.extract(job=_job(trained, skipped, "identity", None, budget_mb=0.01))
    ref = score(data=trained / "data.pt", out_dir=tmp_path / "ref", method=method, grads=stored / "manifest.json", **kw)
    # chunks of 48 rows: the recomputed batches differ from the stored extraction's (256 rows)
    got = score(data=trained / "data.pt", out_dir=tmp_path / "got", method=method, grads=skipped / "manifest.json",
                model=trained / "model.pt", recompute_batch_size=48, **kw)
    assert ref["status"] == got["status"] == "complete" and "recompute" not in ref
    a = np.asarray(open_array(tmp_path / "ref" / "scores.zarr")[...])
    b = open_array(tmp_path / "got" / "scores.zarr")
    np.testing.assert_allclose(b[...], a, rtol=2e-4, atol=1e-6 * np.abs(a).max())
    from dropinf.layout import Layout

    layers = Layout.from_json(json.loads((stored / "manifest.json").read_text())["layout"]).groups("layer")
    assert b.attrs["grads"].startswith("recomputed") and b.attrs["curvature"] == "layer"  # the default
    assert b.attrs["n_blocks"] == len(layers) == open_array(tmp_path / "ref" / "scores.zarr").attrs["n_blocks"]
    if passes is not None:  # one gradient pass over train per solver pass ('paper' damping costs one)
        assert got["recompute"]["train_passes"] == passes
    else:  # Woodbury blocks sweep panel by panel; dense blocks two passes
        assert got["recompute"]["train_passes"] >= 2
    forced = score(data=trained / "data.pt", out_dir=tmp_path / "forced", method=method, model=trained / "model.pt",
                   gradients="recompute", recompute_batch_size=300, **kw)
    np.testing.assert_allclose(open_array(tmp_path / "forced" / "scores.zarr")[...], a, rtol=2e-4,
                               atol=1e-6 * np.abs(a).max())
    assert "score.gradients is 'recompute'" in forced["recompute"]["why"]


def test_recomputed_rows_equal_the_identity_extraction(trained):
    from dropinf.extraction import extract
    from dropinf.pipeline.prepare import model_inputs
    from dropinf.pipeline.train import Batches, load_trained
    from dropinf.recompute import RecomputedGradients

    blob = load_prepared(trained / "data.pt")
    spec, _ = load_trained(trained / "model.pt", blob)
    split = model_inputs(blob["train"])
    full = extract(spec.module, spec.loss_fn, Batches(split, 32), "identity", params=spec.params)
    lazy = RecomputedGradients(spec.module, spec.loss_fn, split, params=spec.params, batch_size=32)
    assert lazy.shape == tuple(full.shape) and lazy.dtype == full.dtype
    assert torch.equal(lazy[64:128], full[64:128])  # same batches: bitwise
    torch.testing.assert_close(lazy[5:77], full[5:77], rtol=1e-5, atol=1e-7)
    assert lazy[10:10].shape == (0, full.shape[1]) and lazy.rows_computed == 64 + 72
    torch.testing.assert_close(lazy.mean(), full.double().mean(0, keepdim=True), rtol=1e-6, atol=1e-9)
    with pytest.raises(DropinfError, match="contiguous row slices"):
        lazy[0:10:2]


def test_finetune_from_pretrained_weights_and_retraining_starts_there(trained, tmp_path):
    """`init`: finetune starts from another run's weights, records path + sha256, and retraining
    rebuilds the same start (lr 0: the retrained model is exactly the pretrained one)."""
    from dropinf.pipeline.evaluate import device_inputs, retrain_metric
    from dropinf.pipeline.train import accuracy, build, load_init, load_trained

    blob = load_prepared(trained / "data.pt")
    data, pre = trained / "data.pt", trained / "model.pt"  # the fixture's model stands in for a pretraining run
    finetune(data=data, out=tmp_path / "ft.pt", metrics_out=tmp_path / "ft.json", model="mlp",
             model_options={"hidden": [16]}, settings={"epochs": 1, "lr": 1e-12}, init=pre, device="cpu", threads=1)
    rec = json.loads((tmp_path / "ft.json").read_text())
    assert rec["init"]["path"] == str(pre) and len(rec["init"]["sha256"]) == 64
    assert rec["metrics"]["n_train"] == 300 and rec["metrics"]["n_test"] == 100
    pre_spec, _ = load_trained(pre, blob)
    ft_spec, saved = load_trained(tmp_path / "ft.pt", blob)
    for a, b in zip(pre_spec.module.parameters(), ft_spec.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # lr 1e-12: still the pretrained weights
    assert rec["metrics"]["initial_test_loss"] == pytest.approx(rec["metrics"]["test_loss"], abs=1e-6)
    # retraining on every row rebuilds from the pretrained weights, not from the seeded init
    kind, acc = retrain_metric(blob, saved, np.arange(300), torch.device("cpu"), device_inputs(blob, "cpu"))
    assert kind == "acc" and acc == pytest.approx(accuracy(pre_spec, blob["test"], "cpu"))
    scratch = build(blob, "mlp", {"hidden": [16]}, 0)
    assert not torch.equal(next(scratch.module.parameters()), next(pre_spec.module.parameters()))

    with pytest.raises(DropinfError, match="do not fit the model"):
        load_init(build(blob, "mlp", {"hidden": [8]}, 0), pre)
    with pytest.raises(DropinfError, match="do not exist"):
        load_init(scratch, tmp_path / "missing.pt")
    with pytest.raises(DropinfError, match="changed since"):
        load_init(scratch, {"path": str(pre), "sha256": "0" * 64})
