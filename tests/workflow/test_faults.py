"""Faults and hostile inputs against the real workflow: paths with spaces, injection attempts, bad
option keys and duplicate YAML keys stopped before anything runs, r > d stopped before training, a
stage killed with SIGKILL rerun to bit-identical arrays, and a deleted or truncated chunk detected
by `verify` and by the stage reading it, then recovered by the command they print."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

EXP = "tiny"


def tiny_config(wf, **over) -> dict:
    cfg = wf.default_config()
    cfg.update(experiment=EXP, results_dir="my results", methods=["orig", "dropout", "random"], r=[8], seeds=[0])
    cfg["dataset"]["options"] = {"test_fraction": 0.2, "seed": 0, "max_train": 300, "max_test": 100}
    cfg["model"]["options"] = {"hidden": [16], "activation": "tanh"}
    cfg["finetune"]["epochs"] = 3
    cfg["evaluate"] = {"retrain": False, "retrain_fractions": []}
    cfg.update(over)
    return cfg


def copy_checkout(wf, dest: Path) -> Path:
    """The workflow and package sources in `dest` (a path with a space)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("workflow", "src", "envs"):
        shutil.copytree(wf.repo / name, dest / name, ignore=ignore)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(wf.repo / name, dest / name)
    return dest / "Snakefile"


