"""Run a planned workflow (`make_jobs.py`) on a machine without Snakemake: the lent GPU machine.

    python3 scripts/device/run_stages.py .devcarry [--parallel 6] [--deadline-s 480] [--out $OUT]

Reads `PLAN/jobs.json` and `PLAN/env.json`, restores the carried inputs (gunzip, SHA-256 checked),
then runs every job's exact Snakemake shell command (`python` = this interpreter) as soon as the
jobs producing its inputs have finished, up to `--parallel` at once (several processes share one
GPU: the retraining jobs overlap each other's host-side gaps). Each job's log is where the rule
puts it. A failed job blocks only the jobs that need its outputs. At `--deadline-s` running jobs are
stopped (process group) and nothing new starts, so that whatever finished still comes back.

Finally writes `OUT/results.tar.gz` (the experiment's results without the per-example gradient
arrays and the model weights, its logs, and `runner.json` with every job's wall seconds and exit
status) and prints the fine-tuned model's metrics and every evaluation row.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def restore(plan_dir: Path, carried: list[dict]) -> None:
    for item in carried:
        dst = Path(item["path"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(plan_dir / item["gz"], "rb") as g, open(dst, "wb") as f:
            shutil.copyfileobj(g, f)
        digest = hashlib.sha256(dst.read_bytes()).hexdigest()
        if digest != item["sha256"]:
            sys.exit(f"{dst}: sha256 {digest} != planned {item['sha256']}")
        print(f"restored {dst} ({dst.stat().st_size / 2**20:.1f} MiB, sha256 ok)", flush=True)


def job_env(env_file: Path) -> dict:
    env = dict(os.environ)
    env.update(json.loads(env_file.read_text()))
    src = str(Path("src").resolve())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]
    env["PYTHONPATH"] = os.pathsep.join([src] + parts)
    env["DROPINF_REPO"] = str(Path.cwd())
    env.setdefault("OMP_NUM_THREADS", "4")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(job: dict) -> str:
    cmd = job["cmd"]
    if cmd.startswith("python "):
        cmd = shlex.quote(sys.executable) + cmd[len("python"):]
    return cmd


def run(jobs: list[dict], env: dict, parallel: int, deadline_s: float) -> list[dict]:
    produced_by = {o: j["jobid"] for j in jobs for o in j["output"]}
    state = {j["jobid"]: "waiting" for j in jobs}
    by_id = {j["jobid"]: j for j in jobs}
    deps = {j["jobid"]: {produced_by[i] for i in j["input"] if i in produced_by} for j in jobs}
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    records: dict[int, dict] = {}
    t0 = time.perf_counter()
    # longest chain first among ready jobs: evaluate jobs are the long ones, so start their inputs early
    order = {"finetune": 0, "extract": 1, "score": 2, "evaluate": 3}

    def start(jid):
        job = by_id[jid]
        for p in job["output"] + job["log"]:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["bash", "-c", "set -euo pipefail; " + command(job)], env=env, start_new_session=True)
        running[jid] = (proc, time.perf_counter())
        state[jid] = "running"
        print(f"[{time.perf_counter() - t0:7.1f}s] start {job['rule']} {jid}: {job['output'][0]}", flush=True)

    while True:
        for jid, (proc, ts) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[jid]
            job = by_id[jid]
            missing = [o for o in job["output"] if not Path(o).exists()]
            ok = rc == 0 and not missing
            state[jid] = "done" if ok else "failed"
            records[jid] = {"jobid": jid, "rule": job["rule"], "output": job["output"][0], "rc": rc,
                            "seconds": round(time.perf_counter() - ts, 2), "status": state[jid],
                            "started_s": round(ts - t0, 2)}
            print(f"[{time.perf_counter() - t0:7.1f}s] {state[jid]} {job['rule']} {jid} rc={rc} "
                  f"in {records[jid]['seconds']:.1f}s{' (missing ' + ', '.join(missing) + ')' if missing else ''}",
                  flush=True)
            if not ok:
                for lg in job["log"]:
                    if Path(lg).exists():
                        print(f"--- tail of {lg} ---\n" + "".join(Path(lg).read_text().splitlines(True)[-25:]), flush=True)
        for jid, s in state.items():  # block the dependents of failures
            if s == "waiting" and any(state[d] in ("failed", "blocked", "killed") for d in deps[jid]):
                state[jid] = "blocked"
                records[jid] = {"jobid": jid, "rule": by_id[jid]["rule"], "output": by_id[jid]["output"][0],
                                "rc": None, "seconds": 0.0, "status": "blocked"}
        over = time.perf_counter() - t0 > deadline_s
        if over:
            for jid, (proc, ts) in list(running.items()):
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                del running[jid]
                state[jid] = "killed"
                records[jid] = {"jobid": jid, "rule": by_id[jid]["rule"], "output": by_id[jid]["output"][0],
                                "rc": None, "seconds": round(time.perf_counter() - ts, 2), "status": "killed"}
                print(f"deadline: killed {by_id[jid]['rule']} {jid}", flush=True)
            for jid, s in state.items():
                if s == "waiting":
                    state[jid] = "not started"
                    records[jid] = {"jobid": jid, "rule": by_id[jid]["rule"], "output": by_id[jid]["output"][0],
                                    "rc": None, "seconds": 0.0, "status": "not started (deadline)"}
            break
        ready = [jid for jid, s in state.items() if s == "waiting" and all(state[d] == "done" for d in deps[jid])]
        ready.sort(key=lambda j: (order.get(by_id[j]["rule"], 9), j))
        for jid in ready[:max(0, parallel - len(running))]:
            start(jid)
        if not running and not any(s == "waiting" for s in state.values()):
            break
        time.sleep(0.2)
    print(f"all jobs ended after {time.perf_counter() - t0:.1f}s", flush=True)
    return [records[j["jobid"]] for j in jobs if j["jobid"] in records]


def pack(out: Path, exp_dirs: list[Path], runner: dict, skip=()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runner.json").write_text(json.dumps(runner, indent=1) + "\n")

    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if "grads" in parts and any(p.endswith(".zarr") for p in parts):
            return None  # per-example gradient arrays: large, and nothing downstream of `score` reads them
        if info.name.endswith("model/model.pt") or info.name in skip:
            return None  # the weights (26 MB for ResNet-9), and the carried inputs (already here)
        return info

    tar = out / "results.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for d in exp_dirs:
            if d.exists():
                t.add(str(d), filter=keep)
        t.add(str(out / "runner.json"), arcname="runner.json")
    print(f"packed {tar} ({tar.stat().st_size / 2**20:.2f} MiB)", flush=True)
    return tar


def show(exp_dir: Path) -> None:
    ft = exp_dir / "model" / "finetune.json"
    if ft.exists():
        rec = json.loads(ft.read_text())
        print("finetune:", {k: round(v, 4) for k, v in rec["metrics"].items()},
              "stage_seconds", rec.get("provenance", {}).get("stage_seconds"), flush=True)
    for p in sorted(exp_dir.glob("eval/*/*/metrics.csv")):
        with open(p) as f:
            rows = [r for r in csv.DictReader(f) if r["metric"].startswith("retrain")]
        by = {}
        for r in rows:
            by.setdefault(r["metric"], []).append(float(r["value"]))
        cells = ", ".join(f"{m.split('@')[1]}: {sum(v) / len(v):.4f} (n={len(v)})" for m, v in sorted(by.items()))
        print(f"{p.parent.parent.name}/{p.parent.name}: {cells or 'no retraining rows'}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", type=Path)
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--deadline-s", type=float, default=480.0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-out")))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    plan = json.loads((args.plan / "jobs.json").read_text())
    restore(args.plan, plan["carried"])
    env = job_env(args.plan / "env.json")
    records = run(plan["jobs"], env, args.parallel, args.deadline_s)
    exp_dirs = sorted({Path(*Path(j["output"][0]).parts[:2]) for j in plan["jobs"]}
                      | {Path(*Path(j["log"][0]).parts[:2]) for j in plan["jobs"] if j["log"]})
    try:
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception as e:  # pragma: no cover
        device = f"unknown ({e})"
    runner = {"configfile": plan["configfile"], "device": device, "parallel": args.parallel,
              "wall_seconds": round(time.perf_counter() - t0, 2), "jobs": records,
              "env": json.loads((args.plan / "env.json").read_text())}
    for d in exp_dirs:
        if d.parts[0] == "results":
            show(d)
    pack(args.out, exp_dirs, runner, skip={c["path"] for c in plan["carried"]})
    bad = [r for r in records if r["status"] != "done"]
    print(f"{len(records) - len(bad)} of {len(plan['jobs'])} jobs done; "
          + (f"not done: {[(r['rule'], r['output'], r['status']) for r in bad]}" if bad else "all done"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
