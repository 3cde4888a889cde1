"""`snakemake --profile slurm` against a real single-node SLURM (munged, slurmctld, slurmd).

scripts/slurm/start.sh installs Debian's slurm-wlm/munge if needed and starts the
daemons with a fake `gpu:h100:1` gres; this module runs workflows through the shipped
profile (every rule an sbatch job), compares the results with a local run, and stops
the daemons it started (scripts/slurm/stop.sh, by pid files).

Opt-in, because it installs packages and starts root daemons: run with
``pytest -m slurm tests/slurm`` (or DROPINF_SLURM_TEST=1). It skips, with the reason,
only where the daemons cannot run (not root, no packages and no apt-get, a machine
that already belongs to a SLURM cluster).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
START = REPO / "scripts" / "slurm" / "start.sh"
STOP = REPO / "scripts" / "slurm" / "stop.sh"
STATE = Path(os.environ.get("DROPINF_SLURM_STATE", "/tmp/dropinf-slurm"))
PARTITION = os.environ.get("DROPINF_SLURM_PARTITION_NAME", "gpu")
GPU_TYPE = os.environ.get("DROPINF_SLURM_GPU_TYPE", "h100")
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# first status check 3 s after submission instead of the plugin's 40 s (test speed only)
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "3"]
# files/dirs never copied into the temp checkouts
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".snakemake", "results", "logs", "benchmarks", "__pycache__",
    "*.egg-info", ".pytest_cache", ".whl", ".gl", "report.html",
)


def _selected(config) -> bool:
    markexpr = config.getoption("-m", default="") or ""
    return "slurm" in markexpr and "not slurm" not in markexpr


@pytest.fixture(scope="module")
def slurm(request):
    """A running single-node cluster; yields the environment for client commands."""
    if not (_selected(request.config) or os.environ.get("DROPINF_SLURM_TEST") == "1"):
        pytest.skip("SLURM test is opt-in: run `pytest -m slurm tests/slurm` "
                    "(installs slurm-wlm, starts root daemons)")
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("SLURM daemons need Linux and root (munged/slurmctld/slurmd, mknod /dev/nvidia0)")
    # one test cluster per machine: serialise concurrent runs of this module
    lock = open("/tmp/dropinf-slurm.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    already = _daemon_alive("slurmctld")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True)
    startup_s = time.monotonic() - t0
    sys.stderr.write(proc.stderr)
    if proc.returncode == 3:
        lock.close()
        pytest.skip("SLURM daemons cannot start here: " + proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        subprocess.run(["bash", str(STOP)], capture_output=True, text=True)
        lock.close()
        pytest.fail(f"scripts/slurm/start.sh failed (rc {proc.returncode}):\n{proc.stderr}")
    env = _clean_env()
    env["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    print(f"\nSLURM up in {startup_s:.1f}s (including any apt install)", file=sys.stderr)
    try:
        yield env
    finally:
        if not already:  # stop only what this test started
            out = subprocess.run(["bash", str(STOP)], capture_output=True, text=True)
            sys.stderr.write(out.stderr)
        lock.close()


def _daemon_alive(name: str) -> bool:
    pidfile = STATE / "run" / f"{name}.pid"
    try:
        pid = int(pidfile.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except (OSError, ValueError):
        return False


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "DROPINF_SLURM_", "SNAKEMAKE_"))}
    return env


def _checkout(dest: Path) -> Path:
    """A copy of the working tree (no venv/.git/results) with the `slurm` profile link."""
    shutil.copytree(REPO, dest, symlinks=True, ignore=COPY_IGNORE)
    return dest


def _run(cmd, cwd, env, timeout=1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    (Path(cwd) / f"run-{int(time.time() * 1000)}.log").write_text(proc.stdout + proc.stderr)
    return proc


def _squeue(env, run_id: str) -> list[dict]:
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--name", run_id, "-o", "%i|%T|%k|%a|%P"],
        env=env, capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        jobid, state, comment, account, partition = line.strip().split("|")
        rule = re.sub(r"^rule_", "", comment).split("_wildcards_")[0]
        jobs.append(dict(id=jobid, state=state, rule=rule, account=account, partition=partition))
    return jobs


def _tres_per_job(env, jobid: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", jobid], env=env,
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"TresPerJob=(\S+)", out)
    return m.group(1) if m else ""


def _task_env() -> dict[tuple[str, str], str]:
    """(job, step) -> CUDA_VISIBLE_DEVICES seen by the task, from the TaskProlog log."""
    seen = {}
    log = STATE / "log" / "task-env.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        job, step, cvd = line.split()
        seen[(job, step)] = cvd
    return seen


def _submitted_rules(output: str) -> tuple[str, list[str], list[str]]:
    """SLURM run id, rules snakemake ran remotely, rules it ran locally."""
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    remote = re.findall(r"^rule (\w+):$", output, flags=re.M)
    local = re.findall(r"^localrule (\w+):$", output, flags=re.M)
    return run_id, remote, local


def check_slurm_run(proc, env, *, expect_gpu_rules: set[str]) -> list[dict]:
    """Every non-local job ran as a COMPLETED sbatch job; GPU rules got the fake H100."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    run_id, remote, local = _submitted_rules(out)
    # the workflow's localrules (cheap bookkeeping) run on the submit host; everything else is an sbatch job
    assert set(local) <= {"all", "summarize", "report", "extract_finalize"}, \
        f"rules run on the submit host instead of SLURM: {local}"
    jobs = _squeue(env, run_id)
    done = [j for j in jobs if j["state"] == "COMPLETED"]
    assert sorted(j["rule"] for j in done) == sorted(remote), (jobs, remote)
    assert len(re.findall(r"has been submitted with SLURM jobid", out)) == len(jobs)
    assert all(j["partition"] == PARTITION for j in jobs), jobs
    task_env = _task_env()
    for j in done:
        tres = _tres_per_job(env, j["id"])
        # the inner `srun` step of the executor plugin's jobstep runs the rule
        cvd = task_env.get((j["id"], "0"))
        if j["rule"] in expect_gpu_rules:
            assert tres == f"gres:gpu:{GPU_TYPE}:1", (j, tres)  # sbatch --gpus=h100:1
            assert cvd == "0", (j, cvd)
        else:
            assert "gpu" not in tres, (j, tres)
            assert cvd == "unset", (j, cvd)
    assert expect_gpu_rules <= {j["rule"] for j in done}
    return done


