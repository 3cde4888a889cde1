"""Plan the `lds` target of a workflow config for the GPU machine (no Snakemake there), here.

    .venv/bin/python scripts/device/make_lds_jobs.py --configfile workflow/configs/lds-X.yaml [--cores 16] [--dest .devcarry-lds]

The `lds` counterpart of `make_jobs.py` (same plan format, read by `run_stages.py`): runs
`snakemake -n -p lds --forcerun finetune extract lds_train lds_score` and keeps every job but
`prepare_data` (run it here first: its Debian data cannot be fetched there), `lds_summarize` and
`lds` (left for `finish_lds.py`, here). Copies the prepared dataset gzip-compressed with its SHA-256.
DEST must be ignored by git (.git/info/exclude) and named in the device call's `carry`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_jobs  # noqa: E402
from make_jobs import REPO  # noqa: E402

LOCAL_RULES = {"lds_summarize", "lds"}
FORCE = ("pretrain", "finetune", "extract", "lds_train", "lds_score")


def main(argv=None):
    make_jobs.main(argv, dest=REPO / ".devcarry-lds", doc=__doc__, targets=["lds"], force=FORCE, local_rules=LOCAL_RULES)


if __name__ == "__main__":
    main()
