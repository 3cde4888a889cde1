"""Per-example losses shared by the language-model builders (GPT-2, Pythia, Llama, ...)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..errors import DropinfError

IGNORE = -100


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left- or right-padded example sees the same
    positions as when it is alone (pads get position 0; their outputs are never used)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def per_example_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy per example, [B] float32. A position t counts when token t+1
    is a real token (mask 1, label not -100) predicted from a real token t (so with left padding
    the first real token is never a target, exactly as when the example is alone). An example
    with no target token gets loss 0."""
    if labels is None:
        labels = input_ids
    tgt = labels[:, 1:]
    valid = tgt != IGNORE
    if attention_mask is not None:
        valid = valid & (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    tgt = tgt.masked_fill(~valid, IGNORE)
    lg = logits[:, :-1]
    B, T1, V = lg.shape
    ce = F.cross_entropy(lg.reshape(B * T1, V).float(), tgt.reshape(B * T1), ignore_index=IGNORE,
                         reduction="none").view(B, T1)
    ce = torch.where(valid, ce, torch.zeros_like(ce))  # where, not *: a NaN at a pad must not leak
    return ce.sum(1) / valid.sum(1).clamp(min=1).to(ce.dtype)


def causal_lm_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a Hugging Face causal LM for a batch with input_ids and attention_mask."""
    try:
        ids = batch["input_ids"]
    except KeyError:
        raise DropinfError(f"language-model batch needs input_ids; got keys {sorted(batch)}") from None
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    return out.logits


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-example LM loss [B]: mean token CE over the example's real (non-padded) tokens."""
    logits = causal_lm_forward(model, batch)
    return per_example_lm_loss(logits, batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise DropinfError(f"dtype must be one of {sorted(table)}, got {dtype!r}") from None


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run a block (random init) under a fixed torch seed without disturbing the global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def hf():
    try:
        import transformers
    except ImportError:
        raise DropinfError("this model needs `transformers`: `pip install dropinf[hf]`") from None
    return transformers


def data_meta(data) -> dict:
    return dict(getattr(data, "meta", None) or {})
