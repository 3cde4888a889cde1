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
