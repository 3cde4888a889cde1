"""The stage registry, and the command line `dropinf <stage> [options]` built from it.

A stage is a function with keyword-only parameters plus a frozen dataclass of its options: one
field per parameter (same name, same default), each with a type and a one-line help (`option`).
`command(...)` registers the pair under a command name; `add_stages` makes one argparse subcommand
per registered stage from the dataclass alone, so a flag, its type and its help exist once:

    field type                        on the command line
    str, Path, int, float             --name VALUE
    int | None, float | None          --name VALUE, or 'none'
    bool                              --name (default False), --no-name (default True)
    dict                              --name JSON (any JSON value; objects for options)
    list/tuple of int or float        --name 0,1,2   (one argument, commas or spaces; 'none' = empty)
    list/tuple of str or Path         --name A B C   (several arguments)
    another dataclass (ExtractJob)    its fields, flattened into this command's flags
    anything else                     option(codec=...), e.g. RSIZE ('full' or an int), DAMPING

A field's flag is its name with dashes (`out_dir` -> `--out-dir`), or `option(flag=...)` where the
command line says it differently (finetune's `metrics_out` is `--metrics`); `positional=True` makes
it a positional argument; a field without a default is a required flag. `Command.argv(options)`
writes a command line back, which parses to the same options. Every stage except those registered
with `threads_flag=False` accepts `--threads N` (torch CPU threads): it is the stage's `threads`
field where it has one, and is accepted and ignored by stages that run no torch code, so that every
stage's command line can carry it.

Registering one more stage, from any module:

    from dataclasses import dataclass
    from pathlib import Path
    from dropinf.pipeline.commands import command, option

    @dataclass(frozen=True, kw_only=True)
    class QueryOptions:
        scores: Path = option("score manifest.json")
        top: int = option("how many training examples to print", default=10)

    @command("query", QueryOptions, help="the most influential training examples of a score")
    def query(*, scores: Path, top: int = 10) -> None:
        ...

`command` checks at import time that the function's parameters are exactly the dataclass's fields
(keyword-only, same defaults) and that every field has a command-line form. The CLI imports the
modules named in `STAGE_MODULES` before it builds its parser: add the new module's name there (a
module imported otherwise, like a test module, registers by being imported). Commands with actions
(`dropinf lds train`): `group("lds", help=...)`, then stages named "lds train", "lds score".

From Python, call a stage with its keywords (`score(data=..., out_dir=..., method="dropout", r=8)`),
or run an options object: `COMMANDS["score"].run(ScoreOptions(...))`.

A stage's return value is ignored by the CLI unless it is registered with `exit_status=True` (`verify`): then
its int is the process's exit status. This module imports only the standard library.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

#: Modules whose import registers the built-in stages, in the order `dropinf --help` lists them.
STAGE_MODULES = (
    "dropinf.pipeline.prepare", "dropinf.pipeline.train", "dropinf.pipeline.extract", "dropinf.pipeline.score",
    "dropinf.pipeline.evaluate", "dropinf.pipeline.report", "dropinf.pipeline.timing", "dropinf.pipeline.verify",
    "dropinf.pipeline.lds", "dropinf.pipeline.query",
)


# ---- values on the command line --------------------------------------------------------------------

@dataclass(frozen=True)
class Codec:
    """How one value is read from a command-line argument and written back."""

    parse: Callable[[str], Any]
    format: Callable[[Any], str]
    metavar: str | None = None


def json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None


def int_list(text: str) -> list[int]:
    if text.strip() in ("", "none"):
        return []
    return [int(t) for t in text.replace(",", " ").split()]


def float_list(text: str) -> list[float]:
    return [float(t) for t in text.replace(",", " ").split()]


def optional_int(text: str) -> int | None:
    return None if text in ("", "none") else int(text)


def optional_float(text: str) -> float | None:
    return None if text in ("", "none") else float(text)


def r_size(text: str) -> int | None:
    return None if text in ("full", "none", "") else int(text)


def damping_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _none_or(fmt):
    return lambda v: "none" if v is None else fmt(v)


INT = Codec(int, str)
FLOAT = Codec(float, repr)
STR = Codec(str, str)
PATH = Codec(Path, str)
OPTIONAL_INT = Codec(optional_int, _none_or(str))
OPTIONAL_FLOAT = Codec(optional_float, _none_or(repr))
JSON = Codec(json_value, lambda v: json.dumps(v, sort_keys=True), "JSON")
INTS = Codec(int_list, lambda v: ",".join(str(int(x)) for x in v) or "none", "INTS")
FLOATS = Codec(float_list, lambda v: ",".join(repr(float(x)) for x in v), "FLOATS")
#: a compressed size: an int, or 'full' (no compression, None)
RSIZE = Codec(r_size, lambda v: "full" if v is None else str(int(v)), "full|INT")
#: 'paper', a number, or a JSON list (one per curvature block)
DAMPING = Codec(damping_value, lambda v: v if isinstance(v, str) else json.dumps(v), "DAMPING")


def option(help: str, *, default=dataclasses.MISSING, default_factory=dataclasses.MISSING, flag: str | None = None,
           codec: Codec | None = None, choices=None, positional: bool = False):
    """A dataclass field of stage options, with its command-line help (and how it is spelled)."""
    meta = {"help": help, "flag": flag, "codec": codec, "choices": choices, "positional": positional}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# ---- one field as a command-line argument ---------------------------------------------------------------

_REQUIRED = object()


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


class Argument:
    """One field of an options dataclass on the command line: its flag, how its value is read,
    converted to the field's container and written back."""

    def __init__(self, owner: type, f: dataclasses.Field, hint):
        where = f"{owner.__name__}.{f.name}"
        meta = f.metadata
        if not meta.get("help"):
            raise TypeError(f"{where}: give the field a one-line help (dropinf.pipeline.commands.option)")
        self.name, self.help, self.default = f.name, meta["help"], _default(f)
        self.positional, self.choices = meta.get("positional", False), meta.get("choices")
        self.flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        self.kind, self.codec, self.container = self._form(hint, meta.get("codec"), where)
        if self.kind == "flag" and self.default is _REQUIRED:
            raise TypeError(f"{where}: a boolean flag needs a default")
        if self.kind == "flag" and self.default is True and not meta.get("flag"):
            self.flag = "--no-" + f.name.replace("_", "-")

    @staticmethod
    def _form(hint, codec: Codec | None, where: str):
        """(kind, codec, container): kind 'one' (a single argument), 'many' (nargs) or 'flag'."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
            base, optional = next(a for a in args if a is not type(None)), True
        else:
            base, optional = hint, False
        base_origin, base_args = typing.get_origin(base), typing.get_args(base)
        if base_origin in (list, tuple):
            item = base_args[0] if base_args else str
            container = base_origin
            if codec is not None:
                return "many", codec, container
            if item in (int, float):
                return "one", INTS if item is int else FLOATS, container
            if item in (str, Path):
                return "many", STR if item is str else PATH, container
        if codec is not None:
            return "one", codec, None
        if base is bool and not optional:
            return "flag", None, None
        if base is dict or base_origin is dict:
            return "one", JSON, None
        simple = {int: (INT, OPTIONAL_INT), float: (FLOAT, OPTIONAL_FLOAT), str: (STR, STR), Path: (PATH, PATH)}
        if base in simple:
            return "one", simple[base][optional], None
        raise TypeError(f"{where}: no command-line form for type {hint!r}; give option(codec=...)")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.kind == "flag":
            on = self.default is True
            parser.add_argument(self.flag, dest=self.name, action="store_false" if on else "store_true",
                                help=f"turns off (on by default): {self.help}" if on else self.help)
            return
        shown = self.default not in (_REQUIRED, None, "", (), [], {})
        help_ = f"{self.help} (default: {self.codec.format(self.default)})" if shown and self.kind == "one" else self.help
        kw: dict = {"type": self.codec.parse, "help": help_, "choices": self.choices}
        if self.codec.metavar:
            kw["metavar"] = self.codec.metavar
        if self.kind == "many":
            kw["nargs"] = "+" if self.default is _REQUIRED else "*"
        if self.positional:
            parser.add_argument(self.name, **kw)
        elif self.default is _REQUIRED:
            parser.add_argument(self.flag, dest=self.name, required=True, **kw)
        else:
            parser.add_argument(self.flag, dest=self.name, default=self.default, **kw)

    def value(self, parsed):
        if self.container is not None and isinstance(parsed, (list, tuple)):
            return self.container(parsed)
        return parsed

    def argv(self, value) -> list[str]:
        if self.default is not _REQUIRED and value == self.default and not self.positional:
            return []
        if self.kind == "flag":
            return [self.flag]
        if self.kind == "many":
            items = [self.codec.format(v) for v in value]
            return items if self.positional else [self.flag, *items]
        text = self.codec.format(value)
        return [text] if self.positional else [f"{self.flag}={text}"]


def _arguments(cls: type) -> list[tuple[str, Any]]:
    """[(field name, Argument or the nested list of a dataclass field)] of an options dataclass."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.append((f.name, (hint, _arguments(hint))))
        else:
            out.append((f.name, Argument(cls, f, hint)))
    return out


