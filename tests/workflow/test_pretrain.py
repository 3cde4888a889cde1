"""The `pretrain` stage through Snakemake on real offline data: a GPT-2-architecture model trained on
five Austen novels, fine-tuned on the sixth, scored (tracin/datainf on recomputed raw gradients,
dropout) and retrained from the pretrained weights; perplexity in the report."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

TINY = {
    "experiment": "austen-tiny",
    "pretrain": {"dataset": {"name": "austen_pretrain",
                             "options": {"holdout": "emma", "seq_len": 32, "n_test": 16, "n_train": 1500}},
                 "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "optimizer": "adamw", "seed": 0}},
    "dataset": {"name": "austen", "options": {"holdout": "emma", "seq_len": 32, "n_train": 60, "n_test": 8}},
    "model": {"name": "gpt2", "options": {"config": "tiny"}},
    "finetune": {"epochs": 1, "batch_size": 8, "lr": 0.001, "optimizer": "adamw", "seed": 0},
    "methods": ["random", "tracin", "datainf", "dropout"],
    "r": [16],
    "seeds": [0, 1],
    "threads": 1,
    "extract": {"batch_size": 32, "identity_budget_mb": 1},  # raw gradients (60 x 0.38M x 4 B) over budget
    "score": {"recompute_batch_size": 16},
    "evaluate": {"retrain": True, "retrain_fractions": [0.1]},
}


@pytest.fixture(scope="module")
def austen_run(wf, tmp_path_factory, request):
    pytest.importorskip("tokenizers")
    from dropinf.data.cache import debian_data_dir
    from dropinf.errors import DropinfError

    try:
        debian_data_dir("r-cran-janeaustenr")
    except DropinfError as e:
        pytest.skip(f"offline source unavailable: {e}")
    workdir = tmp_path_factory.mktemp("austen")
    path = wf.write_config(workdir / "c.yaml", TINY)
    wf.snakemake(workdir, config=path)
    return workdir, path, workdir / "results" / "austen-tiny"


def test_finetune_starts_from_the_pretrained_model(austen_run):
    _, _, res = austen_run
    pre = json.loads((res / "pretrain" / "pretrain.json").read_text())
    ft = json.loads((res / "model" / "finetune.json").read_text())
    assert pre["init"] is None and ft["init"]["path"] == "results/austen-tiny/pretrain/model.pt"
    # the pretrained model already beats a uniform guess over the 4,096 tokens on the held-out novel
    assert ft["metrics"]["initial_test_loss"] < math.log(4096) - 0.5
    assert ft["metrics"]["n_train"] == 60


def test_full_space_methods_recomputed_and_perplexity_reported(austen_run):
    _, _, res = austen_run
    skipped = json.loads((res / "grads" / "identity" / "full" / "manifest.json").read_text())
    assert skipped["status"] == "skipped"
    for method in ("tracin", "datainf"):
        m = json.loads((res / "scores" / method / "full" / "manifest.json").read_text())
        assert m["status"] == "complete" and m["recompute"]["train_passes"] == (1 if method == "tracin" else 3)
    df = pd.read_csv(res / "summary.csv")
    ret = df[df.metric == "retrain_test_loss@0.1"]
    assert sorted(ret.method.unique()) == ["datainf", "dropout", "random", "tracin"]
    assert (df.metric == "recompute_seconds").sum() == 2
    table = (res / "report" / "retrain_table.md").read_text()
    assert "Test perplexity" in table and "6 removed (10.0%)" in table
    base = math.exp(float(df[(df.method == "finetune") & (df.metric == "test_loss")].value.iloc[0]))
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in table.splitlines() if line.startswith("|"))}
    assert rows["none (all training examples)"][:2] == ["", f"{base:.3f}"]


def test_changing_the_pretraining_reruns_everything_downstream(austen_run, wf):
    workdir, path, _ = austen_run
    cfg = dict(TINY, pretrain={**TINY["pretrain"], "train": {**TINY["pretrain"]["train"], "lr": 0.002}})
    changed = wf.write_config(workdir / "c2.yaml", cfg)
    assert "Nothing to be done" in wf.snakemake(workdir, "-n", config=path).stdout
    out = wf.snakemake(workdir, "-n", config=changed).stdout
    for rule in ("pretrain", "finetune", "extract", "score", "evaluate"):
        assert f"rule {rule}:" in out, rule
    assert "rule prepare_pretrain_data:" not in out and "rule prepare_data:" not in out
