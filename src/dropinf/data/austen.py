"""Jane Austen's six novels, offline: Debian `r-cran-janeaustenr` (MIT), one character vector of
lines per novel. Two language-modeling sources (task "lm"):

* `austen_pretrain`: the five novels other than `holdout`, one token stream (novels separated by
  `<|endoftext|>`), cut into windows of `seq_len` tokens (every `stride` tokens); `n_test` seeded
  windows are held out for validation.
* `austen`: the held-out novel (default "emma", the longest), cut into non-overlapping windows of
  `seq_len` tokens; `n_train` (2,000) and `n_test` (50) disjoint windows drawn with `seed`.

Text: each novel's hard-wrapped lines are joined into paragraphs (one paragraph per line, "\\n").
Tokenizer (`tokenizer=`):
* "bpe" (default): a byte-level BPE with `vocab_size` (4,096) entries trained with the Hugging
  Face `tokenizers` library on the *pretraining novels only* (the held-out novel never shapes the
  vocabulary). Training is deterministic; the result is cached as JSON under
  `$DROPINF_DATA/austen/` and its path is in `meta["tokenizer_file"]` (load it with
  `tokenizers.Tokenizer.from_file` or `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`).
* "bytes": UTF-8 bytes, id = byte + 2 (vocabulary 258), no training.
  Special ids (both): 0 = `<pad>`, 1 = `<|endoftext|>`.
* any other name: a pretrained model's own tokenizer, so the windows are in that model's
  vocabulary: an alias ("smollm2": SmolLM2-135M's, see `dropinf.models.causal_lm`), a local
  folder or a hub id (`dropinf.data.text.load_tokenizer`). The text is encoded as is, without the
  special tokens a tokenizer adds around a sequence (no BOS); `austen_pretrain` separates novels with
  the tokenizer's eos token. Its identity is in the meta: `tokenizer` (the name given),
  `tokenizer_path` and `tokenizer_sha256` (of its serialized vocabulary and rules, the same for
  the same tokenizer wherever it is loaded from); `vocab_size`, `pad_token_id` and `eos_token_id`
  are the tokenizer's.
Windows are full, so attention_mask is all ones.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import DropinfError
from . import TaskData, register_dataset
from .cache import CONVERSION_MANIFEST, data_home, debian_data_dir, sha256_file, source_info
from .rlazy import LazyLoadDB
from .text import chunk_stream

PACKAGE = "r-cran-janeaustenr"
#: The novels in publication order (janeaustenr's object names).
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
TITLES = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
          "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion"}
PAD, EOS = "<pad>", "<|endoftext|>"
PAD_ID, EOS_ID = 0, 1
TOKENIZER_VERSION = 1  # bump when the training recipe changes, so cached tokenizers are not reused


def novel_text(lines) -> str:
    """Join hard-wrapped lines into paragraphs (blank lines separate paragraphs), one per line."""
    paras, cur = [], []
    for line in lines:
        line = str(line).strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(paras)


def read_novels(root=None, fetch=None) -> tuple[dict[str, str], Path]:
    """{novel name: text} for all six novels, and the data folder they came from."""
    folder = debian_data_dir(PACKAGE, root=root, fetch=fetch)
    return dict(_read_folder(str(folder), sha256_file(Path(folder) / "Rdata.rdb"))), folder


@functools.lru_cache(maxsize=2)
def _read_folder(folder: str, rdb_sha256: str) -> tuple[tuple[str, str], ...]:
    db = LazyLoadDB(folder)
    missing = sorted(set(NOVELS) - set(db.names()))
    if missing:
        raise DropinfError(f"janeaustenr data at {folder} lacks novels {missing}")
    return tuple((n, novel_text(db[n])) for n in NOVELS)


def _check_holdout(holdout: str) -> list[str]:
    if holdout not in NOVELS:
        raise DropinfError(f"holdout must be one of {NOVELS}, got {holdout!r}")
    return [n for n in NOVELS if n != holdout]


class ByteTokenizer:
    """UTF-8 bytes shifted by 2 (0 = pad, 1 = end of text)."""

    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 2 for i in ids if int(i) >= 2).decode("utf-8", errors="replace")


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` (deterministic for the same texts and size)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DropinfError("tokenizer='bpe' needs the `tokenizers` package (it comes with transformers: "
                           "`pip install dropinf[hf]`), or use tokenizer='bytes'") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


class PretrainedTokenizer:
    """A Hugging Face tokenizer encoding running text: no special tokens added, no warning that the
    whole novel is longer than the model's context (it is cut into windows afterwards)."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def pretrained_tokenizer(name: str):
    """(tokenizer, info) of a pretrained model's tokenizer (alias, local folder or hub id)."""
    from .text import load_tokenizer, resolve_name, tokenizer_name

    if not isinstance(name, str) or not name:
        raise DropinfError(f"austen tokenizer must be 'bpe', 'bytes' or a pretrained tokenizer's name, got {name!r}")
    path = resolve_name(name)
    tok = load_tokenizer(path)
    backend = getattr(tok, "backend_tokenizer", None)
    # what identifies a tokenizer is its vocabulary and rules, not the folder it was read from
    serial = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    info = {"tokenizer": name, "tokenizer_path": tokenizer_name(tok), "tokenizer_class": type(tok).__name__,
            "tokenizer_sha256": hashlib.sha256(serial.encode()).hexdigest(), "vocab_size": len(tok),
            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    conversion = Path(path) / CONVERSION_MANIFEST
    if conversion.is_file():  # converted from a checkpoint (SmolLM2's GGUF): the file it came from
        info["tokenizer_source"] = json.loads(conversion.read_text())["source"]
    return PretrainedTokenizer(tok), info


def austen_tokenizer(kind: str = "bpe", vocab_size: int = 4096, holdout: str = "emma", root=None,
                     fetch=None, novels: dict[str, str] | None = None, folder: Path | None = None):
    """(tokenizer, info) for the given recipe; a BPE is trained once and cached as JSON; any name other
    than 'bpe' and 'bytes' is a pretrained tokenizer (`pretrained_tokenizer`)."""
    special = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID}
    if kind == "bytes":
        return ByteTokenizer(), {"tokenizer": "bytes", "vocab_size": ByteTokenizer.vocab_size, **special}
    if kind != "bpe":
        return pretrained_tokenizer(kind)
    pretrain = _check_holdout(holdout)
    if novels is None:
        novels, folder = read_novels(root, fetch)
    from tokenizers import Tokenizer

    key = json.dumps({"v": TOKENIZER_VERSION, "vocab_size": int(vocab_size), "novels": pretrain,
                      "rdb": sha256_file(Path(folder) / "Rdata.rdb")}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = data_home() / "austen" / f"bpe{int(vocab_size)}-{digest}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = train_bpe([novels[n] for n in pretrain], vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)
    if tok.token_to_id(PAD) != PAD_ID or tok.token_to_id(EOS) != EOS_ID:
        raise DropinfError(f"cached tokenizer {path} has unexpected special ids; delete it")
    return tok, {"tokenizer": "bpe", "vocab_size": int(tok.get_vocab_size()), "tokenizer_file": str(path),
                 "tokenizer_sha256": sha256_file(path), **special}


def _encode(tok, text: str) -> torch.Tensor:
    ids = tok.encode(text)
    ids = ids if isinstance(ids, list) else ids.ids
    return torch.tensor(ids, dtype=torch.long)


def _lm_split(windows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": windows, "attention_mask": torch.ones_like(windows)}


def _meta(folder, info, **extra) -> dict:
    return {"source": source_info(PACKAGE, folder, ["Rdata.rdx", "Rdata.rdb"]), **info, **extra}


@register_dataset("austen")
def austen(holdout: str = "emma", seq_len: int = 64, n_train: int = 2000, n_test: int = 50, seed: int = 0,
           tokenizer: str = "bpe", vocab_size: int = 4096, root=None, fetch: bool | None = None) -> TaskData:
    """The held-out novel as `n_train` + `n_test` disjoint windows of `seq_len` tokens
    (`vocab_size`: of the 'bpe' tokenizer only)."""
    _check_holdout(holdout)
    novels, folder = read_novels(root, fetch)
    tok, info = austen_tokenizer(tokenizer, vocab_size, holdout, novels=novels, folder=folder)
    windows = chunk_stream(_encode(tok, novels[holdout]), seq_len)
    need = int(n_train) + int(n_test)
    if windows.shape[0] < need:
        raise DropinfError(f"austen: {TITLES[holdout]} gives {windows.shape[0]} windows of {seq_len} tokens, "
                           f"fewer than n_train + n_test = {need}; lower seq_len or the counts")
    perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    tr, te = perm[: int(n_train)].sort().values, perm[int(n_train): need].sort().values
    meta = _meta(folder, info, holdout=holdout, seq_len=int(seq_len), seed=int(seed),
                 n_windows=int(windows.shape[0]),
                 source_index={"train": tr.tolist(), "test": te.tolist()})  # window numbers in the novel
    return TaskData("austen", "lm", _lm_split(windows[tr]), _lm_split(windows[te]), meta=meta)


@register_dataset("austen_pretrain")
def austen_pretrain(holdout: str = "emma", seq_len: int = 128, stride: int | None = None, n_test: int = 256,
                    seed: int = 0, tokenizer: str = "bpe", vocab_size: int = 4096, root=None,
                    fetch: bool | None = None, n_train: int | None = None) -> TaskData:
    """The five other novels as windows of `seq_len` tokens; `n_test` seeded windows for validation;
    `n_train`: keep a seeded subset of that many training windows (default: all).

    With `stride < seq_len` windows overlap; validation windows are then taken from the
    non-overlapping grid and every training window that overlaps one is dropped, so no
    validation token is ever trained on.
    """
    pretrain = _check_holdout(holdout)
    novels, folder = read_novels(root, fetch)
    tok, info = austen_tokenizer(tokenizer, vocab_size, holdout, novels=novels, folder=folder)
    if info["eos_token_id"] is None:
        raise DropinfError(f"austen_pretrain separates the novels with an end-of-text token, and tokenizer "
                           f"{tokenizer!r} has none (no eos_token)")
    eos = torch.tensor([int(info["eos_token_id"])])
    stream = torch.cat([t for n in pretrain for t in (_encode(tok, novels[n]), eos)])
    seq_len = int(seq_len)
    stride = int(stride or seq_len)
    starts = torch.arange(0, stream.numel() - seq_len + 1, stride)
    grid = torch.arange(0, stream.numel() - seq_len + 1, seq_len)  # non-overlapping candidates
    if grid.numel() <= int(n_test):
        raise DropinfError(f"austen_pretrain: only {grid.numel()} windows of {seq_len} tokens; n_test={n_test}")
    pick = torch.randperm(grid.numel(), generator=torch.Generator().manual_seed(int(seed)))[: int(n_test)]
    test_starts = grid[pick].sort().values
    # drop training windows that overlap any validation window
    covered = torch.zeros(stream.numel(), dtype=torch.bool)
    for s in test_starts.tolist():
        covered[s: s + seq_len] = True
    cum = torch.cat([torch.zeros(1, dtype=torch.long), covered.long().cumsum(0)])
    overlap = (cum[starts + seq_len] - cum[starts]) > 0
    train_starts = starts[~overlap]
    if n_train is not None:
        if not 0 < int(n_train) <= train_starts.numel():
            raise DropinfError(f"austen_pretrain: n_train={n_train} is not in [1, {train_starts.numel()}] "
                               f"(the training windows of {seq_len} tokens)")
        keep = torch.randperm(train_starts.numel(), generator=torch.Generator().manual_seed(int(seed) + 1))
        train_starts = train_starts[keep[: int(n_train)].sort().values]
    offs = torch.arange(seq_len)
    train = stream[train_starts[:, None] + offs]
    test = stream[test_starts[:, None] + offs]
    meta = _meta(folder, info, holdout=holdout, novels=pretrain, seq_len=seq_len, stride=stride, seed=int(seed),
                 n_tokens=int(stream.numel()),
                 source_index={"train": train_starts.tolist(), "test": test_starts.tolist()})  # token offsets
    return TaskData("austen_pretrain", "lm", _lm_split(train), _lm_split(test), meta=meta)
