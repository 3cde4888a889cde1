"""The workflow's stages, each a function with keyword-only parameters and a dataclass of its
options, registered (`commands.command`) as the CLI's `python -m dropinf <stage>`.

prepare_data -> finetune -> extract -> score -> evaluate -> summarize -> report. The Snakefile
passes every knob explicitly; outputs are complete or absent (see `common.atomic_path`).
A job of the workflow first imports the config's `plugins:` modules (see `plugins`).
"""
from .plugins import load_environment as _load_plugins

_load_plugins()
