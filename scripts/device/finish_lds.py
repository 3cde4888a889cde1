"""Finish, here, an `lds` run made on the GPU machine by `run_stages.py` (plan from `make_lds_jobs.py`).

    .venv/bin/python scripts/device/finish_lds.py PATH/results.tar.gz [--plan .devcarry-lds] [--reference results/reference]

1. Unpacks the results and logs that came back into this checkout (results/<exp>/, logs/<exp>/).
2. Runs the workflow's own `lds_summarize` with the command Snakemake planned (`local_jobs`) and
   the GPU jobs' environment (config sha256, commit).
3. Writes `REFERENCE/<exp>/`: `summary.csv`, `lds_table.md` (with the device run's job timings
   appended), `device_runner.json` (every GPU job's wall seconds and status), `subset_models.csv`
   (per subset model: test loss, test accuracy, wall seconds) and `lds_per_test.csv` (LDS_j of
   every method, r, seed and test example).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finish import REPO, run_local, unpack  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tar", type=Path)
    ap.add_argument("--plan", type=Path, default=REPO / ".devcarry-lds")
    ap.add_argument("--reference", type=Path, default=REPO / "results" / "reference")
    args = ap.parse_args(argv)
    plan = json.loads((args.plan / "jobs.json").read_text())
    runner = unpack(args.tar)
    done = {j["output"]: j["status"] for j in runner["jobs"]}
    local = [j for j in plan["local_jobs"] if j["rule"] == "lds_summarize"]
    if any(not (REPO / i).exists() for j in local for i in j["input"]):
        print("not every input of lds_summarize came back: " + ", ".join(
            f"{k} ({v})" for k, v in done.items() if v != "done"))
    run_local({"local_jobs": local}, args.plan / "env.json")

    from dropinf.pipeline.lds import load_npz, load_parts

    job = local[0]
    summary = REPO / next(o for o in job["output"] if o.endswith("summary.csv"))
    table = REPO / next(o for o in job["output"] if o.endswith(".md"))
    exp = summary.parent.parent.name
    ref = args.reference / exp
    ref.mkdir(parents=True, exist_ok=True)
    shutil.copy2(summary, ref / "summary.csv")
    (ref / "device_runner.json").write_text(json.dumps(runner, indent=1) + "\n")
    per_rule = {}
    for j in runner["jobs"]:
        per_rule.setdefault(j["rule"], []).append(j["seconds"])
    text = table.read_text() + (
        f"\nGPU machine ({runner.get('device')}): {len(runner['jobs'])} jobs, {runner.get('parallel')} at a time, "
        f"{runner.get('wall_seconds')} s wall in all; per rule (sum of job wall seconds): "
        + ", ".join(f"{k} {sum(v):.1f} s ({len(v)} jobs)" for k, v in per_rule.items())
        + ". Not done: " + (", ".join(f"{j['rule']} {j['output']} ({j['status']})" for j in runner["jobs"]
                                       if j["status"] != "done") or "none") + ".\n")
    (ref / "lds_table.md").write_text(text)
    parts = [REPO / i for i in job["input"] if i.endswith(".npz")]
    sub = load_parts(parts)
    with open(ref / "subset_models.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "n_train_examples", "test_loss_mean", "test_accuracy", "train_seconds"])
        for k in range(len(sub["model_ids"])):
            w.writerow([int(sub["model_ids"][k]), int(sub["masks"][k].sum()), f"{sub['test_loss'][k].mean():.6f}",
                        f"{sub['test_accuracy'][k]:.6f}", f"{sub['seconds'][k]:.3f}"])
    with open(ref / "lds_per_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "r", "seed", "test_index", "lds"])
        for i in job["input"]:
            if not i.endswith("metrics.csv"):
                continue
            npz = (REPO / i).with_name("per_test.npz")
            meta, arrays = load_npz(npz)
            for seed, row in zip(meta.get("seeds", []), arrays["lds"]):
                for j, v in enumerate(row):
                    w.writerow([meta["method"], "" if meta["r"] is None else meta["r"],
                                "" if seed is None else seed, j, f"{v:.6f}"])
    print(text)
    print(f"reference files in {ref}")


if __name__ == "__main__":
    main()
