"""Published-setup loaders (GLUE, WikiText, OpenWebText, CIFAR-10) on small local stand-ins of
the same format, so they run without the hub or the CIFAR-10 download."""
import pickle
import sys

import numpy as np
import pytest
import torch

from dropinf.data import load_dataset
from dropinf.errors import DropinfError

WORDS = ("the a an is was good bad movie film great awful food taste it this that he she and or not "
         "very what who why where question answer sentence one two three four five six seven eight").split()


def _sentences(n, rng, lo=3, hi=12):
    return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) for _ in range(n)]


def _glue_standin(task, n_train=30, n_val=12, hidden_test=False):
    datasets = pytest.importorskip("datasets")
    from dropinf.data.hf import GLUE_KEYS

    rng = np.random.default_rng(0)
    k1, k2 = GLUE_KEYS[task]
    feats = {k1: datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
             "idx": datasets.Value("int32")}
    if k2:
        feats[k2] = datasets.Value("string")

    def split(n, labels):
        d = {k1: _sentences(n, rng), "label": labels, "idx": list(range(n))}
        if k2:
            d[k2] = _sentences(n, rng)
        return datasets.Dataset.from_dict(d, features=datasets.Features(feats))

    splits = {"train": split(n_train, rng.integers(0, 2, n_train).tolist()),
              "validation": split(n_val, rng.integers(0, 2, n_val).tolist())}
    if hidden_test:
        splits["test"] = split(5, [-1] * 5)
    return datasets.DatasetDict(splits)


@pytest.mark.parametrize("task", ["mrpc", "qnli", "sst2", "rte", "cola"])
def test_glue_from_saved_standin(task, tmp_path, word_tokenizer):
    ds = _glue_standin(task)
    ds.save_to_disk(str(tmp_path / task))
    td = load_dataset(f"glue_{task}", path=str(tmp_path / task), tokenizer=word_tokenizer, max_length=16)
    assert td.name == f"glue_{task}" and td.task == "classification" and td.num_classes == 2
    assert td.train["input_ids"].shape[0] == 30 and td.test["input_ids"].shape[0] == 12
    assert td.train["input_ids"].shape[1] <= 16 and td.train["input_ids"].shape[1] == td.test["input_ids"].shape[1]
    assert torch.equal(td.train["labels"], torch.tensor(ds["train"]["label"]))
    pair = task in ("mrpc", "qnli", "rte")
    ids = td.train["input_ids"]
    n_sep = (ids == 3).sum(1)  # [SEP] = 3 in the stand-in vocabulary
    whole = td.train["attention_mask"].sum(1) < 16  # not truncated
    assert bool((n_sep[whole] == (2 if pair else 1)).all())
    if pair:
        assert bool((td.train["token_type_ids"] == 1).any())


def test_glue_injected_dataset_subsampling_and_errors(word_tokenizer):
    ds = _glue_standin("sst2", hidden_test=True)
    a = load_dataset("glue", task="sst2", dataset=ds, tokenizer=word_tokenizer, n_train=10, n_test=5, seed=1)
    b = load_dataset("glue", task="SST-2", dataset=ds, tokenizer=word_tokenizer, n_train=10, n_test=5, seed=1)
    assert a.train["input_ids"].shape[0] == 10 and a.test["labels"].shape == (5,)
    assert a.meta["source_index"] == b.meta["source_index"]
    idx = a.meta["source_index"]["train"]
    assert torch.equal(a.train["labels"], torch.tensor([ds["train"]["label"][i] for i in idx]))
    with pytest.raises(DropinfError, match="hidden labels"):
        load_dataset("glue", task="sst2", dataset=ds, tokenizer=word_tokenizer, test_split="test")
    with pytest.raises(DropinfError, match="one of"):
        load_dataset("glue", task="mnli", dataset=ds, tokenizer=word_tokenizer)


def test_glue_without_hub_is_a_clear_error(monkeypatch, word_tokenizer):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DropinfError, match="path=<folder"):
        load_dataset("glue_mrpc", tokenizer=word_tokenizer)


