"""ResNet-9 (the 9-layer CIFAR ResNet of Page's DAWNBench entry, as used by TRAK/LoGra-style
retraining experiments): prep conv; conv + max-pool + a residual pair; conv + max-pool;
conv + max-pool + a residual pair; global max-pool; linear; logits scaled by `scale` (0.125).

Every conv is 3x3, stride 1, padding 1, no bias, followed by BatchNorm and ReLU. `channels`
gives the four widths (default 64, 128, 256, 512: 6.6M parameters); `width=0.5` halves them.
Input channels and classes come from the data (1 for Fashion-MNIST, 3 for CIFAR-10).

BatchNorm mixes the examples of a batch in training mode, so per-example gradients are only
per-example in eval mode (running statistics): extraction must call `model.eval()`.
`norm="group"` (GroupNorm) or "none" gives a network without that caveat.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ModelSpec, register_model
from ..errors import DropinfError
from .lm import seeded


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(min(32, c // 4) or 1, c)
    if kind == "none":
        return nn.Identity()
    raise DropinfError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


def conv_block(c_in: int, c_out: int, norm: str = "batch", pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out), nn.ReLU(inplace=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(conv_block(c, c, norm), conv_block(c, c, norm))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels=(64, 128, 256, 512),
                 norm: str = "batch", scale: float = 0.125):
        super().__init__()
        c0, c1, c2, c3 = (int(c) for c in channels)
        self.prep = conv_block(in_channels, c0, norm)
        self.layer1 = conv_block(c0, c1, norm, pool=True)
        self.res1 = Residual(c1, norm)
        self.layer2 = conv_block(c1, c2, norm, pool=True)
        self.layer3 = conv_block(c2, c3, norm, pool=True)
        self.res3 = Residual(c3, norm)
        self.fc = nn.Linear(c3, num_classes, bias=False)
        self.scale = float(scale)

    def forward(self, x):
        x = self.res1(self.layer1(self.prep(x)))
        x = self.res3(self.layer3(self.layer2(x)))
        x = torch.amax(x, dim=(2, 3))  # global max-pool
        return self.fc(x) * self.scale


def image_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    try:
        return model(batch["x"])
    except KeyError:
        raise DropinfError(f"image batch needs 'x'; got keys {sorted(batch)}") from None


def image_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(image_logits(model, batch).float(), batch["labels"], reduction="none")


@register_model("resnet9")
def resnet9(data=None, channels=(64, 128, 256, 512), width: float = 1.0, norm: str = "batch", scale: float = 0.125,
            in_channels: int | None = None, num_classes: int | None = None, init_seed: int = 0,
            params: list[str] | None = None) -> ModelSpec:
    if len(channels) != 4:
        raise DropinfError(f"resnet9 channels must be 4 widths, got {channels}")
    channels = [max(1, int(round(c * float(width)))) for c in channels]
    if in_channels is None:
        x = getattr(data, "train", {}).get("x") if data is not None else None
        in_channels = int(x.shape[1]) if x is not None and x.dim() == 4 else 3
    num_classes = int(num_classes or getattr(data, "num_classes", None) or 10)
    with seeded(init_seed):
        model = ResNet9(in_channels, num_classes, channels, norm, scale)
    return ModelSpec(module=model, loss_fn=image_loss, logits_fn=image_logits, params=params)
