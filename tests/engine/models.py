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
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
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


# ---- architectures suite (tests/engine/test_architectures.py) ---------------------------------

def single_examples(batch):
    """The examples of a batch-major batch, one at a time, each as a batch of size 1."""
    leaves = [t for t in batch.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    for i in range(leaves[0].shape[0]):
        yield {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


def reference_bs1(model, loss_fn, batches, names) -> torch.Tensor:
    """Per-example gradients by plain autograd on batches of size 1: no batching can mix examples."""
    return reference_grads(model, loss_fn, [one for b in batches for one in single_examples(b)], names)


def token_loss(logits, labels):
    """Mean cross-entropy per example over the labelled positions (-100 = ignored)."""
    tok = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return tok.sum(1) / (labels != -100).sum(1).clamp(min=1)


def padded_tokens(vocab, n=6, T=7, seed=0):
    """Right-padded variable-length token ids (B, T) and their attention mask; lengths 2..T."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    lengths[0] = T  # at least one full row
    ids = torch.randint(3, vocab, (n, T), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def split(data: dict, sizes=(3, 2, 1)) -> list[dict]:
    """A full batch, a short one and one of size 1."""
    out, s = [], 0
    for k in sizes:
        out.append({key: v[s:s + k] for key, v in data.items()})
        s += k
    return out


class LearnedQueryPool(nn.Module):
    """A tracked Linear applied to a (1, D) learned query that attends over the sequence."""

    def __init__(self, vocab=11, dim=5, classes=3, squeeze=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.query = nn.Parameter(torch.randn(1, dim))
        self.q = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.squeeze = squeeze

    def forward(self, ids, mask):
        h = self.emb(ids)                       # (B, T, D)
        q = self.q(self.query)                  # (1, D): one query for every example
        if self.squeeze:
            q = q.squeeze(0)                    # (D,)
            scores = h @ q                      # (B, T)
        else:
            scores = (h @ q.T).squeeze(-1)
        att = scores.masked_fill(mask == 0, float("-inf")).softmax(-1)
        return self.head((att.unsqueeze(-1) * h).sum(1))


class FunctionalTiedLM(nn.Module):
    """Output layer written F.linear(h, self.emb.weight): the table is read outside its module."""

    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, ids):
        return F.linear(torch.tanh(self.mix(self.emb(ids))), self.emb.weight)


class SequenceFirst(nn.Module):
    """Takes (T, B, D) inputs: the batch is dim 1 (the suite uses T == B for the first batch)."""

    def __init__(self, dim=4, classes=3):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):                       # x: (T, B, D)
        return self.head(torch.tanh(self.fc(x)).mean(0))


class KeywordCall(nn.Module):
    """Calls its Linear as fc(input=x)."""

    def __init__(self, dim=4, classes=3):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(input=torch.tanh(self.fc(input=x)))


class MHANet(nn.Module):
    """Embedding → nn.MultiheadAttention (self or cross, optional separate k/v dims) → pool → head."""

    def __init__(self, vocab=11, dim=6, heads=2, classes=3, batch_first=True, need_weights=False,
                 causal_mask=False, cross_kdim=None, use_weights=False, cross=False, bias=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        kd = cross_kdim
        self.mem = nn.Linear(dim, kd or dim) if kd or cross else None  # keys/values from a second input
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first, kdim=kd, vdim=kd, bias=bias)
        self.head = nn.Linear(dim, classes)
        self.batch_first, self.need_weights, self.causal_mask = batch_first, need_weights, causal_mask
        self.use_weights = use_weights

    def forward(self, ids, mask):
        x = self.emb(ids)                                   # (B, T, D)
        kv = torch.tanh(self.mem(x)) if self.mem is not None else x
        T = ids.shape[1]
        attn_mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids.device), 1) if self.causal_mask else None
        if not self.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        q = x
        k = v = kv if self.mem is not None else x
        out, w = self.attn(q, k, v, key_padding_mask=mask == 0, need_weights=self.need_weights,
                           attn_mask=attn_mask)
        if not self.batch_first:
            out = out.transpose(0, 1)
        m = mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * m).sum(1) / m.sum(1)
        if self.use_weights:                                # attention weights feed the loss too
            pooled = pooled + w[:, 0, :1].to(out.dtype)
        return self.head(pooled)


class EncoderLayerNet(nn.Module):
    """Embedding → nn.TransformerEncoderLayer (batch_first, key padding mask) → masked mean → head."""

    def __init__(self, vocab=11, dim=6, classes=3, norm_first=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=10, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask):
        h = self.layer(self.emb(ids), src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class RecurrentNet(nn.Module):
    """Embedding → LSTM or GRU (batch_first), plain over the padded batch or packed by length."""

    def __init__(self, kind="lstm", packed=False, vocab=11, dim=4, hidden=5, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)
        self.packed = packed

    def forward(self, ids, mask):
        x = self.emb(ids)
        if self.packed:
            lengths = mask.sum(1).cpu()
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(x)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        else:
            out, _ = self.rnn(x)
        m = mask.unsqueeze(-1).to(out.dtype)
        return self.head((out * m).sum(1) / m.sum(1))


class Conv1dNet(nn.Module):
    """nn.Conv1d with circular padding, one with stride and dilation, a grouped one with padding="same"
    over an even extent, then a Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv1d(4, 2, 2, stride=2, dilation=2, bias=False)
        self.grouped = nn.Conv1d(2, 4, 4, groups=2, padding="same")  # even extent: padded 1 left, 2 right
        self.fc = nn.Linear(4 * 5, classes)

    def forward(self, x):                       # (B, 3, 11)
        return self.fc(self.grouped(torch.tanh(self.c2(torch.tanh(self.c1(x))))).flatten(1))


class GroupedConvNet(nn.Module):
    """Depthwise Conv2d (groups = channels, reflect padding) and a grouped one (groups=2), then a Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.pw = nn.Conv2d(2, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect")
        self.gc = nn.Conv2d(4, 6, (3, 2), groups=2, stride=2, dilation=(1, 2), bias=False)
        self.fc = nn.Linear(6 * 3 * 3, classes)

    def forward(self, x):                       # (B, 2, 7, 8)
        return self.fc(self.gc(torch.tanh(self.dw(torch.tanh(self.pw(x))))).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.down(x))


class TinyResNet(nn.Module):
    """Stem → two residual stages (one with a strided 1x1 shortcut) → global pool → Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 6, 2))
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


class OPTPositions(nn.Module):
    """Token Embedding + OPT's learned positional embedding, called as OPT calls it (attention mask
    first, positions computed inside its forward) → masked mean → head."""

    def __init__(self, vocab=11, dim=4, classes=3, max_pos=8):
        super().__init__()
        from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

        self.tok = nn.Embedding(vocab, dim)
        self.pos = OPTLearnedPositionalEmbedding(max_pos, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask):
        h = torch.tanh(self.tok(ids) + self.pos(mask, 0))
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class BatchStatsNet(nn.Module):
    """BatchNorm without running statistics: batch statistics couple the examples of a batch."""

    def __init__(self, classes=3):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.fc = nn.Linear(3, classes)

    def forward(self, x):
        return self.fc(self.bn(self.c(x)).mean((2, 3)))