def _text_standin(splits=("train", "validation", "test"), n=(60, 10, 20), seed=0):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(seed)
    out = {}
    for name, k in zip(splits, n):
        lines = []
        for s in _sentences(k, rng, 4, 40):
            lines += [" = heading = \n", s + " \n", ""]  # WikiText-like rows, some empty
        out[name] = datasets.Dataset.from_dict({"text": lines})
    return datasets.DatasetDict(out)


def test_wikitext_chunks_from_saved_standin(tmp_path, word_tokenizer):
    _text_standin().save_to_disk(str(tmp_path / "wt"))
    td = load_dataset("wikitext", path=str(tmp_path / "wt"), tokenizer=word_tokenizer, seq_len=16, n_train=40,
                      n_test=5, seed=0)
    assert td.task == "lm" and td.train["input_ids"].shape == (40, 16) and td.test["input_ids"].shape == (5, 16)
    assert bool((td.train["attention_mask"] == 1).all())
    again = load_dataset("wikitext", path=str(tmp_path / "wt"), tokenizer=word_tokenizer, seq_len=16, n_train=40,
                         n_test=5, seed=0)
    assert torch.equal(again.train["input_ids"], td.train["input_ids"])
    with pytest.raises(DropinfError, match="asked for"):
        load_dataset("wikitext", path=str(tmp_path / "wt"), tokenizer=word_tokenizer, seq_len=16, n_train=10**6)


def test_openwebtext_documents_padded_and_disjoint(word_tokenizer):
    ds = _text_standin(splits=("train",), n=(80,))
    td = load_dataset("openwebtext", dataset=ds, tokenizer=word_tokenizer, seq_len=24, n_train=30, n_test=6,
                      min_tokens=3, max_docs=None)
    assert td.train["input_ids"].shape == (30, 24) and td.test["input_ids"].shape == (6, 24)
    m = td.train["attention_mask"]
    assert torch.equal(m, m.cummin(dim=1).values) and bool((m.sum(1) >= 3).all())
    assert (m == 0).any(), "short documents must be right-padded"
    pad = td.meta["pad_token_id"]
    assert bool((td.train["input_ids"][m == 0] == pad).all())
    tr, te = td.meta["source_index"]["train"], td.meta["source_index"]["test"]
    assert not set(tr) & set(te)


def test_openwebtext_streaming_standin(word_tokenizer):
    """A streamed (iterable) split: only the first max_docs documents are read."""
    ds = _text_standin(splits=("train",), n=(80,))
    stream = {"train": ds["train"].to_iterable_dataset()}
    td = load_dataset("openwebtext", dataset=stream, tokenizer=word_tokenizer, seq_len=24, n_train=10, n_test=4,
                      min_tokens=3, max_docs=60, mode="chunk")
    assert td.train["input_ids"].shape == (10, 24)
    assert max(td.meta["source_index"]["train"] + td.meta["source_index"]["test"]) < 60 * 24


# ---- CIFAR-10 -----------------------------------------------------------------------------------

def _fake_cifar(folder, n_per_batch=8):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                         b"batch_label": name.encode()}, f)
    return folder


def test_cifar10_from_batch_folder(tmp_path):
    folder = _fake_cifar(tmp_path / "cifar-10-batches-py")
    td = load_dataset("cifar10", root=tmp_path, n_train=20, n_test=None, seed=0)
    assert td.train["x"].shape == (20, 3, 32, 32) and td.train["x"].dtype == torch.float32
    assert td.test["x"].shape == (8, 3, 32, 32) and td.num_classes == 10
    # pixel layout: row i of a batch is 1024 red, 1024 green, 1024 blue values, row-major
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    first = td.meta["source_index"]["train"][0]
    assert first < 8
    from dropinf.data.cifar10 import MEAN, STD
    x = td.train["x"][0]
    back = (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    assert torch.allclose(back, torch.from_numpy(raw[first].reshape(3, 32, 32)).float(), atol=1e-3)
    same = load_dataset("cifar10", root=folder, n_train=20, n_test=4, seed=0)  # the batch folder itself
    assert torch.equal(same.train["x"], td.train["x"]) and same.test["x"].shape[0] == 4


def test_cifar10_missing_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DropinfError, match="download=True"):
        load_dataset("cifar10", root=tmp_path)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(DropinfError, match="torchvision"):
        load_dataset("cifar10", root=tmp_path, download=True)
