"""The method registry: what a config's `methods:` entry means.

A method is (extraction, solver, uses r, uses seed, options it accepts), derived from the
registered compressors (`dropinf.compressors`) and influence solvers (`dropinf.influence`):

* each solver alone is a full-space method on raw gradients (the `identity` extraction), named by
  the solver's first name: `orig` (the exact solve), `lissa`, `datainf`, `tracin`;
* each compressor alone is a compressed method of the same name solved exactly in r-space
  (`dropout`, `gaussian`, ...);
* `COMPRESSOR+SOLVER` pairs any compressor with any other solver in r-space (`dropout+lissa`,
  `gaussian+datainf`, `sjlt+tracin`); every solver here only reads the rows it is given, so each
  one runs on compressed columns exactly as on raw ones. The name is also the result path segment
  (`scores/dropout+lissa/r16/`);
* `random`: seeded random scores, no gradients.

This module imports nothing heavy: the Snakefile loads it by path (no torch at DAG time), and the
names come from `options.py`, which parses the registering modules (built-in and `plugins:`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

if __package__:
    from . import options as _options
else:  # loaded by path at DAG time: options.py is the sibling file
    import importlib.util as _util

    _spec = _util.spec_from_file_location("dropinf_options", os.path.join(os.path.dirname(__file__), "options.py"))
    _options = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_options)

#: the extraction of the full-space methods (raw per-example gradients)
RAW = "identity"
#: the solver of a compressor named alone
EXACT = "exact"
#: joins a compressor and a solver in one method name
PAIR = "+"
#: environment variable through which the workflow hands its `plugins:` modules to every job
ENV_PLUGINS = "DROPINF_PLUGINS"


class MethodError(ValueError):
    """A method name that the registry cannot resolve; the message says why and what is allowed."""


@dataclass(frozen=True)
class Method:
    name: str
    extraction: str | None  # compressor whose arrays it reads (None: needs no gradients)
    solver: str | None      # `dropinf.influence` method name (None: random scores)
    uses_r: bool
    uses_seed: bool         # one result per seed (compressor seed or random-score seed)
    options: tuple[str, ...] = ()  # keys `score.method_options.<name>` accepts

    @property
    def full_space(self) -> bool:
        return self.extraction == RAW


class Registry:
    """Every method of the given compressors and solvers (see the module docstring)."""

    def __init__(self, compressors: dict[str, dict], solvers: list[tuple[str, ...]], solver_options=()):
        self.compressors = {c: info for c, info in compressors.items() if c != RAW}
        self.solver_groups = [tuple(g) for g in solvers]
        exact = next((g for g in self.solver_groups if EXACT in g), None)
        if exact is None:
            raise MethodError(f"no registered solver is named {EXACT!r}: compressors have no default solver")
        self.exact_names = exact
        self.solver_options = tuple(solver_options)
        opts = self.solver_options
        full = [Method(g[0], RAW, g[0], False, False, opts)
                for g in [exact] + [g for g in self.solver_groups if g is not exact]]
        comp = [Method(c, c, EXACT, True, True, opts) for c in sorted(self.compressors)]
        self.plain: dict[str, Method] = {m.name: m for m in full + comp}
        self.plain["random"] = Method("random", None, None, False, True, ())
        #: solver names a pair may use: one per solver, the exact one excluded (that is the plain name)
        self.pair_solvers = [g[0] for g in self.solver_groups if g is not exact]

    # ---- names -----------------------------------------------------------------------------------
    @property
    def full_space(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.plain.values() if m.full_space)

    @property
    def compressed(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.plain.values() if m.uses_r)

    @property
    def baselines(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.plain.values() if m.extraction is None)

    def pairs(self) -> list[str]:
        return [f"{c}{PAIR}{s}" for c in sorted(self.compressors) for s in self.pair_solvers]

    def names(self) -> list[str]:
        """Every method a config may name: plain ones first, then the pairs."""
        return list(self.plain) + self.pairs()

    # ---- lookup ----------------------------------------------------------------------------------
    def get(self, name: str) -> Method:
        if not isinstance(name, str):
            raise MethodError(f"a method is a name, got {name!r}")
        if name in self.plain:
            return self.plain[name]
        if PAIR not in name:
            raise MethodError(f"{name!r} is not one of {', '.join(self.plain)}, nor a "
                              f"compressor{PAIR}solver pair ({self._pair_help()})")
        comp, _, solver = name.partition(PAIR)
        if comp == RAW:
            raise MethodError(f"{name!r}: raw gradients with a solver is the full-space method named by the "
                              f"solver alone (write {solver if solver in self.full_space else 'orig'!r})")
        if comp not in self.compressors:
            raise MethodError(f"{name!r}: unknown compressor {comp!r} ({self._pair_help()})")
        if solver in self.exact_names:
            raise MethodError(f"{name!r} is the method {comp!r} (a compressor alone is solved exactly); write {comp!r}")
        if solver not in self.pair_solvers:
            raise MethodError(f"{name!r}: unknown solver {solver!r} ({self._pair_help()})")
        return Method(name, comp, solver, True, True, self.solver_options)

    def _pair_help(self) -> str:
        return (f"compressors: {', '.join(sorted(self.compressors))}; solvers: {', '.join(self.pair_solvers)}; "
                f"e.g. 'dropout{PAIR}lissa'")

    def errors(self, methods, key: str = "methods") -> list[str]:
        """One config-error line per entry of a config's `methods:` list that names no method."""
        out = []
        for i, name in enumerate(methods if isinstance(methods, list) else []):
            try:
                self.get(name)
            except MethodError as e:
                out.append(f"config error at '{key}[{i}]': {e}")
        return out


