"""The extract stage with `bucket` (extract.bucket): on variable-length text padded to one global
width, bucketed arrays equal unbucketed ones and batch-size-1 autograd of the fine-tuned model
(float64, identity and dropout, two seeds through one reused extractor); the manifest and the
arrays say what the CUDA-graph setting did."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dropinf.data import DATASETS, TaskData
from dropinf.models import MODELS, ModelSpec
from dropinf.pipeline import extract as extract_mod

from .models import TextNet, randomize, reference_bs1

NAME = "test_variable_text"


class MaskedText(TextNet):
    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, attention_mask)


def logits(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def loss(model, batch):
    return F.cross_entropy(logits(model, batch), batch["labels"], reduction="none")


def variable_text(n_train=14, n_test=6, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        lengths = torch.randint(2, 14, (n,), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        ids = torch.randint(1, 19, (n, width), generator=g).masked_fill(mask == 0, 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, (n,), generator=g)}

    return TaskData(name=NAME, task="classification", train=split(n_train), test=split(n_test), num_classes=3)


def build(data=None, init_seed=0, **_):
    torch.manual_seed(init_seed)
    return ModelSpec(module=randomize(MaskedText(vocab=19), init_seed).double(), loss_fn=loss, logits_fn=logits)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dropinf.pipeline.prepare import prepare_data
    from dropinf.pipeline.train import finetune

    DATASETS[NAME], MODELS[NAME] = variable_text, build
    d = tmp_path_factory.mktemp("bucket")
    try:
        prepare_data(out=d / "data.pt", dataset=NAME, threads=1)
        finetune(data=d / "data.pt", out=d / "model.pt", metrics_out=d / "model.json", model=NAME,
                 settings={"epochs": 1, "batch_size": 4}, device="cpu", threads=1)
        yield d
    finally:
        DATASETS.pop(NAME, None)
        MODELS.pop(NAME, None)


def run(trained, out, compressor, bucket, monkeypatch):
    """The stage's manifest, and the float64 rows its extractor handed to the writers (the arrays
    store float32), per "seed {seed} {split}"."""
    from dropinf.extraction import Extractor

    rows, original = {}, Extractor.run

    def recording(self, loader, sink=None, **kw):
        key = kw["desc"].split(" ", 3)[-1]
        rows[key] = []
        return original(self, loader, sink=lambda s, x: (rows[key].append(x.clone()), sink(s, x)), **kw)

    monkeypatch.setattr(Extractor, "run", recording)
    r = None if compressor == "identity" else 30
    job = extract_mod.ExtractJob(data=trained / "data.pt", model=trained / "model.pt", out_dir=out,
                                 compressor=compressor, r=r, seeds=(0, 3), device="cpu", threads=1, batch_size=4,
                                 bucket=bucket)
    manifest = extract_mod.extract(job=job)
    monkeypatch.setattr(Extractor, "run", original)
    return manifest, {k: torch.cat(v) for k, v in rows.items()}


@pytest.mark.parametrize("compressor", ["identity", "dropout"])
def test_bucketed_stage_rows_equal_unbucketed_and_autograd(trained, tmp_path, compressor, monkeypatch):
    import dropinf
    from dropinf.pipeline.prepare import load_prepared, model_inputs
    from dropinf.pipeline.train import load_trained

    MODELS[NAME] = build  # the stage rebuilds the model by name
    plain, plain_rows = run(trained, tmp_path / "plain", compressor, 0, monkeypatch)
    bucketed, rows = run(trained, tmp_path / "bucketed", compressor, 8, monkeypatch)
    graphs = bucketed["cuda_graph"]
    assert graphs["bucket"] == 8 and graphs["mode"] == "auto" and graphs["used"] is False  # CPU: eager
    blob = load_prepared(trained / "data.pt")
    spec, _ = load_trained(trained / "model.pt", blob)
    names = [n for n, _ in spec.module.named_parameters()]
    seeds = [None] if compressor == "identity" else [0, 3]
    assert sorted(rows) == sorted(f"seed {s} {sp}" for s in seeds for sp in ("train", "test"))
    for seed in seeds:
        for split in ("train", "test"):
            key = f"seed {seed} {split}"
            ref = reference_bs1(spec.module, loss, [model_inputs(blob[split])], names)
            if compressor == "dropout":
                ref = ref[:, dropinf.compressor("dropout", dim=ref.shape[1], r=30, seed=seed).indices]
            assert rows[key].dtype == torch.float64
            assert ((rows[key] - plain_rows[key]).norm() / plain_rows[key].norm()).item() < 1e-10
            assert ((rows[key] - ref).norm() / ref.norm()).item() < 1e-10
            stored = extract_mod.load_split(tmp_path / "bucketed", bucketed, str(seed), split)
            assert stored.attrs["bucket"] == 8 and stored.attrs["cuda_graph"] == "auto"
            assert np.allclose(np.asarray(stored[:]), rows[key].numpy(), rtol=1e-6, atol=0)