# --------------------------------------------------------------------------------------
# A tiny two-rule workflow: one CPU rule, one GPU rule (fast; checks the plumbing).

TINY = textwrap.dedent(r'''
    rule all:
        input: "results/summary.txt"

    rule make_data:
        output: "results/data.txt"
        resources: runtime=5, mem_mb=500
        shell: "seq 1 1000 > {output}"

    rule gpu_sum:
        input: "results/data.txt"
        output: "results/summary.txt"
        threads: 2
        resources: gpu=1, gpu_model="h100", runtime=5, mem_mb=1000
        shell:
            "awk '{{s+=$1}} END {{print s}}' {input} > {output}; "
            "echo ${{CUDA_VISIBLE_DEVICES-unset}} > results/gpu_sum.cuda"
''')


def _tiny_workflow(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "Snakefile").write_text(TINY)
    (path / "slurm").symlink_to(REPO / "workflow" / "profiles" / "slurm")
    return path


def _fake_sacctmgr(path: Path, account: str) -> Path:
    """The plugin validates accounts with sacctmgr, which needs slurmdbd; answer for it."""
    path.mkdir(parents=True, exist_ok=True)
    exe = path / "sacctmgr"
    exe.write_text(f"#!/bin/sh\necho {account}\n")
    exe.chmod(0o755)
    return path


