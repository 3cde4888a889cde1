"""Containers: every rule names the Apptainer image, the definition matches the conda environment
and the package metadata, the podman stand-in is derived from it verbatim, and (where podman and
the image exist) one rule runs inside the image through `--software-deployment-method apptainer`."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
DEF = REPO / "containers" / "dropinf.def"
SHIM_DIR = REPO / "containers" / "podman"
IMAGE = os.environ.get("DROPINF_PODMAN_IMAGE", "localhost/dropinf:latest")


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


def test_podman_containerfile_is_the_definition_verbatim():
    import importlib.util

    spec = importlib.util.spec_from_file_location("containerfile", SHIM_DIR / "containerfile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sec = _sections(DEF.read_text())
    out = mod.containerfile(DEF.read_text(), "base:tag")
    assert out.startswith("FROM base:tag\n")
    for line in sec["files"].strip().splitlines():
        src, dst = line.split()
        assert f"COPY {src} {dst}\n" in out
    run = re.search(r"^RUN echo (\S+) \| base64 -d", out, flags=re.M)
    assert base64.b64decode(run.group(1)).decode() == sec["post"]  # the same install commands
    build = (SHIM_DIR / "build.sh").read_text()
    assert "containers/dropinf.def" in build and "containerfile.py" in build
    assert os.access(SHIM_DIR / "build.sh", os.X_OK) and os.access(SHIM_DIR / "apptainer", os.X_OK)


def _podman_image_or_skip():
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman/runc not installed (apt-get install podman runc debootstrap; see docs/containers.md)")
    if subprocess.run(["podman", "--runtime", "runc", "image", "exists", IMAGE]).returncode != 0:
        pytest.skip(f"podman image {IMAGE} not built (containers/podman/build.sh, about 10 minutes)")


def test_one_rule_runs_in_the_podman_image(default_run, wf, tmp_path):
    """`extract` (dropout r=16, one seed) through `--software-deployment-method apptainer`, the
    stand-in apptainer running it in the podman image; equal to the same job run on the host."""
    _podman_image_or_skip()
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
            os.environ["PATH"], old_path = f"{SHIM_DIR}{os.pathsep}{os.environ['PATH']}", os.environ["PATH"]
            try:
                args += ["--software-deployment-method", "apptainer", "--apptainer-args", f"--nv --bind {REPO}"]
                proc = wf.snakemake(work, *args, config=path, cores=1)
            finally:
                os.environ["PATH"] = old_path
        else:
            proc = wf.snakemake(work, *args, config=path, cores=1)
        assert "rule extract:" in proc.stdout or "rule extract:" in proc.stderr
        runs[where] = work
    log = (runs["container"] / "logs" / exp / "extract" / "dropout-r16.log").read_text()
    host_log = (runs["host"] / "logs" / exp / "extract" / "dropout-r16.log").read_text()
    torch_in = re.search(r"\(torch (\S+),", log).group(1)
    import torch

    assert re.search(r"\(torch (\S+),", host_log).group(1) == torch.__version__
    for split in ("train", "test"):
        a = zarr.open_array(str(runs["container"] / "results" / exp / "grads/dropout/r16/seed0" / f"{split}.zarr"))
        b = zarr.open_array(str(runs["host"] / "results" / exp / "grads/dropout/r16/seed0" / f"{split}.zarr"))
        assert a.attrs["complete"] is True
        assert a.attrs["provenance"]["torch_version"] == torch_in
        # podman gives the container its own host name (apptainer would not): it ran in there
        assert a.attrs["provenance"]["host"] != b.attrs["provenance"]["host"] == os.uname().nodename
        x, y = np.asarray(a[...]), np.asarray(b[...])
        print(f"{split}: torch {torch_in} in the image vs {torch.__version__} here: "
              f"{'bitwise equal' if np.array_equal(x, y) else f'max abs diff {np.abs(x - y).max():.3g}'}")
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
