"""Plan a workflow run for a machine without Snakemake (the lent GPU machine), here, with Snakemake.

    .venv/bin/python scripts/device/make_jobs.py --configfile workflow/configs/X.yaml [--cores 16] [--dest .devcarry]

1. Runs `snakemake -n -p --forcerun pretrain finetune extract score evaluate` (the local
   `prepare_data`/`prepare_pretrain_data` outputs are kept: their Debian data cannot be fetched there) and parses every job: rule, jobid,
   input, output, log and the exact shell command Snakemake would run. `summarize`, `report` and
   `all` are left for here.
2. Writes `DEST/jobs.json` (the jobs in Snakemake's listing order, which `run_stages.py` re-orders
   by their inputs; `local_jobs`: the summarize/report commands that `finish.py` runs here) and
   `DEST/env.json`: the variables the Snakefile hands every job (DROPINF_CONFIG_SHA256, computed
   exactly as `workflow/rules/common.smk` does) plus the git commit and dirty flag of this checkout
   (DROPINF_COMMIT, DROPINF_GIT_DIRTY: the stages there record these, not the copy's own .git, which can be stale).
3. Copies the prepared dataset gzip-compressed to `DEST/<its path>.gz` with its SHA-256, so that it
   fits the 64 MiB the device tool carries; `run_stages.py` restores and checks it.

DEST must be ignored by git (listed in .git/info/exclude) and named in the device call's `carry`.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
from dropinf.pipeline.common import git_state  # noqa: E402

LOCAL_RULES = {"summarize", "report", "all"}
FORCE = ("pretrain", "finetune", "extract", "score", "evaluate")
FIELDS = ("input", "output", "log")


def config_sha256(configfile: Path) -> str:
    """sha256 of the validated config (schema defaults filled), as common.smk computes it."""
    import yaml
    from snakemake.utils import validate

    config = yaml.safe_load(configfile.read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def parse_dry_run(text: str) -> list[dict]:
    """Jobs of a `snakemake -n -p` listing: {rule, jobid, input, output, log, cmd}."""
    jobs, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            cur = {"rule": m.group(1), "input": [], "output": [], "log": [], "cmd": None}
            jobs.append(cur)
            continue
        if cur is None:
            continue
        m = re.match(r"^\s+(input|output|log|jobid): (.*)$", line)
        if m:
            key, val = m.groups()
            if key == "jobid":
                cur["jobid"] = int(val)
            else:
                cur[key] = [v.strip() for v in val.split(", ") if v.strip()]
            continue
        if line.startswith("Shell command: "):
            cmd = line[len("Shell command: "):]
            cur["cmd"] = None if cmd == "None" else cmd  # a rule without a shell command (`all`)
    return jobs


def plan(configfile: Path, cores: int, dest: Path, targets=(), force=FORCE, local_rules=LOCAL_RULES) -> dict:
    """Plan `snakemake -n -p TARGETS --forcerun FORCE` into DEST (jobs.json, env.json, the carried inputs)."""
    import yaml

    if "pretrain" not in yaml.safe_load(Path(configfile).read_text()):
        force = [f for f in force if f != "pretrain"]  # forcing a rule adds its jobs to the DAG
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    # every job but the data preparation, even where outputs exist here (e.g. the seeded `random`
    # scores, which do not depend on the model)
    cmd = [snakemake, "-n", "-p", *targets, "--cores", str(cores), "--forcerun", *force,
           "--configfile", str(configfile), "--replace-workflow-config"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"snakemake dry-run failed:\n{out.stdout}\n{out.stderr}")
    parsed = parse_dry_run(out.stdout)
    jobs = [j for j in parsed if j["rule"] not in local_rules]
    local_jobs = [j for j in parsed if j["rule"] in local_rules and j["cmd"]]
    for rule in ("prepare_data", "prepare_pretrain_data"):
        if any(j["rule"] == rule for j in jobs):
            sys.exit(f"{rule} would run: run it here first (snakemake --cores 1 ... <its dataset.pt>)")
    missing = [j["rule"] for j in jobs if not j["cmd"]]
    if missing:
        sys.exit(f"no shell command parsed for {missing}")
    produced = {o for j in jobs for o in j["output"]}
    external = sorted({i for j in jobs for i in j["input"] if i not in produced})
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    carried = []
    for path in external:
        src = REPO / path
        if not src.is_file():
            sys.exit(f"input {path} is neither produced by a job nor present here")
        gz = dest / (path.replace("/", "__") + ".gz")
        with open(src, "rb") as f, gzip.open(gz, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
        carried.append({"path": path, "gz": gz.name, "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                        "bytes": src.stat().st_size})
    commit, dirty = git_state(str(REPO))
    env = {"DROPINF_CONFIG_SHA256": config_sha256(configfile), "DROPINF_COMMIT": commit, "DROPINF_GIT_DIRTY": dirty}
    result = {"configfile": str(configfile), "cores": cores, "jobs": jobs, "carried": carried, "local_jobs": local_jobs}
    (dest / "jobs.json").write_text(json.dumps(result, indent=1) + "\n")
    (dest / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    counts = {}
    for j in jobs:
        counts[j["rule"]] = counts.get(j["rule"], 0) + 1
    print(f"{len(jobs)} jobs {counts}; local {[j['rule'] for j in local_jobs]}; carried inputs {external}; "
          f"{dest} holds {size / 2**20:.1f} MiB; env {env}")
    return result


def main(argv=None, dest=REPO / ".devcarry", doc=__doc__, **plan_kw):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", required=True, type=Path)
    ap.add_argument("--cores", type=int, default=16, help="cores of the target machine (caps each rule's threads)")
    ap.add_argument("--dest", type=Path, default=dest)
    args = ap.parse_args(argv)
    plan(args.configfile, args.cores, args.dest, **plan_kw)


if __name__ == "__main__":
    main()