def _flat(arguments) -> list[Argument]:
    flat = []
    for _, a in arguments:
        flat += _flat(a[1]) if isinstance(a, tuple) else [a]
    return flat


def _build(cls: type, arguments, namespace: dict):
    values = {}
    for name, a in arguments:
        values[name] = _build(*a, namespace) if isinstance(a, tuple) else a.value(namespace[a.name])
    return cls(**values)


def _argv(options, arguments) -> tuple[list[str], list[str]]:
    flags, positional = [], []
    for name, a in arguments:
        value = getattr(options, name)
        if isinstance(a, tuple):
            more, pos = _argv(value, a[1])
            flags, positional = flags + more, positional + pos
        elif a.positional:
            positional += a.argv(value)
        else:
            flags += a.argv(value)
    return flags, positional


# ---- the registry -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """A registered stage: `dropinf <name>` parses into `options` and calls `function` with its fields."""

    name: str
    options: type
    function: Callable
    help: str
    description: str | None = None
    exit_status: bool = False
    threads_flag: bool = True
    arguments: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    @property
    def flat_arguments(self) -> list[Argument]:
        """Every argument of the command, a nested dataclass's fields in its place."""
        return _flat(self.arguments)

    def options_from(self, namespace: dict):
        """The options dataclass of a parsed command line (argparse's namespace as a dict)."""
        return _build(self.options, self.arguments, namespace)

    def run(self, options):
        """Call the stage function with the fields of `options`."""
        return self.function(**{f.name: getattr(options, f.name) for f in dataclasses.fields(options)})

    def argv(self, options) -> list[str]:
        """A command line (after `dropinf`) that parses to `options`."""
        flags, positional = _argv(options, self.arguments)
        return [*self.name.split(), *positional, *flags]  # positionals first: a flag's nargs cannot take them


