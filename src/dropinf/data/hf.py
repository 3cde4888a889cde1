"""Published-setup text data through Hugging Face `datasets` (for users with hub access).

* GLUE MRPC / QNLI / SST-2 / RTE / CoLA (`glue` with `task=`, or `glue_mrpc`, ...): train = the
  GLUE train split, test = the validation split (GLUE's test labels are hidden). As in DataInf's
  setup, splits larger than `n_train` (4,500) / `n_test` (500) are subsampled with `seed`.
  Tokenized (pairs where the task has two sentences) to at most `max_length` (128) tokens.
* WikiText (`wikitext`, default `wikitext-2-raw-v1`) and OpenWebText (`openwebtext`) for
  language modeling: `n_train` (2,000) + `n_test` (50) samples of up to `seq_len` tokens.
  `mode="chunk"`: the split's texts tokenized, concatenated and cut into full windows (the usual
  causal-LM recipe); `mode="document"`: one sample per document, truncated and right-padded,
  with the attention mask marking real tokens.

Every loader takes the data from, in order: `dataset=` (an in-memory `DatasetDict`, or a dict of
split name -> `Dataset` / list of row dicts), `path=` (a folder written by
`DatasetDict.save_to_disk`), or the hub (`datasets.load_dataset`). The tokenizer is a hub id, a
local folder, an alias ("minilm"), or a tokenizer object.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import DropinfError
from . import TaskData, register_dataset
from .cache import subsample
from .text import chunk_stream, encode_splits, load_tokenizer, pad_documents, tokenizer_name

GLUE_HUB = "nyu-mll/glue"
GLUE_KEYS = {
    "cola": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
}
WIKITEXT_HUB = "Salesforce/wikitext"
OPENWEBTEXT_HUB = "Skylion007/openwebtext"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DropinfError("this loader needs Hugging Face `datasets`: `pip install datasets` "
                           "(or `pip install dropinf[hub]`)") from None
    return datasets


def get_splits(dataset=None, path=None, hub: tuple | None = None, streaming: bool = False):
    """A mapping split name -> rows (a `datasets.Dataset`, IterableDataset or list of dicts)."""
    if dataset is not None:
        if hasattr(dataset, "keys"):
            return dataset
        raise DropinfError("dataset= must be a DatasetDict or a dict of split name -> Dataset/rows")
    if path is not None:
        ds = _datasets()
        try:
            obj = ds.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DropinfError(f"no saved dataset at {path}: {e}") from None
        if not hasattr(obj, "keys"):
            raise DropinfError(f"{path} holds a single Dataset; save a DatasetDict with named splits")
        return obj
    if hub is None:
        raise DropinfError("give dataset= or path=")
    ds = _datasets()
    try:
        return ds.load_dataset(*hub, streaming=streaming)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, ... : say what to do instead
        raise DropinfError(f"could not load {'/'.join(hub)} from the Hugging Face hub ({type(e).__name__}: {e}); "
                           f"without hub access pass path=<folder from DatasetDict.save_to_disk> or dataset=") from None


def _split(splits, name):
    try:
        return splits[name]
    except KeyError:
        raise DropinfError(f"dataset has no split {name!r}; has {list(splits.keys())}") from None


def _column(rows, key) -> list:
    if hasattr(rows, "column_names"):
        if key not in rows.column_names:
            raise DropinfError(f"dataset has no column {key!r}; has {rows.column_names}")
        return list(rows[key])
    try:
        return [r[key] for r in rows]
    except KeyError:
        raise DropinfError(f"dataset rows have no field {key!r}") from None


def _num_classes(rows, labels: np.ndarray) -> int:
    feats = getattr(rows, "features", None)
    if feats is not None and "label" in feats and hasattr(feats["label"], "num_classes"):
        return int(feats["label"].num_classes)
    return int(labels.max()) + 1


@register_dataset("glue")
def glue(task: str, tokenizer="roberta-base", max_length: int = 128, n_train: int | None = 4500,
         n_test: int | None = 500, seed: int = 0, train_split: str = "train", test_split: str = "validation",
         pad_to_max_length: bool = False, path=None, dataset=None) -> TaskData:
    """Classification TaskData: input_ids, attention_mask (token_type_ids if any), labels."""
    task = str(task).lower().replace("-", "")
    if task not in GLUE_KEYS:
        raise DropinfError(f"glue task must be one of {sorted(GLUE_KEYS)}, got {task!r}")
    k1, k2 = GLUE_KEYS[task]
    splits = get_splits(dataset, path, (GLUE_HUB, task))
    tok = load_tokenizer(tokenizer)
    texts, labels, index, num_classes = {}, {}, {}, 2
    for split, src, k, off in (("train", train_split, n_train, 0), ("test", test_split, n_test, 1)):
        rows = _split(splits, src)
        y = np.asarray(_column(rows, "label"), dtype=np.int64)
        if (y < 0).any():
            raise DropinfError(f"glue {task} split {src!r} has hidden labels (-1); use the validation split")
        idx = subsample(len(y), None if k is None or k >= len(y) else k, int(seed) + off, f"glue {task} {split}")
        a = _column(rows, k1)
        b = _column(rows, k2) if k2 else None
        texts[split] = ([a[i] for i in idx], [b[i] for i in idx] if b else None)
        labels[split] = torch.from_numpy(y[idx])
        index[split] = idx.tolist()
        if split == "train":
            num_classes = _num_classes(rows, y)
    enc = encode_splits(tok, texts, max_length, pad_to_max_length)
    for split in enc:
        enc[split]["labels"] = labels[split]
    meta = {"source": {"hub": GLUE_HUB, "config": task, "path": None if path is None else str(path),
                       "splits": [train_split, test_split]},
            "tokenizer": tokenizer_name(tok), "max_length": int(max_length), "pad_token_id": int(tok.pad_token_id),
            "vocab_size": int(len(tok)), "seed": int(seed), "source_index": index}
    return TaskData(f"glue_{task}", "classification", enc["train"], enc["test"], num_classes=num_classes, meta=meta)


for _task in GLUE_KEYS:
    register_dataset(f"glue_{_task}")(functools.partial(glue, _task))


# ---- language modeling ------------------------------------------------------------------------

def _texts(rows, field: str, limit: int | None = None) -> list[str]:
    """The text column, streaming-safe: at most `limit` rows when given."""
    if limit is None and hasattr(rows, "column_names") and not _is_iterable_dataset(rows):
        return [str(t) for t in _column(rows, field)]
    out = []
    for r in rows:
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(str(r[field]))
        except KeyError:
            raise DropinfError(f"dataset rows have no field {field!r}") from None
    return out


def _is_iterable_dataset(rows) -> bool:
    return type(rows).__name__ == "IterableDataset"


def _windows(tok, texts: list[str], seq_len: int, sep: int | None) -> torch.Tensor:
    enc = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    parts = []
    for ids in enc:
        if ids:
            parts.append(torch.as_tensor(ids, dtype=torch.long))
            if sep is not None:
                parts.append(torch.tensor([sep]))
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    return chunk_stream(stream, seq_len)


def _lm_samples(tok, texts: list[str], mode: str, seq_len: int, sep: int | None, min_tokens: int):
    """(samples dict, source ids): windows (mode chunk) or padded documents (mode document)."""
    if mode == "chunk":
        w = _windows(tok, texts, seq_len, sep)
        return {"input_ids": w, "attention_mask": torch.ones_like(w)}, np.arange(w.shape[0])
    if mode == "document":
        enc = tok(texts, add_special_tokens=False, truncation=True, max_length=int(seq_len))["input_ids"]
        keep = np.array([i for i, ids in enumerate(enc) if len(ids) >= min_tokens], dtype=np.int64)
        return pad_documents([enc[i] for i in keep], int(seq_len), tok.pad_token_id), keep
    raise DropinfError(f"mode must be 'chunk' or 'document', got {mode!r}")


def _take(d: dict, idx) -> dict:
    idx = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[idx] for k, v in d.items()}


def language_modeling(name: str, splits, tokenizer, seq_len: int, n_train: int, n_test: int, seed: int,
                      mode: str, train_split: str, test_split: str | None, text_field: str = "text",
                      max_docs: int | None = None, min_tokens: int = 2, eos_between: bool = False,
                      source: dict | None = None) -> TaskData:
    """LM TaskData from raw text splits. With `test_split=None` the test samples come from the
    train split's pool, disjoint from the training samples. `eos_between`: in chunk mode, put
    the end-of-text token between documents (for corpora of whole documents)."""
    tok = load_tokenizer(tokenizer)
    sep = tok.eos_token_id if eos_between else None
    pool, pool_idx = _lm_samples(tok, _texts(_split(splits, train_split), text_field, max_docs), mode, seq_len,
                                 sep, min_tokens)
    n_pool = pool["input_ids"].shape[0]
    rng = np.random.default_rng(int(seed))
    if test_split is None:
        need = int(n_train) + int(n_test)
        if n_pool < need:
            raise DropinfError(f"{name}: only {n_pool} samples available (max_docs={max_docs}); need {need}")
        perm = rng.permutation(n_pool)
        tr, te = np.sort(perm[: int(n_train)]), np.sort(perm[int(n_train): need])
        train, test = _take(pool, tr), _take(pool, te)
        index = {"train": pool_idx[tr].tolist(), "test": pool_idx[te].tolist()}
    else:
        tpool, tpool_idx = _lm_samples(tok, _texts(_split(splits, test_split), text_field, max_docs), mode, seq_len,
                                       sep, min_tokens)
        tr = subsample(n_pool, int(n_train), int(seed), f"{name} train")
        te = subsample(tpool["input_ids"].shape[0], int(n_test), int(seed) + 1, f"{name} test")
        train, test = _take(pool, tr), _take(tpool, te)
        index = {"train": pool_idx[tr].tolist(), "test": tpool_idx[te].tolist()}
    meta = {"source": source or {}, "tokenizer": tokenizer_name(tok), "vocab_size": int(len(tok)),
            "pad_token_id": int(tok.pad_token_id), "eos_token_id": tok.eos_token_id, "seq_len": int(seq_len),
            "mode": mode, "seed": int(seed), "splits": [train_split, test_split],
            # chunk mode: window numbers; document mode: row numbers in the split
            "source_index": index}
    return TaskData(name, "lm", train, test, meta=meta)


@register_dataset("wikitext")
def wikitext(config: str = "wikitext-2-raw-v1", tokenizer="gpt2", seq_len: int = 512, n_train: int = 2000,
             n_test: int = 50, seed: int = 0, mode: str = "chunk", train_split: str = "train",
             test_split: str = "test", path=None, dataset=None) -> TaskData:
    splits = get_splits(dataset, path, (WIKITEXT_HUB, config))
    return language_modeling("wikitext", splits, tokenizer, seq_len, n_train, n_test, seed, mode, train_split,
                             test_split, source={"hub": WIKITEXT_HUB, "config": config,
                                                 "path": None if path is None else str(path)})


@register_dataset("openwebtext")
def openwebtext(tokenizer="EleutherAI/pythia-1.4b", seq_len: int = 512, n_train: int = 2000, n_test: int = 50,
                seed: int = 0, mode: str = "document", max_docs: int | None = 20000, streaming: bool = True,
                min_tokens: int = 16, path=None, dataset=None) -> TaskData:
    """OpenWebText has one split: samples come from its first `max_docs` documents (streamed from
    the hub by default, so the 8M-document corpus is never downloaded whole), train and test
    disjoint."""
    splits = get_splits(dataset, path, (OPENWEBTEXT_HUB,), streaming=streaming)
    return language_modeling("openwebtext", splits, tokenizer, seq_len, n_train, n_test, seed, mode, "train",
                             None, max_docs=max_docs, min_tokens=min_tokens, eos_between=True,
                             source={"hub": OPENWEBTEXT_HUB, "max_docs": max_docs,
                                     "path": None if path is None else str(path)})
