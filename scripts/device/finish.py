"""Finish, here, a workflow run made on the GPU machine by `run_stages.py`.

    .venv/bin/python scripts/device/finish.py PATH/results.tar.gz [--plan .devcarry] [--reference results/reference]

1. Unpacks the results and logs that came back into this checkout (results/<exp>/, logs/<exp>/).
2. Runs the workflow's own `summarize` and `report` stages with the exact commands Snakemake planned
   (`local_jobs` of the plan) and the same environment as the GPU jobs (config sha256, commit).
3. Writes `REFERENCE/<exp>/`: `summary.csv` (every row with its provenance), `retrain_table.md`
   (the report stage's table: test accuracy or perplexity after removing the most helpful
   examples, mean ± std over seeds, per method, skipped methods with the reason; then wall
   seconds per stage), the report's `accuracy_vs_removed.png`, and `device_runner.json` (each GPU
   job's wall seconds and status).

    .venv/bin/python scripts/device/finish.py --exp-dir results/<exp>      # a run snakemake made here
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))


def unpack(tar: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tar) as t:
            t.extractall(tmp, filter="data")
        runner = json.loads((Path(tmp) / "runner.json").read_text())
        for top in ("results", "logs"):
            for exp in (Path(tmp) / top).glob("*") if (Path(tmp) / top).exists() else []:
                dst = REPO / top / exp.name
                for src in exp.rglob("*"):
                    if src.is_file():
                        target = dst / src.relative_to(exp)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, target)
    return runner


def run_local(plan: dict, env_file: Path) -> None:
    env = dict(os.environ)
    env.update(json.loads(env_file.read_text()))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["DROPINF_REPO"] = str(REPO)
    for job in plan["local_jobs"]:
        cmd = job["cmd"]
        if cmd.startswith("python "):
            cmd = sys.executable + cmd[len("python"):]
        for p in job["output"] + job["log"]:
            (REPO / p).parent.mkdir(parents=True, exist_ok=True)
        print(f"{job['rule']}: {cmd}")
        subprocess.run(["bash", "-c", "set -euo pipefail; " + cmd], cwd=REPO, env=env, check=True)


def runner_lines(runner: dict) -> list[str]:
    """Where and how long the GPU jobs ran (from run_stages.py's runner.json)."""
    jobs = runner.get("jobs", [])
    if not jobs:
        return []
    per_rule = {}
    for j in jobs:
        per_rule.setdefault(j["rule"], []).append(j["seconds"])
    return ["", f"GPU machine ({runner.get('device')}): the stages ran {runner.get('parallel')} at a time, "
                f"{runner.get('wall_seconds')} s wall in all; per stage (sum of job wall seconds): "
            + ", ".join(f"{k} {sum(v):.1f} s ({len(v)} jobs)" for k, v in per_rule.items())
            + ". Not done: " + (", ".join(f"{j['rule']} {j['output']} ({j['status']})" for j in jobs
                                           if j["status"] != "done") or "none") + "."]


def markdown(summary: Path, report_dir: Path, runner: dict) -> str:
    """The report stage's retraining table, then wall seconds, the GPU jobs and the provenance."""
    import pandas as pd

    from dropinf.pipeline.report import TIMING

    df = pd.read_csv(summary, dtype={"r": "Int64", "seed": "Int64"})
    out = [(report_dir / "retrain_table.md").read_text().rstrip("\n")]
    base = df[(df.method == "finetune")].set_index("metric")["value"]
    keys = ("test_accuracy", "train_accuracy", "initial_test_loss", "test_loss", "final_train_loss")
    out += ["", "Model trained on all training examples: " + ", ".join(f"{k} {base[k]:.4f}" for k in keys if k in base)
            + "."]
    tim = df[df.metric.isin(TIMING)]
    if len(tim):
        t = tim.groupby(["method", "metric"])["value"].mean().unstack()
        out += ["", "Mean wall seconds per seed: " + "; ".join(
            f"{m}: " + ", ".join(f"{k.replace('_seconds', '')} {v:.2f}" for k, v in row.dropna().items())
            for m, row in t.iterrows())]
    out += runner_lines(runner)
    prov = df.dropna(subset=["git_commit"])
    if len(prov):
        p = prov.iloc[0]
        out += ["", f"Provenance: git {p.git_commit} (dirty: {p.git_dirty}), config sha256 {p.config_sha256}, "
                    f"dropinf {p.dropinf_version}, torch {p.torch_version}, device {p.device}; every row of "
                    "`summary.csv` carries its own."]
    return "\n".join(out) + "\n"


def write_reference(exp_dir: Path, reference: Path, runner: dict | None = None) -> Path:
    """REFERENCE/<exp>/ from a finished run's results/<exp>/ (summary.csv and the report's files)."""
    summary, report_dir = exp_dir / "summary.csv", exp_dir / "report"
    ref = reference / exp_dir.name
    ref.mkdir(parents=True, exist_ok=True)
    shutil.copy2(summary, ref / "summary.csv")
    for name in ("accuracy_vs_removed.png", "retrain_table.csv", "timing_table.csv"):
        if (report_dir / name).exists():
            shutil.copy2(report_dir / name, ref / name)
    if runner:
        (ref / "device_runner.json").write_text(json.dumps(runner, indent=1) + "\n")
    (ref / "retrain_table.md").write_text(markdown(summary, report_dir, runner or {}))
    print((ref / "retrain_table.md").read_text())
    print(f"reference files in {ref}")
    return ref


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tar", type=Path, nargs="?", help="results.tar.gz of run_stages.py (omit with --exp-dir)")
    ap.add_argument("--plan", type=Path, default=REPO / ".devcarry")
    ap.add_argument("--exp-dir", type=Path, default=None,
                    help="a run finished by snakemake itself (results/<exp>/): only write the reference files")
    ap.add_argument("--reference", type=Path, default=REPO / "results" / "reference")
    args = ap.parse_args(argv)
    if args.exp_dir is not None:
        write_reference(args.exp_dir, args.reference)
        return
    if args.tar is None:
        ap.error("give results.tar.gz, or --exp-dir for a run made by snakemake")
    plan = json.loads((args.plan / "jobs.json").read_text())
    runner = unpack(args.tar)
    run_local(plan, args.plan / "env.json")
    summary = next(REPO / o for j in plan["local_jobs"] if j["rule"] == "summarize" for o in j["output"])
    write_reference(summary.parent, args.reference, runner)


if __name__ == "__main__":
    main()
