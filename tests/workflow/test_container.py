"""Containers: every rule names the Apptainer image, the definition matches the conda environment
and the package metadata, and (where Apptainer and a built image exist) one rule runs inside the
image through `--software-deployment-method apptainer` with the same result as on the host."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from packaging.specifiers import SpecifierSet
zarr = pytest.importorskip("zarr", reason="the workflow tests need zarr: pip install -e '.[workflow]'")

REPO = Path(__file__).resolve().parents[2]
DEF = REPO / "containers" / "dropinf.def"
IMAGE = Path(os.environ.get("DROPINF_CONTAINER", REPO / "containers" / "dropinf.sif"))


def _sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"^%(\w+)\n(.*?)(?=^%\w+\n|\Z)", text, flags=re.S | re.M))


def test_every_rule_names_the_container_and_the_conda_env():
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    blocks = dict(re.findall(r"^rule (\w+):\n(.*?)(?=^rule |^localrules|^ruleorder|\Z)", text, flags=re.S | re.M))
    assert blocks
    for name, body in blocks.items():
        if "shell:" not in body and "run:" not in body and "script:" not in body:
            continue  # an input-only target
        assert re.search(r"^    conda:\n        ENV$", body, flags=re.M), name
        assert re.search(r"^    container:\n        CONTAINER$", body, flags=re.M), name
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert 'os.path.join(workflow.basedir, "containers", "dropinf.sif")' in common
    assert 'os.environ.get("DROPINF_CONTAINER")' in common


def test_definition_python_and_project_match_the_environment():
    definition = DEF.read_text()
    base = re.search(r"^From:\s*python:(\d+\.\d+)", definition, flags=re.M)
    assert base, "containers/dropinf.def must start from a python:<version> image"
    env = yaml.safe_load((REPO / "envs" / "dropinf.yaml").read_text())
    conda_python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert conda_python == f"python={base.group(1)}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(base.group(1) + ".0")
    sec = _sections(definition)
    copied = {line.split()[0] for line in sec["files"].strip().splitlines()}
    assert {"pyproject.toml", "README.md", "src"} <= copied  # the project itself, from this tree
    assert "set -eu" in sec["post"]  # a failed install fails the build
    assert "import dropinf" in sec["post"]  # and the build smoke-tests the result


def _why_no_image() -> str | None:
    if shutil.which("apptainer") is None:
        return "apptainer is not installed (see docs/containers.md)"
    if not IMAGE.is_file():
        return (f"no image at {IMAGE}: apptainer build containers/dropinf.sif containers/dropinf.def "
                "(the test never builds it)")
    return None


@pytest.mark.skipif(_why_no_image() is not None, reason=str(_why_no_image()))
def test_one_rule_runs_in_the_image(default_run, wf, tmp_path):
    """`extract` (dropout r=16, one seed) through `--software-deployment-method apptainer`: it runs
    with the image's torch and gives the same arrays as the same job run on the host."""
    exp = default_run.config["experiment"]
    cfg = wf.reduced_config()
    cfg.update(methods=["dropout"], r=[16], seeds=[0])
    cfg["extract"].update(nest=False, from_identity=False)
    target = f"results/{exp}/grads/dropout/r16/manifest.json"
    runs = {}
    for where in ("host", "container"):
        work = tmp_path / where
        for part in ("data", "model"):  # the default run's data and model, reused as they are
            shutil.copytree(default_run.results / part, work / "results" / exp / part)
        path = wf.write_config(work / "test.yaml", cfg)
        args = [target]
        if where == "container":
            args += ["--software-deployment-method", "apptainer", "--apptainer-args", f"--bind {REPO}"]
        proc = wf.snakemake(work, *args, config=path, cores=1)
        assert "rule extract:" in proc.stdout or "rule extract:" in proc.stderr
        runs[where] = work
    version = subprocess.run(["apptainer", "exec", str(IMAGE), "python", "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    for split in ("train", "test"):
        a = zarr.open_array(str(runs["container"] / "results" / exp / "grads/dropout/r16/seed0" / f"{split}.zarr"))
        b = zarr.open_array(str(runs["host"] / "results" / exp / "grads/dropout/r16/seed0" / f"{split}.zarr"))
        assert a.attrs["complete"] is True
        assert a.attrs["provenance"]["torch_version"] == version  # it ran with the image's torch
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7)
