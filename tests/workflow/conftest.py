"""Fixtures of the workflow tests: run the Snakefile in temporary directories.

One session-scoped run of the whole DAG (`default_run`) uses the embedded default's data, model,
training, methods, r values and seeds, with the retraining test reduced to one fraction; the other
tests read it or copy it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "Snakefile"
DEFAULT_CONFIG = REPO / "config.yaml"


def snakemake_exe() -> str:
    exe = Path(sys.executable).with_name("snakemake")
    if exe.exists():
        return str(exe)
    found = shutil.which("snakemake")
    if not found:
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    return found


def default_config() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, config: Path | None = None, cores: int = 2, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile in `workdir` with exactly `config` (no merging)."""
    cmd = [snakemake_exe(), "-s", str(SNAKEFILE), "--directory", str(workdir), "--cores", str(cores)]
    if config is not None:
        cmd += ["--configfile", str(config), "--replace-workflow-config"]
    cmd += list(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def reduced_config() -> dict:
    """The embedded default with the retraining test cut to one fraction (AUC settings unchanged)."""
    cfg = default_config()
    cfg["evaluate"]["retrain_fractions"] = [0.1]
    return cfg


class Run:
    def __init__(self, workdir: Path, config: dict, config_path: Path, seconds: float):
        self.workdir, self.config, self.config_path, self.seconds = workdir, config, config_path, seconds
        self.results = workdir / config.get("results_dir", "results") / config["experiment"]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Run:
    workdir = tmp_path_factory.mktemp("default_run")
    cfg = reduced_config()
    path = write_config(workdir / "test-config.yaml", cfg)
    t0 = time.perf_counter()
    snakemake(workdir, config=path)
    return Run(workdir, cfg, path, time.perf_counter() - t0)


def planned_jobs(stdout: str) -> list[tuple[str, str]]:
    """(rule, output) of every job in a `snakemake -n` listing."""
    jobs, rule = [], None
    for line in stdout.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.match(r"^\s+output: (.+)$", line)
        if m and rule:
            jobs.append((rule, m.group(1)))
            rule = None
        elif re.match(r"^\s+jobid:", line) and rule:  # a job without output (rule all)
            jobs.append((rule, ""))
            rule = None
    return jobs


class Helpers:
    """Helpers handed to tests as the `wf` fixture (test modules import nothing from here)."""

    repo = REPO
    snakefile = SNAKEFILE
    snakemake = staticmethod(snakemake)
    snakemake_exe = staticmethod(snakemake_exe)
    default_config = staticmethod(default_config)
    reduced_config = staticmethod(reduced_config)
    write_config = staticmethod(write_config)
    planned_jobs = staticmethod(planned_jobs)


@pytest.fixture(scope="session")
def wf() -> Helpers:
    return Helpers()
