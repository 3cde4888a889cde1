"""The flat coordinate space of tracked parameters.

Coordinate k of a per-example gradient is an entry of the concatenation of the tracked
parameters, in `model.named_parameters()` order, each flattened row-major. Every compressor
and solver speaks in these coordinates; `Layout` is the single place that defines them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from typing import Iterable, Sequence

import torch

from .errors import DropinfError


@dataclass(frozen=True)
class Slot:
    """One tracked parameter tensor inside the flat coordinate space."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) view used by factored compressors: dim 0 against the rest; vectors are (n, 1)."""
        if len(self.shape) == 0:
            return (1, 1)
        return (self.shape[0], prod(self.shape[1:]))


#: Curvature structures, finest first: one block per parameter tensor, per layer (module), or one.
CURVATURES = ("tensor", "layer", "global")

# peft keeps a LoRA pair as child modules (q.lora_A.default.weight) or parameter dicts
# (emb.lora_embedding_A.default); both belong to the layer they adapt (q, emb).
_PEFT_PART = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.[^.]+)?(?:\.(?:weight|bias))?$")


def check_curvature(curvature: str, what: str = "curvature") -> str:
    if curvature not in CURVATURES:
        raise DropinfError(f"{what} must be one of {', '.join(CURVATURES)}, got {curvature!r}")
    return curvature


def layer_of(name: str) -> str:
    """The module a parameter belongs to: its name without the last part (weight, bias, ...), and a
    LoRA matrix's name without its lora_A/lora_B part, so A and B of one adapted module are one layer."""
    stripped = _PEFT_PART.sub("", name)
    if stripped != name:
        return stripped
    return name.rpartition(".")[0] or "(root)"


class Layout:
    """Ordered slots; `blocks` are the (start, stop) column ranges, one per parameter tensor;
    `groups(curvature)` groups the slots into curvature blocks (tensor, layer or global)."""

    def __init__(self, slots: Sequence[Slot]):
        self.slots = list(slots)
        self.dim = self.slots[-1].stop if self.slots else 0
        self._by_name = {s.name: s for s in self.slots}

    @classmethod
    def from_shapes(cls, named_shapes: Iterable[tuple[str, Sequence[int]]]) -> "Layout":
        slots, offset = [], 0
        for name, shape in named_shapes:
            slot = Slot(name, tuple(int(s) for s in shape), offset)
            slots.append(slot)
            offset = slot.stop
        return cls(slots)

    @classmethod
    def from_model(cls, model: torch.nn.Module, params=None) -> "Layout":
        return cls.from_shapes((n, p.shape) for n, p in select_parameters(model, params))

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return [(s.offset, s.stop) for s in self.slots]

    def groups(self, curvature: str = "layer") -> list[tuple[str, list[int]]]:
        """(label, slot indices) per curvature block, in order of first appearance. 'layer': the slots
        whose parameters belong to one module (see `layer_of`); 'tensor': one per slot; 'global': one."""
        check_curvature(curvature)
        if curvature == "global":
            return [("all parameters", list(range(len(self.slots))))]
        if curvature == "tensor":
            return [(s.name, [i]) for i, s in enumerate(self.slots)]
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.slots):
            out.setdefault(layer_of(s.name), []).append(i)
        return list(out.items())

    def coordinate_blocks(self, curvature: str = "layer") -> dict[str, torch.Tensor]:
        """label -> the flat coordinates of each curvature block (1-D int64), for raw gradients."""
        return {label: torch.cat([torch.arange(self.slots[i].offset, self.slots[i].stop) for i in idx])
                for label, idx in self.groups(curvature)}

    def __getitem__(self, name: str) -> Slot:
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self.slots)

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in self.slots]

    @classmethod
    def from_json(cls, items: list[dict]) -> "Layout":
        return cls([Slot(i["name"], tuple(i["shape"]), int(i["offset"])) for i in items])

    def locate(self, flat: torch.Tensor) -> torch.Tensor:
        """Slot index of each flat coordinate."""
        starts = torch.tensor([s.offset for s in self.slots], dtype=torch.long)
        return torch.searchsorted(starts, flat.to(torch.long), right=True) - 1


def _is_peft_model(model: torch.nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def select_parameters(model: torch.nn.Module, params=None) -> list[tuple[str, torch.nn.Parameter]]:
    """The tracked parameters, in `named_parameters()` order.

    params=None: the LoRA matrices of a peft model, else every trainable parameter.
    params=list of names (or Parameter objects): exactly those, in model order.
    """
    named = list(model.named_parameters())
    if params is None:
        if _is_peft_model(model):
            chosen = [(n, p) for n, p in named if "lora_" in n and p.requires_grad]
        else:
            chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        wanted = list(params)
        by_id = {id(p): n for n, p in named}
        names = set()
        for w in wanted:
            if isinstance(w, str):
                names.add(w)
            elif isinstance(w, torch.Tensor) and id(w) in by_id:
                names.add(by_id[id(w)])
            else:
                raise DropinfError(f"params: {w!r} is not a parameter name or parameter of this model")
        unknown = names - {n for n, _ in named}
        if unknown:
            raise DropinfError(f"params: no parameter named {sorted(unknown)} in the model")
        chosen = [(n, p) for n, p in named if n in names]
    if not chosen:
        raise DropinfError("no parameters to track: the model has no trainable parameters (or params= is empty)")
    return chosen
