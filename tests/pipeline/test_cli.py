"""The `dropinf` console command: `--version`, the entry point named in pyproject.toml, and
`python -m dropinf` still working."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import dropinf

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def _entry_point():
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["dropinf"]
    module, _, attr = target.partition(":")
    return module, attr


def test_entry_point_is_main_and_prints_the_version(capsys):
    module, attr = _entry_point()
    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dropinf {dropinf.__version__}"


def test_console_command_and_module_run_the_same_cli(capsys):
    module, attr = _entry_point()
    # what the installed `dropinf` script does: import the entry point and exit with its return value
    script = f"import sys; from {module} import {attr}; sys.exit({attr}())"
    for cmd in ([sys.executable, "-c", script, "--version"], [sys.executable, "-m", "dropinf", "--version"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"dropinf {dropinf.__version__}"
    from dropinf.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: dropinf ") and "--version" in out
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "<stage>" in capsys.readouterr().err  # a stage is required


def test_module_run_builds_every_stage_including_group_actions():
    """`python -m dropinf` runs `__main__` as a script: the stages it lists come from the one
    registry that the stage modules fill on import."""
    proc = subprocess.run([sys.executable, "-m", "dropinf", "lds", "score", "--help"], capture_output=True, text=True,
                          env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--per-test" in proc.stdout and "--curvature" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "dropinf", "lds", "train"], capture_output=True, text=True, env=ENV,
                          cwd=REPO)
    assert proc.returncode == 2 and "--data" in proc.stderr and "required" in proc.stderr  # argparse usage error
