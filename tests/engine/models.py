"""Small models covering every fused layer type, with per-example losses and reference gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextNet(nn.Module):
    """Embedding (padding_idx) → LayerNorm → Linear → GELU → HF Conv1D → RMSNorm → masked mean → head."""

    def __init__(self, vocab=13, dim=6, classes=3):
        super().__init__()
        import pytest

        Conv1D = pytest.importorskip("transformers.pytorch_utils", reason="Hugging Face Conv1D needs transformers: "
                                     "pip install -e '.[hf]'").Conv1D

        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim + 1)
        self.conv1d = Conv1D(dim, dim + 1)  # nf=dim outputs, nx=dim+1 inputs
        self.rms = nn.RMSNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask):
        h = self.conv1d(F.gelu(self.fc(self.ln(self.emb(ids)))))
        h = self.rms(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def text_loss(model, batch):
    return F.cross_entropy(model(batch["ids"], batch["mask"]), batch["y"], reduction="none")


def text_batches(n=7, T=5, vocab=13, classes=3, batch_size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    ids = torch.randint(1, vocab, (n, T), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)  # padded, variable-length sequences
    y = torch.randint(classes, (n,), generator=g)
    data = {"ids": ids, "mask": mask, "y": y}
    return [{k: v[s:s + batch_size] for k, v in data.items()} for s in range(0, n, batch_size)]


class ConvNet(nn.Module):
    """Conv2d (padding, stride, dilation) → eval BatchNorm → in-place ReLU → Conv2d → Linear."""

    def __init__(self, classes=4):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2), bias=False)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)), inplace=True)
        return self.fc(self.c2(h).flatten(1))


def conv_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def conv_batches(n=5, batch_size=2, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 7, 8, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    return [{"x": x[s:s + batch_size], "y": y[s:s + batch_size]} for s in range(0, n, batch_size)]


class TiedLM(nn.Module):
    """Embedding weight shared with the output Linear (weight tying), plus a custom Parameter used
    functionally (no fused path: exercises the torch.func fallback)."""

    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.scale = nn.Parameter(torch.ones(dim))
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids) * self.scale)))


def lm_loss(model, batch):
    logits = model(batch["ids"][:, :-1])
    tok = F.cross_entropy(logits.transpose(1, 2), batch["ids"][:, 1:], reduction="none")
    return tok.mean(1)


def lm_batches(n=5, T=6, vocab=11, batch_size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (n, T), generator=g)
    return [{"ids": ids[s:s + batch_size]} for s in range(0, n, batch_size)]


def randomize(model, seed=0):
    """Non-trivial BatchNorm running statistics and weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
            if isinstance(m, nn.RMSNorm) or isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return model


def reference_grads(model, loss_fn, batches, names) -> torch.Tensor:
    """Per-example gradients by plain autograd, one example's loss at a time (the slow, obvious way)."""
    params = dict(model.named_parameters())
    tracked = [params[n] for n in names]
    model.eval()
    rows = []
    for batch in batches:
        losses = loss_fn(model, batch)
        for i in range(losses.shape[0]):
            gs = torch.autograd.grad(losses[i], tracked, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(gs, tracked)]))
    return torch.stack(rows)
