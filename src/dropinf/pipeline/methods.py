"""Which methods exist, and what each needs from the extraction stage.

This module imports nothing heavy: the Snakefile loads it by path (no torch import at DAG time),
and the stages import it normally. It is the one place that maps a method to its extraction.
"""
from __future__ import annotations

#: Full-space methods: they need raw per-example gradients (the `identity` extraction) and solve
#: block-diagonal by `score.curvature` (docs/curvature.md). Skipped, with the reason logged, when d
#: is too large.
FULL_SPACE = ("orig", "lissa", "datainf", "tracin")

#: Compressed methods: the compressor of the same name, then the `exact` solver in r-space with
#: the blocks of its columns under `score.curvature`.
COMPRESSED = ("dropout", "importance_dropout", "gaussian", "logra", "sjlt")

#: Baselines that need no gradients.
BASELINES = ("random",)

METHODS = FULL_SPACE + COMPRESSED + BASELINES


def extraction_of(method: str) -> str | None:
    """Compressor whose arrays `method` reads (None: needs none)."""
    if method in FULL_SPACE:
        return "identity"
    if method in COMPRESSED:
        return method
    if method in BASELINES:
        return None
    raise KeyError(f"unknown method {method!r}; known: {list(METHODS)}")


def solver_of(method: str) -> str:
    """The `dropinf.influence` method name used on the extracted arrays."""
    if method in FULL_SPACE:
        return method
    if method in COMPRESSED:
        return "exact"
    raise KeyError(f"method {method!r} has no solver")


def uses_r(method: str) -> bool:
    return method in COMPRESSED


def uses_seed(method: str) -> bool:
    """Seeded methods (compressor seed or random-score seed) give one result per seed."""
    return method in COMPRESSED or method in BASELINES


def rtag(r) -> str:
    """Path segment for a compression size: 'r16', or 'full' for no compression."""
    return "full" if r is None or r == "full" else f"r{int(r)}"


def parse_rtag(tag: str) -> int | None:
    if tag == "full":
        return None
    if not tag.startswith("r") or not tag[1:].isdigit():
        raise ValueError(f"bad r tag {tag!r}: expected 'full' or 'r<int>'")
    return int(tag[1:])