#: command name ("score", "lds train") -> Command, in registration order
COMMANDS: dict[str, Command] = {}
#: command groups ("lds") -> {"help", "description"}
GROUPS: dict[str, dict] = {}
#: names the CLI's own arguments use (dropinf.__main__)
RESERVED = {"stage", "log_level", "no_progress"}


def _check_signature(name: str, fn: Callable, cls: type) -> None:
    params = inspect.signature(fn).parameters
    where = f"stage {name!r}: {fn.__module__}.{fn.__qualname__}"
    positional = [p.name for p in params.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if positional:
        raise TypeError(f"{where} must take keyword-only parameters (def f(*, ...)); not: {', '.join(positional)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(params) != set(fields):
        raise TypeError(f"{where} takes {sorted(params)} but {cls.__name__} has the fields {sorted(fields)}")
    for pname, p in params.items():
        want = _default(fields[pname])
        have = _REQUIRED if p.default is inspect.Parameter.empty else p.default
        if (want is _REQUIRED) != (have is _REQUIRED) or (want is not _REQUIRED and want != have):
            show = lambda v: "required" if v is _REQUIRED else repr(v)  # noqa: E731
            raise TypeError(f"{where}: parameter {pname!r} defaults to {show(have)} but {cls.__name__}.{pname} "
                            f"to {show(want)}")


def command(name: str, options: type, *, help: str, description: str | None = None, exit_status: bool = False,
          threads_flag: bool = True):
    """Decorator registering `function` as the command `dropinf <name>` with its options dataclass."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"stage {name!r}: {options!r} is not a dataclass")

    def register(function):
        _check_signature(name, function, options)
        arguments = _arguments(options)
        flat = _flat(arguments)
        dests = [a.name for a in flat]
        taken = sorted(set(dests) & RESERVED)
        if taken:
            raise TypeError(f"stage {name!r}: field name(s) {', '.join(taken)} are the CLI's own")
        if threads_flag and "threads" not in dests:
            dests.append("threads")
        dup = sorted({d for d in dests if dests.count(d) > 1})
        if dup:
            raise TypeError(f"stage {name!r}: {', '.join(dup)} appear twice among the flattened fields of "
                            f"{options.__name__}")
        old = COMMANDS.get(name)
        if old is not None and (old.function.__module__, old.function.__qualname__) != (
                function.__module__, function.__qualname__):
            raise ValueError(f"stage {name!r} is already registered by {old.function.__module__}")
        if " " in name and name.split()[0] not in GROUPS:
            raise ValueError(f"stage {name!r}: register its group first (group({name.split()[0]!r}, help=...))")
        COMMANDS[name] = Command(name, options, function, help, description, exit_status, threads_flag, arguments)
        return function

    return register


def group(name: str, *, help: str, description: str | None = None) -> None:
    """A command with actions (`dropinf <name> <action>`); its actions are stages named "<name> <action>"."""
    GROUPS[name] = {"help": help, "description": description}


def load_stages() -> dict[str, Command]:
    """Import the modules of `STAGE_MODULES` (which registers their stages); the registry."""
    for module in STAGE_MODULES:
        importlib.import_module(module)
    return COMMANDS


# ---- the parser ------------------------------------------------------------------------------------------

def _add_command(sub, cmd: Command, name: str) -> None:
    p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
    if cmd.threads_flag and "threads" not in {a.name for a in cmd.flat_arguments}:
        p.add_argument("--threads", type=int, default=None, help="accepted for uniform command lines; this "
                                                                  "stage runs no torch code")
    for a in cmd.flat_arguments:
        a.add_to(p)
    p.set_defaults(_command=cmd)


def add_stages(parser: argparse.ArgumentParser, *, dest: str = "stage") -> None:
    """One subcommand of `parser` per registered stage (and per group, with its actions)."""
    load_stages()
    sub = parser.add_subparsers(dest=dest, required=True, metavar="<stage>")
    groups = {}
    for name, cmd in COMMANDS.items():
        head, _, action = name.partition(" ")
        if not action:
            _add_command(sub, cmd, name)
            continue
        if head not in groups:
            g = GROUPS[head]
            gp = sub.add_parser(head, help=g["help"], description=g["description"] or g["help"],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
            groups[head] = gp.add_subparsers(dest=f"{head}_action", required=True, metavar="<action>")
        _add_command(groups[head], cmd, action)


def run(args: argparse.Namespace) -> int:
    """Run the stage of a command line parsed by a parser made with `add_stages`; its exit status."""
    cmd: Command = args._command
    result = cmd.run(cmd.options_from(vars(args)))
    return int(result or 0) if cmd.exit_status else 0
