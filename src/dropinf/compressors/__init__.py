"""Registered compressors; importing a submodule registers it."""
from .base import COMPRESSORS, Compressor, compressor
from . import identity, dropout, gaussian, importance, logra, sjlt  # noqa: F401  (registration)

__all__ = ["COMPRESSORS", "Compressor", "compressor"]
