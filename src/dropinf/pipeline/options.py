"""Checks of a workflow config that run before anything else, without importing torch.

The Snakefile loads this file by path at DAG time (like `methods.py`); it uses the standard
library and PyYAML only. It knows the keyword options of every registered dataset loader, model
builder, compressor and influence solver by *parsing* their source files (`ast`): the names a
registry decorator or class attribute registers, and the parameters of the function or
`__init__` behind it. `tests/pipeline/test_integrity.py` checks these tables against the live
registries (`inspect.signature`), so they cannot drift.
"""
from __future__ import annotations

import ast
import os

import yaml

PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # src/dropinf

#: parameters the stages pass themselves, so a config cannot set them
STAGE_SET = {
    "model": {"data"},
    "compressor": {"self", "dim", "r", "seed", "layout"},
    "solver": {"device", "chunk_rows", "layout", "progress"},
}


def _params(fn: ast.FunctionDef, skip: set[str], drop_first: int = 0) -> list[str] | None:
    """Keyword-settable parameter names of `fn`, or None when it takes **kwargs (anything goes)."""
    if fn.args.kwarg is not None:
        return None
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args][drop_first:] + [a.arg for a in fn.args.kwonlyargs]
    return [n for n in names if n not in skip]


def _parse(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read(), filename=path)


def _decorated(folder: str, decorator: str, skip: set[str]) -> dict[str, list[str] | None]:
    """{registered name: parameters} of functions decorated with `@decorator("name")` in `folder`,
    plus `decorator(f"prefix_{x}")(functools.partial(fn, x))` registrations (one per loop value:
    matched by prefix, `fn` without its first parameter)."""
    table: dict[str, list[str] | None] = {}
    partials: dict[str, list[str] | None] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = _parse(os.path.join(folder, name))
        funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        for fn in funcs.values():
            for dec in fn.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == decorator and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    table[dec.args[0].value] = _params(fn, skip)
        for node in ast.walk(tree):  # decorator(f"glue_{task}")(functools.partial(glue, task))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)
                    and getattr(node.func.func, "id", None) == decorator and node.func.args
                    and isinstance(node.func.args[0], ast.JoinedStr) and node.args
                    and isinstance(node.args[0], ast.Call) and node.args[0].args):
                prefix = "".join(v.value for v in node.func.args[0].values if isinstance(v, ast.Constant))
                target = getattr(node.args[0].args[0], "id", None)
                if target in funcs:
                    bound = len(node.args[0].args) - 1
                    partials[prefix] = _params(funcs[target], skip, drop_first=bound)
    return {"": table, **{f"prefix:{k}": v for k, v in partials.items()}}  # type: ignore[dict-item]


def _lookup(tables, name: str):
    """(found, params) of a registered name in a `_decorated` result."""
    if name in tables[""]:
        return True, tables[""][name]
    for key, params in tables.items():
        if key.startswith("prefix:") and name.startswith(key[len("prefix:"):]):
            return True, params
    return False, None


def dataset_options() -> dict:
    return _decorated(os.path.join(PKG, "data"), "register_dataset", set())


def model_options() -> dict:
    return _decorated(os.path.join(PKG, "models"), "register_model", STAGE_SET["model"])


def compressor_options() -> dict[str, list[str] | None]:
    """{compressor name: __init__ options} of every `Compressor` subclass setting `name = "..."`."""
    classes: dict[str, ast.ClassDef] = {}
    folder = os.path.join(PKG, "compressors")
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".py"):
            for node in ast.walk(_parse(os.path.join(folder, fname))):
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = node

    def init_of(cls: ast.ClassDef):
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                return item
        for base in cls.bases:
            if getattr(base, "id", None) in classes:
                return init_of(classes[base.id])
        return None

    table = {}
    for cls in classes.values():
        for item in cls.body:
            if (isinstance(item, ast.Assign) and any(getattr(t, "id", None) == "name" for t in item.targets)
                    and isinstance(item.value, ast.Constant) and item.value.value):
                init = init_of(cls)
                table[item.value.value] = [] if init is None else _params(init, STAGE_SET["compressor"])
    return table


def solver_options() -> list[str]:
    """Keyword-only options of `dropinf.influence` that a config's score.method_options may set."""
    tree = _parse(os.path.join(PKG, "influence.py"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "influence":
            return [a.arg for a in node.args.kwonlyargs if a.arg not in STAGE_SET["solver"]]
    raise RuntimeError("dropinf/influence.py defines no influence()")


def _unknown(where: str, given: dict, allowed: list[str] | None) -> str | None:
    if allowed is None or not isinstance(given, dict):
        return None
    bad = sorted(set(given) - set(allowed))
    if not bad:
        return None
    return (f"config error at '{where}': unknown option(s) {', '.join(map(repr, bad))}; "
            f"allowed: {', '.join(allowed) or '(none)'}")


def option_errors(config: dict) -> list[str]:
    """One line per option key of the config that the named loader/builder/compressor/solver does
    not take."""
    errors = []
    datasets, models = dataset_options(), model_options()
    for where, spec in (("dataset", config.get("dataset") or {}),
                        ("pretrain.dataset", (config.get("pretrain") or {}).get("dataset") or {})):
        if spec.get("name"):
            found, allowed = _lookup(datasets, spec["name"])
            if found:
                errors.append(_unknown(f"{where}.options", spec.get("options") or {}, allowed))
    model = config.get("model") or {}
    if model.get("name"):
        found, allowed = _lookup(models, model["name"])
        if found:
            errors.append(_unknown("model.options", model.get("options") or {}, allowed))
    comps = compressor_options()
    for name, opts in ((config.get("extract") or {}).get("compressor_options") or {}).items():
        if name in comps:
            errors.append(_unknown(f"extract.compressor_options.{name}", opts, comps[name]))
    solver = solver_options()
    for name, opts in ((config.get("score") or {}).get("method_options") or {}).items():
        errors.append(_unknown(f"score.method_options.{name}", opts, solver))
    return [e for e in errors if e]


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names one key twice (PyYAML keeps the last)."""


def _mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def duplicate_key_error(path: str) -> str | None:
    """A one-line message when the YAML file at `path` names a key twice in one mapping, else None."""
    try:
        with open(path) as f:
            yaml.load(f, Loader=StrictLoader)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        return f"config error in {path} line {mark.line + 1}: {e.problem}; each key may appear once"
    except (OSError, yaml.YAMLError):
        return None  # unreadable or malformed: Snakemake's own loader reports it
    return None
