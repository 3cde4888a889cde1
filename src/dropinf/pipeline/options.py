"""Checks of a workflow config that run before anything else, without importing torch.

The Snakefile loads this file by path at DAG time (like `methods.py`); it uses the standard
library, PyYAML and jsonschema only. It knows every registered dataset loader, model builder,
compressor and influence solver, and their keyword options, by *parsing* their source files
(`ast`): the built-in modules under `src/dropinf/{data,models,compressors}` and `influence.py`,
plus the modules a config lists under `plugins:` (found on the Python path without importing
them). `tests/pipeline/test_integrity.py` and `tests/pipeline/test_registry.py` check these tables
against the live registries (`inspect.signature`), so they cannot drift.

The config schema's name lists (datasets, models, compressors, methods) are not written in
`workflow/schemas/config.schema.yaml`: a node there says `x-registry: <kind>` and `config_schema`
fills its `enum` from these tables, so the registries are the one source of names.
"""
from __future__ import annotations

import ast
import copy
import importlib.machinery
import os
import sys

import yaml

PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # src/dropinf

#: parameters the stages pass themselves, so a config cannot set them
STAGE_SET = {
    "model": {"data"},
    "compressor": {"self", "dim", "r", "seed", "layout"},
    "solver": {"device", "chunk_rows", "layout", "progress"},
}


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the key."""


# ---- where the registering modules are -------------------------------------------------------------

def module_file(module: str, search: list[str] | None = None) -> str | None:
    """The source file of the importable module `module` (dotted name), found on `search` (default:
    the working directory, then sys.path) without importing it or its packages; None if absent."""
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    for entry in search if search is not None else [os.getcwd(), *sys.path]:
        base = os.path.join(entry or os.getcwd(), *parts)
        for candidate in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(candidate):
                return candidate
    return None


def plugin_files(plugins=(), search: list[str] | None = None) -> list[str]:
    """Source files of the config's `plugins:` modules; a module that is not found is a ConfigError."""
    files = []
    for i, name in enumerate(plugins or ()):
        path = module_file(str(name), search)
        if path is None:
            raise ConfigError(f"config error at 'plugins[{i}]': no importable module {name!r} (a dotted module name "
                              f"found in the working directory or on PYTHONPATH, e.g. 'mypackage.my_compressor')")
        files.append(path)
    return files


def _py_files(folder: str) -> list[str]:
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".py")]


def _params(fn: ast.FunctionDef, skip: set[str], drop_first: int = 0) -> list[str] | None:
    """Keyword-settable parameter names of `fn`, or None when it takes **kwargs (anything goes)."""
    if fn.args.kwarg is not None:
        return None
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args][drop_first:] + [a.arg for a in fn.args.kwonlyargs]
    return [n for n in names if n not in skip]


def _parse(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read(), filename=path)


def _callee(node) -> str | None:
    """`name` of a call target `name(...)` or `module.name(...)`."""
    return getattr(node, "id", None) or getattr(node, "attr", None)