def test_tiny_workflow_cpu_and_gpu_rules(slurm, tmp_path):
    local = _tiny_workflow(tmp_path / "local")
    proc = _run(SNAKEMAKE + ["--cores", "2"], local, _clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    wf = _tiny_workflow(tmp_path / "slurm")
    env = dict(slurm, DROPINF_SLURM_PARTITION=PARTITION, DROPINF_SLURM_ACCOUNT="dropinf_ci")
    env["PATH"] = f"{_fake_sacctmgr(tmp_path / 'bin', 'dropinf_ci')}:{env['PATH']}"
    proc = _run(SNAKEMAKE + ["--profile", "slurm", "--slurm-keep-successful-logs"] + FAST_POLL,
                wf, env)
    done = check_slurm_run(proc, env, expect_gpu_rules={"gpu_sum"})
    assert {j["account"] for j in done} == {"dropinf_ci"}
    assert sorted(j["rule"] for j in done) == ["gpu_sum", "make_data"]
    assert (wf / "results/gpu_sum.cuda").read_text().strip() == "0"
    assert (wf / "results/summary.txt").read_text() == (local / "results/summary.txt").read_text()
    for j in done:
        assert (wf / ".snakemake/slurm_logs" / f"rule_{j['rule']}" / f"{j['id']}.log").exists()


def test_missing_or_unknown_partition_is_one_message(slurm, tmp_path):
    wf = _tiny_workflow(tmp_path / "wf")
    for partition, needle in [(None, "no SLURM partition given"),
                              ("nosuch", "SLURM partition nosuch does not exist")]:
        env = dict(slurm)
        if partition:
            env["DROPINF_SLURM_PARTITION"] = partition
        t0 = time.monotonic()
        proc = _run(SNAKEMAKE + ["--profile", "slurm"], wf, env, timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert needle in proc.stderr and f"partitions here: {PARTITION}" in proc.stderr
        assert "usage:" not in proc.stderr  # not buried under snakemake's usage text
        assert time.monotonic() - t0 < 60
    assert not (wf / ".snakemake" / "slurm_logs").exists()  # nothing was submitted


KILLED = textwrap.dedent(r'''
    rule all:
        input: "results/done.txt"

    rule slow:
        output: "results/done.txt"
        resources: runtime=5, mem_mb=500, attempt_no=lambda wc, attempt: attempt
        shell:
            "echo partial > {output}; touch results/started.{resources.attempt_no}; "
            "if [ {resources.attempt_no} -eq 1 ]; then sleep 600; fi; "
            "echo complete > {output}"
''')


def test_killed_job_is_retried(slurm, tmp_path):
    """A job SLURM kills (scancel here; time limit/node failure alike) is resubmitted."""
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "Snakefile").write_text(KILLED)
    (wf / "slurm").symlink_to(REPO / "workflow" / "profiles" / "slurm")
    env = dict(slurm, DROPINF_SLURM_PARTITION=PARTITION)
    proc = subprocess.Popen(SNAKEMAKE + ["--profile", "slurm"] + FAST_POLL, cwd=wf, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (wf / "results/started.1").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "first attempt never started"
        time.sleep(0.5)
    assert (wf / "results/done.txt").read_text().strip() == "partial"
    first = subprocess.run(["squeue", "--noheader", "-t", "R", "-o", "%i|%k"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    killed = [line.split("|")[0] for line in first if line.endswith("|rule_slow")]
    assert len(killed) == 1, first
    subprocess.run(["scancel", killed[0]], env=env, check=True)
    out, _ = proc.communicate(timeout=300)
    (wf / "run.log").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    assert "SLURM status is: 'CANCELLED'" in out and "Trying to restart job" in out, out[-4000:]
    assert (wf / "results/done.txt").read_text().strip() == "complete"
    run_id, _, _ = _submitted_rules(out)
    states = sorted(j["state"] for j in _squeue(env, run_id))
    assert states == ["CANCELLED", "COMPLETED"], states


# --------------------------------------------------------------------------------------
# The real workflow: the embedded default (config.yaml), every rule an sbatch job.

# provenance columns (and *_seconds timing metrics) legitimately differ between two runs
PROVENANCE = {"git_commit", "git_dirty", "config_sha256", "dropinf_version", "torch_version",
              "device", "stage_seconds", "started_at"}
KEY = ("experiment", "method", "r", "seed", "metric")


def _summary(path: Path) -> dict[tuple, dict]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"empty summary {path}"
    table = {}
    for row in rows:
        if row["metric"].endswith("_seconds"):  # wall-clock timings (extract_seconds, ...)
            continue
        key = tuple(row[k] for k in KEY)
        assert key not in table, f"duplicate summary row {key}"
        table[key] = {k: v for k, v in row.items() if k not in PROVENANCE and k not in KEY}
    return table


def _gpu_rules(output: str) -> set[str]:
    """Rules whose jobs snakemake printed with a gpu resource > 0."""
    gpu = set()
    for rule, body in re.findall(r"^rule (\w+):\n((?:    .*\n)+)", output, flags=re.M):
        m = re.search(r"resources: .*\bgpu=(\d+)", body)
        if m and int(m.group(1)) > 0:
            gpu.add(rule)
    return gpu


@pytest.mark.skipif(not (REPO / "Snakefile").exists(), reason="no Snakefile in the repository")
def test_embedded_default_through_slurm_equals_local(slurm, tmp_path):
    local, wf = _checkout(tmp_path / "local"), _checkout(tmp_path / "slurm")
    # the local reference runs alongside: the SLURM run mostly waits on its one (fake) GPU
    t0 = time.monotonic()
    local_log = open(local / "run.log", "w")
    local_proc = subprocess.Popen(SNAKEMAKE + ["--cores", "2"], cwd=local, env=_clean_env(),
                                  stdout=local_log, stderr=subprocess.STDOUT)
    env = dict(slurm, DROPINF_SLURM_PARTITION=PARTITION)
    try:
        # the documented GPU-type override (the rules name no GPU model of their own)
        proc = _run(SNAKEMAKE + ["--profile", "slurm", "--slurm-keep-successful-logs"]
                    + ["--config", f"resources={{gpu_model: {GPU_TYPE}}}"] + FAST_POLL, wf, env)
        slurm_s = time.monotonic() - t0
    finally:
        local_rc = local_proc.wait(timeout=1800)
        local_log.close()
    assert local_rc == 0, (local / "run.log").read_text()[-6000:]
    out = proc.stdout + proc.stderr
    gpu_rules = _gpu_rules(out)
    # the config's resources ask for one GPU in these rules (GPU rules declare gpu=1)
    assert gpu_rules and gpu_rules <= {"finetune", "extract", "extract_nested", "extract_from_identity", "score",
                                       "evaluate"}, gpu_rules
    done = check_slurm_run(proc, env, expect_gpu_rules=gpu_rules)
    for j in done:
        assert (wf / ".snakemake/slurm_logs" / f"rule_{j['rule']}").is_dir(), j
    print(f"\nembedded default: SLURM run {slurm_s:.0f}s (local run alongside), "
          f"{len(done)} sbatch jobs ({sum(j['rule'] in gpu_rules for j in done)} on the GPU), "
          f"ids {min(int(j['id']) for j in done)}-{max(int(j['id']) for j in done)}",
          file=sys.stderr)

    summaries = sorted(p.relative_to(local) for p in (local / "results").glob("*/summary.csv"))
    assert summaries, "local run wrote no results/*/summary.csv"
    for rel in summaries:
        want, got = _summary(local / rel), _summary(wf / rel)
        assert got.keys() == want.keys()
        # same code, same threads, same CPU: the numbers are expected to be identical
        diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
        assert not diff, f"{rel}: {len(diff)} rows differ, e.g. {next(iter(diff.items()))}"
