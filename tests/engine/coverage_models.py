"""Models whose parameters are used in ways a per-module hook cannot see on its own: functional use,
attention modules reading sub-module weights, shared (1, D) inputs, sequence-first layouts,
keyword calls, free Parameters, recurrent layers. Each takes batch-first data {"x" or "ids", "y"}."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import FunctionalTiedLM

D, T, V, C = 6, 4, 11, 3


class FunctionalTied(FunctionalTiedLM):
    """The architecture suite's F.linear-tied LM at this module's sizes: the embedding weight is used
    twice, once outside any module of its own."""

    def __init__(self):
        super().__init__(vocab=V, dim=D)


class MHA(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(D, D)
        self.att = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.att(h, h, h, need_weights=False)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.head(a.mean(1))


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class LearnedQuery(nn.Module):
    """A tracked Linear applied to a (1, D) learned query, then `.squeeze(0)` (attention pooling)."""

    def __init__(self, squeeze=True):
        super().__init__()
        self.squeeze = squeeze
        self.query = nn.Parameter(torch.randn(1, D))
        self.qproj = nn.Linear(D, D)
        self.kproj = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        k = self.kproj(x)                        # (B, T, D)
        q = self.qproj(self.query)               # (1, D): shared by the batch
        if self.squeeze:
            att = torch.softmax(k @ q.squeeze(0), dim=1)          # (B, T)
        else:
            att = torch.softmax((k * q.unsqueeze(1)).sum(-1), dim=1)  # broadcasting only
        return self.head((att.unsqueeze(-1) * x).sum(1))


class SeqFirst(nn.Module):
    """Transposes to (T, B, D) inside; with T == B a shape-based guess of the batch axis fails."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.ln(torch.tanh(self.fc(x.transpose(0, 1))))  # (T, B, D)
        return self.head(h.mean(0))


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(input=torch.tanh(self.fc(input=x)).mean(1))


class FreeParams(nn.Module):
    """A cls token and a position table: Parameters with no module call of their own."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(torch.randn(T + 1, D))
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(torch.tanh(self.fc(h))[:, 0])


class Scaled(nn.Module):
    """A custom layer with no handler: y = (x * w) @ V + b."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))
        self.v = nn.Parameter(torch.randn(D, D))
        self.b = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return (x * self.w) @ self.v + self.b


class CustomLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.custom = Scaled()
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(torch.tanh(self.custom(self.fc(x))).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell="lstm", batch_first=True, packed=False):
        super().__init__()
        self.packed, self.batch_first = packed, batch_first
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(D, D, batch_first=batch_first)
        self.head = nn.Linear(D, C)

    def forward(self, x, lengths=None):
        if self.packed:
            seq = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h = self.rnn(seq)
            h = h[0] if isinstance(h, tuple) else h
            return self.head(h[-1])
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(h[:, -1] if self.batch_first else h[-1])


def x_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def packed_loss(model, batch):
    return F.cross_entropy(model(batch["x"], batch["lengths"]), batch["y"], reduction="none")


def lm_loss(model, batch):
    logits = model(batch["ids"][:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), batch["ids"][:, 1:], reduction="none").mean(1)


def x_batches(seed=0, n=9, batch_size=4):
    """Batches of 4 with T == 4 (so T == B) and a final short batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(C, (n,), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    return [{"x": x[s:s + batch_size], "y": y[s:s + batch_size], "lengths": lengths[s:s + batch_size]}
            for s in range(0, n, batch_size)]


def ids_batches(seed=0, n=7, batch_size=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (n, T + 1), generator=g)
    return [{"ids": ids[s:s + batch_size]} for s in range(0, n, batch_size)]


class Tempered(nn.Module):
    """An LSTM classifier whose temperature Parameter is read by the loss, outside any module call:
    the whole-model path, where torch.func cannot vmap the LSTM (one example at a time)."""

    def __init__(self):
        super().__init__()
        self.net = Recurrent("lstm")
        self.temp = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.net(x)


def tempered_loss(model, batch):
    return F.cross_entropy(model(batch["x"]) / model.temp, batch["y"], reduction="none")


class FixedBatch(nn.Module):
    """A layer written for batches of exactly 4 (a hard-coded reshape)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return (x * self.w).reshape(4, -1, D)


class FixedBatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.odd = FixedBatch()
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.odd(x).mean(1))
