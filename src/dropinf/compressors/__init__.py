"""Registered compressors: importing a submodule registers what it defines, and every submodule of
this package is imported here, so a new compressor is one new file."""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import COMPRESSORS, Compressor, compressor

for _module in _pkgutil.iter_modules(__path__):  # registration
    _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["COMPRESSORS", "Compressor", "compressor"]