def _literal_keys(tree: ast.Module) -> dict[str, list]:
    """Module-level NAME = <literal dict/list/tuple/set>: its keys or items (for registration loops)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, SyntaxError, TypeError):
                continue
            if isinstance(value, (dict, list, tuple, set)):
                out[node.targets[0].id] = list(value)
    return out


def _decorated(files: list[str], decorator: str, skip: set[str]) -> dict[str, list[str] | None]:
    """{registered name: parameters} of functions decorated with `@decorator("name")` in `files`,
    plus `decorator(f"prefix_{x}")(functools.partial(fn, x))` registrations: one per value when
    they sit in `for x in NAME:` over a module-level literal, else matched by prefix ('prefix:'
    keys); `fn` without its bound parameters."""
    table: dict[str, list[str] | None] = {}
    partials: dict[str, list[str] | None] = {}
    for path in files:
        tree = _parse(path)
        funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        literals = _literal_keys(tree)
        for fn in funcs.values():
            for dec in fn.decorator_list:
                if (isinstance(dec, ast.Call) and _callee(dec.func) == decorator and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    table[dec.args[0].value] = _params(fn, skip)
        loops = {}  # id of a registration call -> (loop variable, values)
        for node in ast.walk(tree):
            if (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Name)
                    and node.iter.id in literals):
                for inner in ast.walk(node):
                    loops[id(inner)] = (node.target.id, literals[node.iter.id])
        for node in ast.walk(tree):  # decorator(f"glue_{task}")(functools.partial(glue, task))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)
                    and _callee(node.func.func) == decorator and node.func.args
                    and isinstance(node.func.args[0], ast.JoinedStr) and node.args
                    and isinstance(node.args[0], ast.Call) and node.args[0].args):
                target = getattr(node.args[0].args[0], "id", None)
                if target not in funcs:
                    continue
                params = _params(funcs[target], skip, drop_first=len(node.args[0].args) - 1)
                pieces = node.func.args[0].values
                var, values = loops.get(id(node), (None, None))
                names = [v.value.id for v in pieces if isinstance(v, ast.FormattedValue)]
                if var is not None and names == [var]:
                    for value in values:
                        table["".join(str(value) if isinstance(p, ast.FormattedValue) else p.value
                                      for p in pieces)] = params
                else:
                    prefix = "".join(p.value for p in pieces if isinstance(p, ast.Constant))
                    partials[prefix] = params
    return {"": table, **{f"prefix:{k}": v for k, v in partials.items()}}  # type: ignore[dict-item]


def _lookup(tables, name: str):
    """(found, params) of a registered name in a `_decorated` result."""
    if name in tables[""]:
        return True, tables[""][name]
    for key, params in tables.items():
        if key.startswith("prefix:") and name.startswith(key[len("prefix:"):]):
            return True, params
    return False, None


def dataset_options(plugins=()) -> dict:
    return _decorated(_py_files(os.path.join(PKG, "data")) + plugin_files(plugins), "register_dataset", set())


def model_options(plugins=()) -> dict:
    return _decorated(_py_files(os.path.join(PKG, "models")) + plugin_files(plugins), "register_model",
                      STAGE_SET["model"])


def _classes(files: list[str]) -> dict[str, ast.ClassDef]:
    classes: dict[str, ast.ClassDef] = {}
    for path in files:
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, node)
    return classes


def _subclasses(classes: dict[str, ast.ClassDef], root: str) -> list[ast.ClassDef]:
    """The classes deriving (by base-class name, through `classes`) from the class named `root`."""
    def derives(cls, seen=()):
        for base in cls.bases:
            name = _callee(base)
            if name == root or (name in classes and name not in seen and derives(classes[name], (*seen, name))):
                return True
        return False
    return [c for c in classes.values() if derives(c)]


def _class_attr(cls: ast.ClassDef, attr: str, classes: dict[str, ast.ClassDef], default=None):
    """A constant class attribute `attr = <literal>` of `cls` or of its nearest base that sets it."""
    for item in cls.body:
        targets = item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(item, ast.AnnAssign) else []
        if any(getattr(t, "id", None) == attr for t in targets) and item.value is not None:
            try:
                return ast.literal_eval(item.value)
            except ValueError:
                return default
    for base in cls.bases:
        if _callee(base) in classes:
            return _class_attr(classes[_callee(base)], attr, classes, default)
    return default


def _method(cls: ast.ClassDef, name: str, classes: dict[str, ast.ClassDef]):
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == name:
            return item
    for base in cls.bases:
        if _callee(base) in classes:
            return _method(classes[_callee(base)], name, classes)
    return None


def compressor_table(plugins=()) -> dict[str, dict]:
    """{compressor name: {"options": __init__ options, "nests_in_r": bool}} of every `Compressor`
    subclass setting `name = "..."` (built-in and plugin modules)."""
    classes = _classes(_py_files(os.path.join(PKG, "compressors")) + plugin_files(plugins))
    table = {}
    for cls in _subclasses(classes, "Compressor"):
        name = _class_attr(cls, "name", classes, "")
        if name and name not in table:
            init = _method(cls, "__init__", classes)
            table[name] = {"options": [] if init is None else _params(init, STAGE_SET["compressor"]),
                           "nests_in_r": bool(_class_attr(cls, "nests_in_r", classes, False))}
    return table


def compressor_options(plugins=()) -> dict[str, list[str] | None]:
    """{compressor name: __init__ options}."""
    return {name: info["options"] for name, info in compressor_table(plugins).items()}


def solver_names(plugins=()) -> list[tuple[str, ...]]:
    """The `names = (...)` of every `Solver` subclass (in `dropinf/influence.py` and the plugins),
    one tuple per class: names of one class are one solver."""
    classes = _classes([os.path.join(PKG, "influence.py")] + plugin_files(plugins))
    out = []
    for cls in _subclasses(classes, "Solver"):
        names = _class_attr(cls, "names", classes, ())
        if names:
            out.append(tuple(names))
    return out


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
    plugins = plugin_list(config)
    datasets, models = dataset_options(plugins), model_options(plugins)
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
    comps = compressor_options(plugins)
    for name, opts in ((config.get("extract") or {}).get("compressor_options") or {}).items():
        if name in comps:
            errors.append(_unknown(f"extract.compressor_options.{name}", opts, comps[name]))
    solver = solver_options()
    for name, opts in ((config.get("score") or {}).get("method_options") or {}).items():
        errors.append(_unknown(f"score.method_options.{name}", opts, solver))
    return [e for e in errors if e]


def plugin_list(config: dict) -> list[str]:
    """The config's `plugins:` module names (malformed values are left to the schema check)."""
    plugins = config.get("plugins") or []
    return [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []


# ---- the schema, with its name lists filled from the registries ----------------------------------

def registry_names(plugins=()) -> dict[str, list[str]]:
    """Every name a config may use, per `x-registry` kind of the schema (methods: see methods.py)."""
    datasets = dataset_options(plugins)
    return {"datasets": sorted(datasets[""]), "models": sorted(model_options(plugins)[""]),
            "compressors": sorted(compressor_table(plugins))}


def config_schema(path: str, names: dict[str, list[str]]) -> dict:
    """The config schema at `path`, each `x-registry: <kind>` node given `enum: names[kind]`."""
    with open(path) as f:
        schema = yaml.safe_load(f)

    def fill(node):
        if isinstance(node, dict):
            if "x-registry" in node:
                node["enum"] = list(names[node["x-registry"]])
            for value in node.values():
                fill(value)
        elif isinstance(node, list):
            for value in node:
                fill(value)
    fill(schema)
    return schema


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_error(config: dict, schema: dict) -> str | None:
    """One line naming the offending key, or None when the config is valid."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if not errors:
        return None
    err = jsonschema.exceptions.best_match(errors)
    path = _where(err.absolute_path)
    if err.validator == "additionalProperties":
        where = f" in '{path}'" if path else ""
        return f"config error{where}: {err.message} (schema: workflow/schemas/config.schema.yaml)"
    if err.validator == "required":
        where = f" '{path}'" if path else ""
        return f"config error{where}: {err.message}"
    if err.validator in ("pattern", "oneOf", "anyOf") and err.schema.get("x-allowed"):
        return f"config error at '{path}': {err.instance!r} is not allowed ({err.schema['x-allowed']})"
    return f"config error at '{path or '<top level>'}': {err.message}"


def fill_defaults(config: dict, schema: dict) -> None:
    """Set the schema's defaults for keys the (valid) config leaves out, nested objects included."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(config, dict) or not props:
        return
    for key, sub in props.items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
        if key in config:
            fill_defaults(config[key], sub)


# ---- values from `snakemake --config key=value` ---------------------------------------------------

#: `r` cannot be given on Snakemake's command line (`--config` keys need at least two characters),
#: so the compression sizes also go by this name; a config file may use either, never both.
SIZES_KEY = "compression_sizes"

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _coerce(value, schema: dict, where: str):
    """`value` from the command line with its strings made the types `schema` asks for."""
    if not isinstance(schema, dict):
        return value
    for key in ("oneOf", "anyOf"):
        if key in schema and isinstance(value, str):
            import jsonschema

            for branch in schema[key]:  # the first form the (typed) value satisfies
                try:
                    typed = _coerce(value, branch, where)
                except ConfigError:
                    continue
                if jsonschema.Draft202012Validator(branch).is_valid(typed):
                    return typed
            raise ConfigError(f"config error at '{where}': {value!r} (from --config) matches none of the allowed "
                              f"forms of this key (see workflow/schemas/config.schema.yaml)")
    kind = schema.get("type")
    if isinstance(value, str):
        text = value.strip()
        if kind == "integer":
            try:
                return int(text)
            except ValueError:
                pass
            raise ConfigError(f"config error at '{where}': {value!r} (from --config) is not an integer")
        if kind == "number":
            try:
                return float(text) if any(c in text.lower() for c in ".en") else int(text)
            except ValueError:
                raise ConfigError(f"config error at '{where}': {value!r} (from --config) is not a number") from None
        if kind == "boolean":
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ConfigError(f"config error at '{where}': {value!r} (from --config) is not true or false")
        return value
    if isinstance(value, list):
        items = schema.get("items", {})
        return [_coerce(v, items, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            sub = (schema.get("properties") or {}).get(k)
            if sub is None:
                sub = next(iter((schema.get("patternProperties") or {}).values()), None)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            out[k] = _coerce(v, sub or {}, f"{where}.{k}" if where else str(k))
        return out
    return value


def _plain(value):
    """A (possibly immutable) mapping from Snakemake as plain dicts and lists."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_command_line(config: dict, overrides, schema: dict) -> None:
    """Replace, in `config`, each value set by `--config` with that value in the schema's types:
    Snakemake reads `seeds=[0,1]` as the strings '0' and '1'. Values from files are left alone (a
    quoted number in a file stays an error)."""
    overrides = _plain(overrides or {})

    def put(target: dict, given: dict, node: dict, where: str):
        for key, value in given.items():
            sub = (node.get("properties") or {}).get(key) or {}
            here = f"{where}.{key}" if where else key
            if isinstance(value, dict) and isinstance(target.get(key), dict) and "properties" in sub:
                put(target[key], value, sub, here)
            else:
                target[key] = _coerce(value, sub, here)
    put(config, overrides, schema, "")


def resolve_sizes(config: dict, sources: list[tuple[str, dict]]) -> None:
    """Make `config["r"]` the compression sizes of the last source (lowest to highest precedence:
    the workflow's config file, each --configfile, --config) that gives `r` or `compression_sizes`;
    a source giving both is a ConfigError. Afterwards only `r` is set."""
    chosen = None
    for label, values in sources:
        given = [k for k in ("r", SIZES_KEY) if isinstance(values, dict) and k in values]
        if len(given) == 2:
            raise ConfigError(f"config error in {label}: 'r' and '{SIZES_KEY}' are one setting (the compression "
                              f"sizes; '{SIZES_KEY}' is its name on the command line, where Snakemake refuses "
                              f"one-letter keys); give only one")
        if given:
            chosen = given[0]
    if chosen == SIZES_KEY:
        config["r"] = config[SIZES_KEY]
    config.pop(SIZES_KEY, None)


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
