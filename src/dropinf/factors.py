"""Per-example gradient factors: the pieces hooks capture, before any gradient is formed.

A matrix parameter's per-example gradient is  g[b] = sum_t R[b, t, :] (outer) C[b, t, :]  where
R and C are factors of shape (B, T, n). Factors are lazy so compressors read only what they
keep: a one-hot factor (embedding lookups) gathers by comparing ids, an unfold factor (Conv2d)
reads only the sampled input taps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float64 stays float64 (reference checks), everything else float32."""
    return t if t.dtype == torch.float64 else t.float()


class Factor:
    batch: int
    length: int  # T: positions summed over
    width: int   # n

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, len(idx)) columns `idx`, in the input's dtype (callers reduce in float32)."""
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        """(B, T, n) in the accumulation dtype."""
        return acc(self.gather(torch.arange(self.width, device=self.device)))

    def project(self, P: torch.Tensor) -> torch.Tensor:
        """(B, T, k) = full() @ P.T for P of shape (k, n)."""
        full = self.full()
        return full @ P.T.to(full.dtype)


class Dense(Factor):
    def __init__(self, x: torch.Tensor):
        if x.dim() == 2:
            x = x.unsqueeze(1)
        self.x = x.flatten(1, -2) if x.dim() > 3 else x  # 3-D stays a view (δ is often non-contiguous)
        self.batch, self.length, self.width = self.x.shape
        self.device = x.device

    def gather(self, idx):
        return self.x.index_select(-1, idx)

    def full(self):
        return acc(self.x)


class OneHot(Factor):
    """Rows of an embedding table selected by token ids (B, T)."""

    def __init__(self, ids: torch.Tensor, num: int, dtype: torch.dtype):
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.ids = ids.reshape(ids.shape[0], -1)
        self.batch, self.length = self.ids.shape
        self.width = num
        self.device = ids.device

    def gather(self, idx):
        return (self.ids.unsqueeze(-1) == idx.view(1, 1, -1)).to(self.dtype)

    def project(self, P):
        return P.T.to(self.dtype)[self.ids]


class Unfold(Factor):
    """im2col of a Conv2d input, columns ordered (channel, ky, kx) as in the weight's flattening."""

    def __init__(self, x: torch.Tensor, conv: torch.nn.Conv2d):
        self.conv = conv
        kh, kw = conv.kernel_size
        ph, pw = conv.padding if not isinstance(conv.padding, str) else _same_padding(conv)
        self.x = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
        sh, sw = conv.stride
        dh, dw = conv.dilation
        H, W = self.x.shape[-2:]
        self.oh = (H - dh * (kh - 1) - 1) // sh + 1
        self.ow = (W - dw * (kw - 1) - 1) // sw + 1
        self.batch, self.length = x.shape[0], self.oh * self.ow
        self.width = x.shape[1] * kh * kw
        self.device = x.device

    def gather(self, idx):
        kh, kw = self.conv.kernel_size
        sh, sw = self.conv.stride
        dh, dw = self.conv.dilation
        c, rem = idx // (kh * kw), idx % (kh * kw)
        ky, kx = rem // kw, rem % kw
        ys = ky[:, None] * dh + sh * torch.arange(self.oh, device=idx.device)[None, :]  # (k, oh)
        xs = kx[:, None] * dw + sw * torch.arange(self.ow, device=idx.device)[None, :]  # (k, ow)
        taps = self.x[:, c[:, None, None], ys[:, :, None], xs[:, None, :]]  # (B, k, oh, ow)
        return taps.flatten(2).transpose(1, 2)

    def full(self):
        cols = F.unfold(self.x, self.conv.kernel_size, dilation=self.conv.dilation, stride=self.conv.stride)
        return acc(cols.transpose(1, 2))

    def project(self, P):
        kh, kw = self.conv.kernel_size
        w = P.to(self.x.dtype).view(P.shape[0], -1, kh, kw)
        y = F.conv2d(self.x, w, stride=self.conv.stride, dilation=self.conv.dilation)
        return acc(y.flatten(2).transpose(1, 2))


def _same_padding(conv):
    if conv.padding == "valid":
        return (0, 0)
    # padding="same" with stride 1: total padding d*(k-1), split evenly (odd totals unsupported)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError("Conv2d padding='same' with an even kernel extent")
        pads.append(total // 2)
    return tuple(pads)
