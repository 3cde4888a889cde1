"""Finish, here, a workflow run made on the GPU machine by `run_stages.py`.

    .venv/bin/python scripts/device/finish.py PATH/results.tar.gz [--plan .devcarry] [--reference results/reference]

1. Unpacks the results and logs that came back into this checkout (results/<exp>/, logs/<exp>/).
2. Runs the workflow's own `summarize` and `report` stages with the exact commands Snakemake planned
   (`local_jobs` of the plan) and the same environment as the GPU jobs (config sha256, commit).
3. Writes `REFERENCE/<exp>/`: `summary.csv` (every row with its provenance), `retrain_table.md`
   (test accuracy after removing the most helpful fraction: mean ± std over seeds, n, per method;
   the methods the workflow skipped, with the reason; wall seconds per stage), the report's
   `accuracy_vs_removed.png`, and `device_runner.json` (each GPU job's wall seconds and status).
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


def fmt(mean, std, n) -> str:
    import math

    if n <= 1 or std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def markdown(summary: Path, exp_dir: Path, runner: dict, methods: list[str]) -> str:
    import pandas as pd

    from dropinf.pipeline.report import RETRAIN

    df = pd.read_csv(summary, dtype={"r": "Int64", "seed": "Int64"})
    base = df[(df.method == "finetune")].set_index("metric")["value"]
    ret = df[df.metric.str.match(RETRAIN)].copy()
    ret["fraction"] = ret.metric.str.extract(RETRAIN)["f"].astype(float)
    fractions = sorted(ret.fraction.unique())
    lines = []
    head = "| method | r | " + " | ".join(f"{f:.0%} removed" for f in fractions) + " | seeds |"
    lines += [head, "|" + "---|" * (len(fractions) + 3)]
    if "test_accuracy" in base:
        lines.append("| none (all training examples) | | " + " | ".join(f"{base['test_accuracy']:.3f}" for _ in fractions)
                     + " | 1 |")
    skipped = {}
    for m in methods:
        g = ret[ret.method == m]
        if not len(g):
            for tag in sorted((exp_dir / "scores" / m).glob("*/manifest.json")):
                rec = json.loads(tag.read_text())
                if rec.get("status") == "skipped":
                    skipped[m] = rec.get("reason", "")
            lines.append(f"| {m} | | " + " | ".join("skipped" if m in skipped else "not run" for _ in fractions) + " | 0 |")
            continue
        for r, gr in g.groupby("r", dropna=False):
            cells = []
            for f in fractions:
                v = gr[gr.fraction == f]["value"]
                cells.append(fmt(float(v.mean()), float(v.std()) if len(v) > 1 else None, len(v)) if len(v) else "–")
            n = gr.groupby("fraction")["value"].count().max()
            lines.append(f"| {m} | {'' if pd.isna(r) else int(r)} | " + " | ".join(cells) + f" | {n} |")
    out = ["Test accuracy on the 256 held-out images after removing the given fraction of the most helpful "
           "training examples (most negative influence) and retraining with the same initialisation, order and "
           "settings; mean ± sample std over the seeds (compressor seeds; random-score seeds for `random`). "
           "Lower = the method found more valuable examples.", "", *lines, ""]
    if "test_accuracy" in base:
        extra = ", ".join(f"{k} {base[k]:.4f}" for k in ("test_accuracy", "train_accuracy", "test_loss") if k in base)
        out.append(f"Model trained on all training examples: {extra}.")
    for m, why in skipped.items():
        out.append(f"- **{m}** skipped by the workflow: {why}")
    tim = df[df.metric.isin(["extract_seconds", "score_seconds"])]
    if len(tim):
        t = tim.groupby(["method", "metric"])["value"].mean().unstack()
        out += ["", "Mean wall seconds per seed (GPU): " + "; ".join(
            f"{m}: " + ", ".join(f"{k.replace('_seconds', '')} {v:.2f}" for k, v in row.dropna().items())
            for m, row in t.iterrows())]
    jobs = runner.get("jobs", [])
    if jobs:
        per_rule = {}
        for j in jobs:
            per_rule.setdefault(j["rule"], []).append(j["seconds"])
        out += ["", f"GPU machine ({runner.get('device')}): the stages ran {runner.get('parallel')} at a time, "
                    f"{runner.get('wall_seconds')} s wall in all; per stage (sum of job wall seconds): "
                + ", ".join(f"{k} {sum(v):.1f} s ({len(v)} jobs)" for k, v in per_rule.items())
                + ". Not done: " + (", ".join(f"{j['rule']} {j['output']} ({j['status']})" for j in jobs
                                               if j["status"] != "done") or "none") + "."]
    prov = df.dropna(subset=["git_commit"])
    if len(prov):
        p = prov.iloc[0]
        out += ["", f"Provenance: git {p.git_commit} (dirty: {p.git_dirty}), config sha256 {p.config_sha256}, "
                    f"dropinf {p.dropinf_version}, torch {p.torch_version}, device {p.device}; every row of "
                    "`summary.csv` carries its own."]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tar", type=Path)
    ap.add_argument("--plan", type=Path, default=REPO / ".devcarry")
    ap.add_argument("--reference", type=Path, default=REPO / "results" / "reference")
    args = ap.parse_args(argv)
    plan = json.loads((args.plan / "jobs.json").read_text())
    runner = unpack(args.tar)
    run_local(plan, args.plan / "env.json")
    summary = next(REPO / o for j in plan["local_jobs"] if j["rule"] == "summarize" for o in j["output"])
    exp_dir = summary.parent
    report_dir = next((REPO / j["output"][0]).parent for j in plan["local_jobs"] if j["rule"] == "report")
    import yaml

    config = yaml.safe_load((REPO / plan["configfile"]).read_text())
    ref = args.reference / exp_dir.name
    ref.mkdir(parents=True, exist_ok=True)
    shutil.copy2(summary, ref / "summary.csv")
    for name in ("accuracy_vs_removed.png", "retrain_table.csv", "timing_table.csv"):
        if (report_dir / name).exists():
            shutil.copy2(report_dir / name, ref / name)
    (ref / "device_runner.json").write_text(json.dumps(runner, indent=1) + "\n")
    (ref / "retrain_table.md").write_text(markdown(summary, exp_dir, runner, list(config["methods"])))
    print((ref / "retrain_table.md").read_text())
    print(f"reference files in {ref}")


if __name__ == "__main__":
    main()
