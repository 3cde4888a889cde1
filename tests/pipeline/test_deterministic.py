"""extract.deterministic / --deterministic: parsed from the config and the command line, torch's flag
and CUBLAS_WORKSPACE_CONFIG set inside the job's gradient pass (and left alone when off), one clear
error for a conflicting workspace setting, for CUDA already initialised, and for an op without a
deterministic implementation; the manifest and the arrays record the setting."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
import zarr

from dropinf.errors import DropinfError
from dropinf.extraction import Extractor
from dropinf.pipeline import common, options
from dropinf.pipeline import extract as extract_mod

REPO = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
EXTRACT = {"type": "object", "properties": {"extract": SCHEMA["properties"]["extract"]}}
CUBLAS = common.ENV_CUBLAS


@pytest.fixture
def clean(monkeypatch):
    """torch's process-global flag and the cuBLAS variable as they were, whatever the test did."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv(CUBLAS, raising=False)  # monkeypatch restores it (or its absence) afterwards
    torch.use_deterministic_algorithms(False)
    yield monkeypatch
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_digits_mlp):
    return train_digits_mlp(tmp_path_factory.mktemp("deterministic"), max_train=48, max_test=16, hidden=(4,),
                            epochs=1)


def job(trained, out, **kw):
    return extract_mod.ExtractJob(data=trained / "data.pt", model=trained / "model.pt", out_dir=out,
                                  compressor="dropout", r=8, seeds=(0,), device="cpu", threads=1, batch_size=16, **kw)


@pytest.fixture
def seen(clean):
    """What each Extractor.run saw: torch's flag and the cuBLAS variable, from inside the pass."""
    calls, run = [], Extractor.run

    def spy(self, *a, **kw):
        calls.append((torch.are_deterministic_algorithms_enabled(), common.os.environ.get(CUBLAS)))
        return run(self, *a, **kw)

    clean.setattr(Extractor, "run", spy)
    return calls


# ---- config and command line --------------------------------------------------------------------------

def test_the_config_key():
    config = {"extract": {}}
    options.fill_defaults(config, EXTRACT)
    assert config["extract"]["deterministic"] is False
    config = {"extract": {"deterministic": "true"}}
    options.apply_command_line(config, {"extract": {"deterministic": "true"}}, SCHEMA)
    assert config["extract"]["deterministic"] is True and options.schema_error(config, EXTRACT) is None
    assert options.schema_error({"extract": {"deterministic": "yes"}}, EXTRACT) == \
        "config error at 'extract.deterministic': 'yes' is not of type 'boolean'"


def test_the_extract_command_flag(extract_job):
    assert extract_job().deterministic is False and extract_job("--deterministic").deterministic is True


def test_the_rule_passes_the_flag_from_the_environment():
    rules = (REPO / "workflow" / "rules" / "gradients.smk").read_text()
    assert rules.count("${{DROPINF_DETERMINISTIC:+--deterministic}}") == 1  # the extract rule: gradient passes
    assert 'config["extract"]["deterministic"]' in (REPO / "workflow" / "rules" / "common.smk").read_text()


# ---- the job -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 2])
def test_on_the_pass_runs_deterministic_and_says_so(trained, tmp_path, seen, shards):
    m = extract_mod.extract(job=job(trained, tmp_path / "x", deterministic=True), shards=shards)
    assert seen and all(s == (True, ":4096:8") for s in seen)
    assert torch.are_deterministic_algorithms_enabled() is False  # restored after the job
    assert m["status"] == "complete" and m["deterministic"] is True
    for split in ("train", "test"):
        assert zarr.open_array(str(tmp_path / "x" / "seed0" / f"{split}.zarr"), mode="r").attrs["deterministic"]
    if shards > 1:
        assert [rec["deterministic"] for rec in m["shard_records"]] == [True, True]


