"""Plan the `lds` target of a workflow config for the GPU machine (no Snakemake there), here.

    .venv/bin/python scripts/device/make_lds_jobs.py --configfile workflow/configs/lds-X.yaml [--cores 16] [--dest .devcarry-lds]

The `lds` counterpart of `make_jobs.py` (same plan format, read by `run_stages.py`): runs
`snakemake -n -p lds --forcerun finetune extract lds_train lds_score` and keeps every job but
`prepare_data` (run it here first: its Debian data cannot be fetched there), `lds_summarize` and
`lds` (left for `finish_lds.py`, here). Copies the prepared dataset gzip-compressed with its SHA-256.
DEST must be ignored by git (.git/info/exclude) and named in the device call's `carry`.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_jobs import REPO, config_sha256, git, parse_dry_run  # noqa: E402

LOCAL_RULES = {"lds_summarize", "lds"}
FORCE = ("finetune", "extract", "lds_train", "lds_score")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", required=True, type=Path)
    ap.add_argument("--cores", type=int, default=16, help="cores of the target machine (caps each rule's threads)")
    ap.add_argument("--dest", type=Path, default=REPO / ".devcarry-lds")
    args = ap.parse_args(argv)

    snakemake = str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "-n", "-p", "lds", "--cores", str(args.cores), "--forcerun", *FORCE,
           "--configfile", str(args.configfile), "--replace-workflow-config"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"snakemake dry-run failed:\n{out.stdout}\n{out.stderr}")
    parsed = parse_dry_run(out.stdout)
    jobs = [j for j in parsed if j["rule"] not in LOCAL_RULES]
    local_jobs = [j for j in parsed if j["rule"] in LOCAL_RULES and j["cmd"]]
    if any(j["rule"] == "prepare_data" for j in jobs):
        sys.exit("prepare_data would run: run it here first (snakemake --cores 1 ... <dataset.pt>)")
    missing = [j["rule"] for j in jobs if not j["cmd"]]
    if missing:
        sys.exit(f"no shell command parsed for {missing}")
    produced = {o for j in jobs for o in j["output"]}
    external = sorted({i for j in jobs for i in j["input"] if i not in produced})
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    carried = []
    for path in external:
        src = REPO / path
        if not src.is_file():
            sys.exit(f"input {path} is neither produced by a job nor present here")
        gz = args.dest / (path.replace("/", "__") + ".gz")
        with open(src, "rb") as f, gzip.open(gz, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
        carried.append({"path": path, "gz": gz.name, "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                        "bytes": src.stat().st_size})
    env = {"DROPINF_CONFIG_SHA256": config_sha256(args.configfile),
           "DROPINF_COMMIT": git("rev-parse", "HEAD") or "unknown",
           "DROPINF_GIT_DIRTY": "true" if git("status", "--porcelain", "--untracked-files=no") else "false"}
    plan = {"configfile": str(args.configfile), "cores": args.cores, "jobs": jobs, "carried": carried,
            "local_jobs": local_jobs}
    (args.dest / "jobs.json").write_text(json.dumps(plan, indent=1) + "\n")
    (args.dest / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    size = sum(p.stat().st_size for p in args.dest.iterdir() if p.is_file())
    counts = {}
    for j in jobs:
        counts[j["rule"]] = counts.get(j["rule"], 0) + 1
    print(f"{len(jobs)} jobs {counts}; local {[j['rule'] for j in local_jobs]}; carried inputs {external}; "
          f"{args.dest} holds {size / 2**20:.1f} MiB; env {env}")


if __name__ == "__main__":
    main()
