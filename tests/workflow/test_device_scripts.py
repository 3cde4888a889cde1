"""The scripts that run a planned workflow on the lent GPU machine (scripts/device/), end to end on
the CPU: plan here with Snakemake, run the planned jobs without Snakemake, finish here. On a copy of
the repository (the scripts work in their own checkout), with a pretraining config, so the plan must
carry both prepared datasets and run the pretrain job."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_pretrain import TINY  # the tiny Austen config of the pretrain test

REPO = Path(__file__).resolve().parents[2]


def _copy_checkout(dst: Path) -> None:
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def test_plan_run_finish_on_a_copy(wf, tmp_path):
    pytest.importorskip("tokenizers")
    from dropinf.data.cache import debian_data_dir
    from dropinf.errors import DropinfError

    try:
        debian_data_dir("r-cran-janeaustenr")
    except DropinfError as e:
        pytest.skip(f"offline source unavailable: {e}")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to copy")
    repo = tmp_path / "repo"
    _copy_checkout(repo)
    cfg = wf.write_config(repo / "tiny.yaml", {**TINY, "methods": ["random", "tracin", "dropout"]})
    res = "results/austen-tiny"
    wf.snakemake(repo, f"{res}/data/dataset.pt", f"{res}/pretrain/dataset.pt", config=cfg, cores=1)

    def script(name, *args):
        proc = subprocess.run([sys.executable, f"scripts/device/{name}", *args], cwd=repo, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    script("make_jobs.py", "--configfile", "tiny.yaml", "--cores", "2", "--dest", ".devcarry")
    plan = json.loads((repo / ".devcarry" / "jobs.json").read_text())
    rules = [j["rule"] for j in plan["jobs"]]
    assert rules.count("pretrain") == 1 and "prepare_data" not in rules and "prepare_pretrain_data" not in rules
    assert sorted(c["path"] for c in plan["carried"]) == [f"{res}/data/dataset.pt", f"{res}/pretrain/dataset.pt"]

    out = script("run_stages.py", ".devcarry", "--parallel", "2", "--deadline-s", "500", "--out", "device-out")
    assert "sha256 ok" in out
    runner = json.loads(subprocess.run(["tar", "-xOzf", "device-out/results.tar.gz", "runner.json"], cwd=repo,
                                       capture_output=True, text=True, check=True).stdout)
    assert {j["status"] for j in runner["jobs"]} == {"done"} and len(runner["jobs"]) == len(plan["jobs"])

    script("finish.py", "device-out/results.tar.gz", "--plan", ".devcarry", "--reference", "ref")
    table = (repo / "ref" / "austen-tiny" / "retrain_table.md").read_text()
    assert "Test perplexity" in table and "| tracin |" in table and "| dropout | 16 |" in table
    assert "GPU machine (" in table and "Not done: none." in table
    assert (repo / "ref" / "austen-tiny" / "accuracy_vs_removed.png").stat().st_size > 1000