def test_off_touches_nothing(trained, tmp_path, seen):
    m = extract_mod.extract(job=job(trained, tmp_path / "x"))
    assert seen and all(s == (False, None) for s in seen) and m["deterministic"] is False
    assert CUBLAS not in common.os.environ
    # nor does it turn off what the user turned on
    torch.use_deterministic_algorithms(True)
    extract_mod.extract(job=job(trained, tmp_path / "y"))
    assert seen[-1] == (True, None) and torch.are_deterministic_algorithms_enabled()


def test_same_bits_on_and_off_on_the_cpu(trained, tmp_path, clean):
    on = extract_mod.extract(job=job(trained, tmp_path / "on", deterministic=True))
    off = extract_mod.extract(job=job(trained, tmp_path / "off"))
    for split in ("train", "test"):
        a, b = (zarr.open_array(str(tmp_path / d / m["arrays"]["0"][split]), mode="r")[:]
                for d, m in (("on", on), ("off", off)))
        assert a.tobytes() == b.tobytes()


def test_parts_of_two_settings_are_not_called_deterministic(trained, tmp_path, clean):
    out = tmp_path / "x"
    extract_mod.extract(job=job(trained, out, deterministic=True), shards=2, shard=0)
    extract_mod.extract(job=job(trained, out), shards=2, shard=1)
    parts = [out / "parts" / f"pass-{k}of2.json" for k in range(2)]
    assert extract_mod.finalize(out_dir=out, parts=parts)["deterministic"] is False


# ---- the errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [":4096:2", ":0:0", ""])
def test_a_conflicting_cublas_setting_is_one_error(trained, tmp_path, clean, value):
    clean.setenv(CUBLAS, value)
    with pytest.raises(DropinfError, match=rf"extract\.deterministic \(--deterministic\): CUBLAS_WORKSPACE_CONFIG="
                                           rf"'{value}' makes cuBLAS non-deterministic"):
        extract_mod.extract(job=job(trained, tmp_path / "x", deterministic=True))
    assert not (tmp_path / "x" / "manifest.json").exists() and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("value", [":4096:8", ":16:8"])
def test_a_deterministic_cublas_setting_is_kept(trained, tmp_path, seen, monkeypatch, value):
    monkeypatch.setenv(CUBLAS, value)
    extract_mod.extract(job=job(trained, tmp_path / "x", deterministic=True))
    assert seen and all(s == (True, value) for s in seen)


def test_cuda_already_initialised(clean):
    clean.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(DropinfError, match="CUDA is already initialised in this process.*CUBLAS_WORKSPACE_CONFIG"
                                           "=:4096:8 before"):
        with common.deterministic_algorithms(True):
            pass
    assert CUBLAS not in common.os.environ and not torch.are_deterministic_algorithms_enabled()
    clean.setenv(CUBLAS, ":4096:8")  # set before CUDA started: nothing to fear
    with common.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()


def test_an_op_without_a_deterministic_implementation(trained, tmp_path, clean):
    """torch's own error for such an op (raised by CUDA kernels like index_add_ when the flag is on;
    every CPU op here has a deterministic implementation, so the pass raises torch's message itself)."""
    def run(self, *a, **kw):
        if torch.are_deterministic_algorithms_enabled():
            raise RuntimeError("index_add_cuda_ does not have a deterministic implementation, but you set "
                               "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just "
                               "for this operation...\nmore")
        raise AssertionError("the pass ran without the flag")

    clean.setattr(Extractor, "run", run)
    with pytest.raises(DropinfError, match=r"^extract\.deterministic \(--deterministic\): an operation of the "
                                           r"gradient pass has no deterministic implementation \(index_add_cuda_ "
                                           r"does not .*operation\.\.\.\); turn extract\.deterministic "
                                           r"\(--deterministic\) off to run it$") as e:
        extract_mod.extract(job=job(trained, tmp_path / "x", deterministic=True))
    assert isinstance(e.value.__cause__, RuntimeError) and not torch.are_deterministic_algorithms_enabled()
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_other_runtime_errors_pass_through(clean):
    with pytest.raises(RuntimeError, match="^out of memory$"):
        with common.deterministic_algorithms(True):
            raise RuntimeError("out of memory")
