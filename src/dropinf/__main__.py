"""Command line: `dropinf <stage> [options]` (or `python -m dropinf`), the workflow's stages (see
`dropinf.pipeline`); `dropinf --version` prints the version.

Every stage reads and writes files only; the Snakefile is a thin layer over these commands. Each
subcommand is built from its stage's options dataclass (`dropinf.pipeline.commands`, which also
says how to register one more). JSON-valued options (`--options`, `--dataset-options`, ...) take a
JSON object; a compressed size `--r` takes an int or 'full'.
Exit codes: 0 success, 2 a user/configuration error (message on stderr), 1 anything else.
"""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    from . import __version__
    from .pipeline.commands import add_stages

    p = argparse.ArgumentParser(prog="dropinf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dropinf {__version__}")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also: DROPINF_PROGRESS=0)")
    add_stages(p, dest="stage")
    return p


def main(argv=None) -> int:
    """Entry point of the `dropinf` console command and of `python -m dropinf`."""
    args = parser().parse_args(argv)
    from .errors import DropinfError
    from .pipeline.commands import run
    from .pipeline.common import log, setup_logging

    setup_logging(args.log_level)
    if args.no_progress:
        from .progress import set_enabled
        set_enabled(False)
    try:
        return run(args)
    except DropinfError as e:
        log.error("%s: %s", args.stage, e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
