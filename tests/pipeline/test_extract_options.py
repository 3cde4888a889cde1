"""Compressor options completed from the data (`Compressor.prepare_options`): once per extract job,
from the training split, the same options for every seed; fingerprints keep the configured ones."""
from __future__ import annotations

import pytest
import torch
import zarr

from dropinf.compressors import COMPRESSORS
from dropinf.compressors.dropout import Dropout, permutation_prefix
from dropinf.pipeline import extract as extract_mod


class DataSeeded(Dropout):
    """Dropout whose kept coordinates depend on the training split (its number of rows)."""

    name = "test_data_seeded"
    nests_in_r = False
    calls: list = []

    def __init__(self, dim, r, seed=0, layout=None, shift: int = 0, scale: float = 1.0):
        super().__init__(dim, r, seed + int(shift), layout)
        self.scale = scale

    @classmethod
    def prepare_options(cls, options, *, model, loss_fn, train_loader, params=None, device=None):
        rows = sum(next(iter(b.values())).shape[0] for b in train_loader)
        cls.calls.append({"rows": rows, "device": str(device), "model": type(model).__name__})
        return {**options, "shift": rows}


COMPRESSORS.pop(DataSeeded.name)  # registered by its definition: only while a test uses it


@pytest.fixture
def registered():
    DataSeeded.calls.clear()
    COMPRESSORS[DataSeeded.name] = DataSeeded
    yield DataSeeded
    COMPRESSORS.pop(DataSeeded.name, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_digits_mlp):
    d = train_digits_mlp(tmp_path_factory.mktemp("options"), max_train=120, max_test=40, hidden=(8,), epochs=1)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2])
def test_prepared_once_per_job_from_the_training_split(trained, tmp_path, registered, shards):
    job = extract_mod.ExtractJob(data=trained / "data.pt", model=trained / "model.pt", out_dir=tmp_path / "x",
                                 compressor=DataSeeded.name, r=8, seeds=(0, 3), device="cpu", threads=1,
                                 batch_size=16, options={"scale": 2.0})
    m = extract_mod.extract(job=job, shards=shards)
    assert m["status"] == "complete"
    assert registered.calls == [{"rows": 120, "device": "cpu", "model": registered.calls[0]["model"]}]
    assert m["fingerprint"]["options"] == {"scale": 2.0}  # configured, not prepared
    for seed in (0, 3):
        for split in ("train", "test"):
            a = zarr.open_array(str(tmp_path / "x" / f"seed{seed}" / f"{split}.zarr"), mode="r")
            kept = permutation_prefix(m["dim"], 8, seed + 120)  # every seed built from the prepared shift
            assert a.attrs["compressor_attrs"]["indices"] == kept.tolist()
            assert a.attrs["options"] == {"scale": 2.0}


def test_default_prepare_options_returns_a_copy():
    opts = {"mask_factor": 2}
    out = COMPRESSORS["sjlt"].prepare_options(opts, model=torch.nn.Linear(2, 2), loss_fn=None, train_loader=[])
    assert out == opts and out is not opts
