"""A bad config stops everything before anything runs: one message naming the key, exit non-zero,
nothing created."""
from __future__ import annotations

import re

import pytest

CASES = {
    "unknown-key": ({"bogus": 1}, "'bogus' was unexpected"),
    "unknown-nested-key": ({"finetune": {"epochs": 5, "momentum": 0.9}}, "in 'finetune'"),
    "wrong-type": ({"finetune": {"epochs": "ten"}}, "'finetune.epochs': 'ten' is not of type 'integer'"),
    "r-zero": ({"r": [0, 16]}, "'r[0]': 0 is less than the minimum of 1"),
    "r-negative": ({"r": [16, -4]}, "'r[1]': -4 is less than the minimum of 1"),
    "r-not-a-list": ({"r": 16}, "'r': 16 is not of type 'array'"),
    "noise-one": ({"label_noise": 1.0}, "'label_noise': 1.0 is greater than or equal to the maximum of 1"),
    "noise-negative": ({"label_noise": -0.1}, "'label_noise': -0.1 is less than the minimum of 0"),
    "unknown-method": ({"methods": ["orig", "magic"]}, "'methods[1]': 'magic' is not one of"),
    "unknown-dataset": ({"dataset": {"name": "imagenet"}}, "'dataset.name': 'imagenet' is not one of"),
    "missing-key": ({"experiment": None}, "'experiment'"),
    "cuda-graph-value": ({"extract": {"cuda_graph": "yes"}},
                         "'extract.cuda_graph': 'yes' is not allowed (auto, true or false)"),
    "bucket-negative": ({"extract": {"bucket": -8}}, "'extract.bucket': -8 is less than the minimum of 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config(wf, tmp_path, case):
    override, expected = CASES[case]
    cfg = wf.default_config()
    for key, value in override.items():
        if value is None:
            del cfg[key]
        elif isinstance(value, dict) and isinstance(cfg.get(key), dict) and case != "unknown-dataset":
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = wf.write_config(tmp_path / "bad.yaml", cfg)
    work = tmp_path / "work"
    work.mkdir()
    proc = wf.snakemake(work, config=path, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("config error")]
    assert len(errors) == 1, out
    assert expected in errors[0], errors[0]
    # nothing is created but snakemake's own run log, which it opens before reading the Snakefile
    created = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert all(re.fullmatch(r"\.snakemake/log/[^/]+\.snakemake\.log", c) for c in created), created


def _config_errors(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config error")]


def test_lists_from_the_command_line(wf, tmp_path):
    """`--config seeds=[0,1] compression_sizes=[4,8]`: Snakemake passes the items as strings; they are
    typed by the schema, and compression_sizes (r's command-line name) replaces the file's r."""
    out = wf.snakemake(tmp_path, "-n", "-p", "--config", "seeds=[0,1]", "compression_sizes=[4,8]",
                       "methods=[dropout,dropout+lissa,orig]", config=wf.repo / "config.yaml").stdout
    outputs = {o for _, o in wf.planned_jobs(out)}
    exp = wf.default_config()["experiment"]
    for method in ("dropout", "dropout+lissa"):
        assert {f"results/{exp}/scores/{method}/r{r}/manifest.json" for r in (4, 8)} <= outputs
    assert not any("/r16/" in o or "/r64/" in o for o in outputs)
    scores = [line for line in out.splitlines() if "python -m dropinf score" in line and "--method dropout" in line]
    assert scores and all("--seeds 0,1 " in line for line in scores)


@pytest.mark.parametrize("args, expected", [
    (["seeds=[0,x]"], "config error at 'seeds[1]': 'x' (from --config) is not an integer"),
    (["compression_sizes=[4,0]"], "config error at 'compression_sizes[1]': 0 is less than the minimum of 1"),
    (["methods=[dropout+orig]"], "config error at 'methods[0]': 'dropout+orig' is the method 'dropout'"),
    (["evaluate={retrain: perhaps}"], "config error at 'evaluate.retrain': 'perhaps' (from --config) is not true or false"),
])
def test_bad_values_from_the_command_line(wf, tmp_path, args, expected):
    proc = wf.snakemake(tmp_path, "-n", "--config", *args, config=wf.repo / "config.yaml", check=False)
    errors = _config_errors(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert errors[0].startswith(expected), errors[0]


def test_r_and_compression_sizes_in_one_file_are_refused(wf, tmp_path):
    cfg = wf.default_config()
    cfg["compression_sizes"] = [8]
    path = wf.write_config(tmp_path / "both.yaml", cfg)
    proc = wf.snakemake(tmp_path, "-n", config=path, check=False)
    errors = _config_errors(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert errors[0] == (f"config error in {path}: 'r' and 'compression_sizes' are one setting (the compression "
                         "sizes; 'compression_sizes' is its name on the command line, where Snakemake refuses "
                         "one-letter keys); give only one")
    # a file may use the long name alone
    del cfg["r"]
    out = wf.snakemake(tmp_path, "-n", config=wf.write_config(tmp_path / "long.yaml", cfg)).stdout
    assert any("/dropout/r8/" in o for _, o in wf.planned_jobs(out))


def test_r_cannot_be_set_on_the_command_line(wf, tmp_path):
    """Why compression_sizes exists: Snakemake's --config refuses keys shorter than two characters."""
    proc = wf.snakemake(tmp_path, "-n", "--config", "r=[4]", config=wf.repo / "config.yaml", check=False)
    assert proc.returncode != 0
    assert "Config entry must start with a valid identifier" in proc.stdout + proc.stderr
