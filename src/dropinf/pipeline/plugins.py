"""Modules named by a config's `plugins:` key, imported by every workflow job before it runs.

A plugin is an ordinary importable module that registers what it defines the way the built-ins
do (a `Compressor` subclass with `name`, a `Solver` subclass with `names`, `@register_dataset`,
`@register_model`; docs/extending.md). The workflow hands the list to its jobs in the environment
variable `DROPINF_PLUGINS` (comma-separated) and reads the same modules' source at DAG time.
"""
from __future__ import annotations

import importlib

from ..errors import DropinfError
from .methods import environment_plugins


class PluginError(DropinfError, ImportError):
    """A `plugins:` module that cannot be imported."""


def load(modules) -> list[str]:
    """Import each module (registering what it defines); returns their names."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PluginError(f"plugin module {name!r} (config 'plugins') cannot be imported: {e}") from e
        loaded.append(name)
    return loaded


def load_environment() -> list[str]:
    """Import the plugins the workflow named for this job (none outside the workflow)."""
    return load(environment_plugins())
