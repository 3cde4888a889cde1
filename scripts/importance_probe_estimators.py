"""Mislabel-detection AUC of importance_dropout by probe estimator and probe size (CPU).

Two settings: the embedded default (digits MLP from the workflow: run
`snakemake --cores 2 results/digits-mlp/grads/identity/full/manifest.json` first) and a small
sequence classifier trained here (synthetic token sequences, 20% flipped labels; its Linear layers
act on every position, so the exact and diagonal estimators differ). Raw gradients, exact r-space
solve, one global block; probe seeds 0-2 pooled with compressor seeds 0-4 (15 values per cell).

    PYTHONPATH=src python scripts/importance_probe_estimators.py --out results/importance_probe_estimators.csv
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import dropinf
from dropinf.layout import Layout
from dropinf.pipeline.metrics import mislabel_auc as roc_auc
from dropinf.probe import second_moments


class SeqNet(nn.Module):
    """Embedding -> per-position Linear -> tanh -> per-position Linear -> masked mean -> head."""

    def __init__(self, vocab=40, dim=12, hidden=24, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask):
        h = self.fc2(torch.tanh(self.fc1(self.emb(ids))))
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def seq_loss(model, batch):
    return F.cross_entropy(model(batch["ids"], batch["mask"]), batch["y"], reduction="none")


def seq_task(n_train=800, n_test=200, T=12, vocab=40, classes=3, noise=0.2, seed=0):
    """Label: the class whose token group (token % classes) is most frequent; 20% of training labels flipped."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids = torch.randint(1, vocab, (n, T), generator=g).masked_fill(~mask, 0)
    counts = torch.stack([((ids % classes == c) & mask).sum(1) for c in range(classes)], 1).float()
    y = (counts + 0.1 * torch.rand(n, classes, generator=g)).argmax(1)
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flip = torch.randperm(n_train, generator=g)[: int(noise * n_train)]
    flipped[flip] = True
    y_train = y[:n_train].clone()
    y_train[flip] = (y_train[flip] + torch.randint(1, classes, (flip.numel(),), generator=g)) % classes
    train = {"ids": ids[:n_train], "mask": mask[:n_train], "y": y_train}
    test = {"ids": ids[n_train:], "mask": mask[n_train:], "y": y[n_train:]}
    return train, test, flipped.numpy()


def batches(data, B=64):
    n = data["y"].shape[0]
    return [{k: v[s:s + B] for k, v in data.items()} for s in range(0, n, B)]


def train_seq(train, epochs=40, seed=0):
    torch.manual_seed(seed)
    model = SeqNet().double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for b in batches(train):
            opt.zero_grad()
            seq_loss(model, b).mean().backward()
            opt.step()
    return model.eval()


def digits_setting(res="results/digits-mlp"):
    import zarr

    from dropinf.pipeline.prepare import load_prepared, model_inputs
    from dropinf.pipeline.train import Batches, load_trained

    blob = load_prepared(f"{res}/data/dataset.pt")
    spec, _ = load_trained(f"{res}/model/model.pt", blob)

    def raw(s):
        return torch.from_numpy(np.asarray(zarr.open_array(f"{res}/grads/identity/full/{s}.zarr")[...])).double()
    loader = Batches(model_inputs(blob["train"]), 256)
    return spec.module, spec.loss_fn, loader, raw("train"), raw("test"), blob["train"]["flipped"].numpy()


def seq_setting():
    train, test, flipped = seq_task()
    model = train_seq(train)
    tb = batches(train)
    G = dropinf.extract(model, seq_loss, tb, "identity").double()
    T = dropinf.extract(model, seq_loss, batches(test), "identity").double()
    return model, seq_loss, tb, G, T, flipped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=["digits", "seq"])
    ap.add_argument("--probes", type=int, nargs="+", default=[256, 64, 32])
    ap.add_argument("--r", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--probe-seeds", type=int, default=3)
    ap.add_argument("--out", default="results/importance_probe_estimators.csv")
    a = ap.parse_args()
    rows = []
    for setting in a.settings:
        model, loss, loader, G, T, flipped = digits_setting() if setting == "digits" else seq_setting()
        layout = Layout.from_model(model)
        print(f"{setting}: n={G.shape[0]} d={G.shape[1]} flipped={flipped.mean():.2f} "
              f"orig AUC {roc_auc(flipped, dropinf.influence(G, T, 'orig').numpy()):.3f}", flush=True)
        for r in a.r:
            for seed in range(a.seeds):
                c = dropinf.compressor("dropout", layout.dim, r, seed=seed, layout=layout)
                auc = roc_auc(flipped, dropinf.influence(c.compress(G), c.compress(T), "exact").numpy())
                rows.append(dict(setting=setting, method="dropout", estimator="", probe=0, probe_seed=-1, r=r,
                                 seed=seed, auc=auc, probe_seconds=0.0))
        for est in ("exact", "diagonal"):
            for probe in a.probes:
                for ps in range(a.probe_seeds):
                    t0 = time.perf_counter()
                    w = second_moments(model, loss, loader, probe, ps, estimator=est)
                    secs = time.perf_counter() - t0
                    for r in a.r:
                        for seed in range(a.seeds):
                            c = dropinf.compressor("importance_dropout", layout.dim, r, seed=seed, layout=layout,
                                                   weights=w)
                            auc = roc_auc(flipped, dropinf.influence(c.compress(G), c.compress(T), "exact").numpy())
                            rows.append(dict(setting=setting, method="importance_dropout", estimator=est, probe=probe,
                                             probe_seed=ps, r=r, seed=seed, auc=auc, probe_seconds=secs))
        df = pd.DataFrame(rows)
        df.to_csv(a.out, index=False)
    df = pd.DataFrame(rows)
    table = (df.groupby(["setting", "method", "estimator", "probe", "r"]).auc.agg(["mean", "std", "count"])
             .reset_index())
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(df.groupby(["setting", "estimator", "probe"]).probe_seconds.mean().to_string())


if __name__ == "__main__":
    main()