def registry(plugins=()) -> Registry:
    """The registry of the built-in compressors and solvers plus those of the `plugins` modules."""
    return _registry(tuple(plugins))


@lru_cache(maxsize=None)
def _registry(plugins: tuple[str, ...]) -> Registry:
    return Registry(_options.compressor_table(plugins), _options.solver_names(plugins), _options.solver_options())


def schema_names(plugins=()) -> dict[str, list[str]]:
    """The name lists of the config schema's `x-registry` nodes (see `options.config_schema`)."""
    reg = registry(plugins)
    names = _options.registry_names(plugins)
    names["methods"] = reg.names()
    names["solved_methods"] = [n for n in reg.names() if reg.get(n).solver is not None]
    return names


def environment_plugins() -> tuple[str, ...]:
    """The plugin modules a workflow job was handed (empty outside the workflow)."""
    return tuple(p for p in os.environ.get(ENV_PLUGINS, "").split(",") if p.strip())


def current() -> Registry:
    """The registry of this process: built-ins plus the plugins the workflow named."""
    return registry(environment_plugins())


def method(name: str) -> Method:
    return current().get(name)


# The built-in names (a plugin's methods are resolved by `method()` / `current()`).
_BUILTIN = registry()
FULL_SPACE = _BUILTIN.full_space
COMPRESSED = _BUILTIN.compressed
BASELINES = _BUILTIN.baselines
METHODS = FULL_SPACE + COMPRESSED + BASELINES


def extraction_of(name: str) -> str | None:
    """Compressor whose arrays `name` reads (None: needs none)."""
    return method(name).extraction


def solver_of(name: str) -> str:
    """The `dropinf.influence` method name used on the extracted arrays."""
    m = method(name)
    if m.solver is None:
        raise MethodError(f"method {name!r} has no solver")
    return m.solver


def uses_r(name: str) -> bool:
    return method(name).uses_r


def uses_seed(name: str) -> bool:
    """Seeded methods (compressor seed or random-score seed) give one result per seed."""
    return method(name).uses_seed


def is_full_space(name: str) -> bool:
    return method(name).full_space


def rtag(r) -> str:
    """Path segment for a compression size: 'r16', or 'full' for no compression."""
    return "full" if r is None or r == "full" else f"r{int(r)}"


def parse_rtag(tag: str) -> int | None:
    if tag == "full":
        return None
    if not tag.startswith("r") or not tag[1:].isdigit():
        raise ValueError(f"bad r tag {tag!r}: expected 'full' or 'r<int>'")
    return int(tag[1:])