def run_snakemake(wf, snakefile: Path, workdir: Path, config: Path, *args, cores=2, check=True, timeout=600):
    cmd = [wf.snakemake_exe(), "-s", str(snakefile), "--directory", str(workdir), "--cores", str(cores),
           "--configfile", str(config), "--replace-workflow-config", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def verify(results: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.run([sys.executable, "-m", "dropinf", "verify", str(results)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


class Spaced:
    def __init__(self, snakefile, workdir, config, results):
        self.snakefile, self.workdir, self.config, self.results = snakefile, workdir, config, results


@pytest.fixture(scope="module")
def spaced(wf, tmp_path_factory) -> Spaced:
    """A checkout path and a results path with spaces; one complete run of a tiny config."""
    root = tmp_path_factory.mktemp("faults")
    snakefile = copy_checkout(wf, root / "my checkout")
    workdir = root / "work dir"
    workdir.mkdir()
    config = wf.write_config(workdir / "tiny config.yaml", tiny_config(wf))
    plan = run_snakemake(wf, snakefile, workdir, config, "-n", "-p")
    assert "--out 'my results/tiny/data/dataset.pt'" in plan.stdout  # the quoted path
    run_snakemake(wf, snakefile, workdir, config)
    return Spaced(snakefile, workdir, config, Path("my results") / EXP)


def test_paths_with_spaces_run_end_to_end(spaced):
    res = spaced.workdir / spaced.results
    assert (res / "summary.csv").is_file() and (res / "report" / "tables.html").is_file()
    proc = verify(spaced.results, spaced.workdir)
    assert proc.returncode == 0, proc.stdout
    assert "0 problem(s)" in proc.stdout and " 0 arrays" not in proc.stdout


def _recover(wf, spaced, line: str):
    """Run the `snakemake ...` command printed at the end of a problem line, in the same workflow."""
    cmd = shlex.split(line.split("recover with: ", 1)[1])
    assert cmd[:2] == ["snakemake", "--forcerun"]
    return run_snakemake(wf, spaced.snakefile, spaced.workdir, spaced.config, *cmd[1:])


@pytest.mark.parametrize("fault", ["delete", "truncate"])
def test_damaged_chunk_is_detected_and_recovered(wf, spaced, fault):
    res = spaced.workdir / spaced.results
    if fault == "delete":
        array, chunk = res / "grads/identity/full/train.zarr", "c/0/0"
        reader, producer = "scores/orig/full/manifest.json", "grads/identity/full/manifest.json"
    else:
        array, chunk = res / "grads/dropout/r8/seed0/train.zarr", "c/0/0"
        reader, producer = "scores/dropout/r8/manifest.json", "grads/dropout/r8/manifest.json"
    before = np.asarray(zarr.open_array(str(array), mode="r")[...])
    scores_before = np.asarray(zarr.open_array(str(res / Path(reader).parent / ("scores.zarr" if "orig" in reader
                                                                                  else "seed0.zarr")), mode="r")[...])
    target = array / chunk
    if fault == "delete":
        target.unlink()
    else:
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)

    proc = verify(spaced.results, spaced.workdir)
    assert proc.returncode == 2
    lines = [line for line in proc.stdout.splitlines() if "recover with" in line]
    assert len(lines) == 1, proc.stdout
    expect = "missing on disk: c/0/0" if fault == "delete" else "chunk c/0/0 (rows 0-"
    # an extraction is recomputed by forcing the part jobs that wrote its arrays (its manifest lists them)
    parts = json.loads((res / producer).read_text()).get("parts") or []
    targets = [spaced.results / Path(producer).parent / p for p in parts] or [spaced.results / producer]
    assert expect in lines[0]
    assert lines[0].endswith("snakemake --forcerun " + " ".join(shlex.quote(str(t)) for t in targets)), lines[0]

    # the stage that reads it stops with the same diagnosis instead of scoring zeros
    failed = run_snakemake(wf, spaced.snakefile, spaced.workdir, spaced.config, "--forcerun",
                           str(spaced.results / reader), check=False)
    assert failed.returncode != 0
    method = Path(reader).parts[1]
    log = (spaced.workdir / "logs" / EXP / "score" / f"{method}-{Path(reader).parts[2]}.log").read_text()
    assert "Traceback" not in log  # one clear line
    assert str(array).split("my results/")[-1] in log and "recover with: snakemake --forcerun" in log, log
    # the failed stage deleted nothing of its previous complete scores (Snakemake itself removes the failed
    # job's declared output, the manifest), and verify now names both
    scores = res / Path(reader).parent / ("scores.zarr" if "orig" in reader else "seed0.zarr")
    assert np.array_equal(np.asarray(zarr.open_array(str(scores), mode="r")[...]), scores_before)
    after = [line for line in verify(spaced.results, spaced.workdir).stdout.splitlines() if "recover with" in line]
    assert after[0] == lines[0] or lines[0] in after
    assert any(str(scores).split("my results/")[-1] in line and "has no manifest.json" in line for line in after)
    _recover(wf, spaced, lines[0])  # reruns the producer and everything downstream of it
    final = verify(spaced.results, spaced.workdir)
    assert final.returncode == 0, final.stdout
    assert np.array_equal(np.asarray(zarr.open_array(str(array), mode="r")[...]), before)
    run_snakemake(wf, spaced.snakefile, spaced.workdir, spaced.config)  # whatever the recovery left to redo
    again = zarr.open_array(str(res / Path(reader).parent / ("scores.zarr" if "orig" in reader else "seed0.zarr")),
                            mode="r")[...]
    assert np.array_equal(np.asarray(again), scores_before)


def test_extract_killed_by_sigkill_reruns_bit_identical(spaced, tmp_path):
    res = spaced.workdir / spaced.results
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}

    def command(out):
        return [sys.executable, "-m", "dropinf", "extract", "--data", str(res / "data/dataset.pt"), "--model",
                str(res / "model/model.pt"), "--compressor", "dropout", "--r", "8", "--seeds", "0,1",
                "--batch-size", "1", "--device", "cpu", "--threads", "1",
                "--out-dir", str(out)]

    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(command(ref), check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("seed*/.train.zarr.tmp-*")) and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "manifest.json").exists()  # nothing looks finished
    subprocess.run(command(out), check=True, env=env, capture_output=True, timeout=300)
    for rel in ("seed0/train.zarr", "seed0/test.zarr", "seed1/train.zarr", "seed1/test.zarr"):
        a = zarr.open_array(str(ref / rel), mode="r")[...]
        b = zarr.open_array(str(out / rel), mode="r")[...]
        assert a.tobytes() == b.tobytes(), rel
    leftovers = [p for p in out.rglob(".*") if ".tmp-" in p.name]
    assert leftovers == []


BAD = {
    "dataset-option-typo": (lambda c: c["dataset"]["options"].update(max_trian=10),
                            "config error at 'dataset.options': unknown option(s) 'max_trian'; allowed: "
                            "test_fraction, seed, max_train, max_test"),
    "model-option-typo": (lambda c: c["model"]["options"].update(hiden=[4]),
                          "config error at 'model.options': unknown option(s) 'hiden'; allowed: hidden, activation, "
                          "init_seed"),
    "compressor-option-typo": (lambda c: c["extract"].update(compressor_options={"sjlt": {"mask": 2}}),
                               "config error at 'extract.compressor_options.sjlt': unknown option(s) 'mask'"),
    "solver-option-typo": (lambda c: c["score"].update(method_options={"lissa": {"iters": 2}}),
                           "config error at 'score.method_options.lissa': unknown option(s) 'iters'"),
    "results-dir-injection": (lambda c: c.update(results_dir="r;touch INJECTED;x"),
                              "config error at 'results_dir': 'r;touch INJECTED;x' is not allowed"),
    "experiment-injection": (lambda c: c.update(experiment="x$(touch INJECTED)"),
                             "config error at 'experiment': 'x$(touch INJECTED)' is not allowed"),
}


@pytest.mark.parametrize("case", [*BAD, "duplicate-key"])
def test_bad_config_stops_before_anything_runs(wf, tmp_path, case):
    cfg = tiny_config(wf)
    path = tmp_path / "bad.yaml"
    if case == "duplicate-key":
        text = yaml.safe_dump(cfg, sort_keys=False).replace("label_noise: 0.2\n", "label_noise: 0.2\nlabel_noise: 0.4\n")
        path.write_text(text)
        expected = "duplicate key 'label_noise'"
    else:
        BAD[case][0](cfg)
        wf.write_config(path, cfg)
        expected = BAD[case][1]
    work = tmp_path / "work"
    work.mkdir()
    proc = wf.snakemake(work, config=path, check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config error")]
    assert len(errors) == 1 and expected in errors[0], proc.stdout + proc.stderr
    created = [p for p in work.rglob("*") if p.is_file() and ".snakemake" not in p.parts]
    assert created == [] and not list(tmp_path.rglob("INJECTED")) and not list(wf.repo.glob("INJECTED"))


def test_r_above_d_stops_before_training(wf, tmp_path):
    cfg = tiny_config(wf, methods=["dropout"], r=[5000])  # the MLP has d = 64*16 + 16 + 16*10 + 10 = 1210
    path = wf.write_config(tmp_path / "c.yaml", cfg)
    proc = wf.snakemake(tmp_path, f"my results/{EXP}/model/model.pt", config=path, cores=1, check=False)
    assert proc.returncode != 0
    log = (tmp_path / "logs" / EXP / "finetune.log").read_text()
    assert "config 'r' = 5000 exceeds d = 1210" in log and "train loss" not in log, log
    assert not (tmp_path / "my results" / EXP / "model" / "model.pt").exists()
