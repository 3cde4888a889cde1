"""The stage registry and the CLI built from it (`dropinf.pipeline.commands`): every stage's flags
are the ones the workflow's rules call, every option field is on the command line, typed values
survive a round trip through the command line, and a stage registered from another module (this
one) appears in `dropinf --help` and runs."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from dropinf.__main__ import main, parser
from dropinf.errors import DropinfError
from dropinf.pipeline import commands
from dropinf.pipeline.commands import (DAMPING, FLOATS, INT, INTS, JSON, OPTIONAL_FLOAT, OPTIONAL_INT, PATH, RSIZE, STR,
                                       command, group, option)

#: The flags of every stage as the workflow's rules (and users) call them: names must not change.
FLAGS = {
    "prepare_data": "--dataset --dataset-options --label-noise --noise-seed --out --threads",
    "finetune": "--data --model --model-options --train --init --device --out --metrics --threads",
    "extract": "--data --model --compressor --r --seeds --batch-size --budget-mb --options --shards --shard --device "
               "--experiment --out-dir --threads --cuda-graph --bucket --deterministic",
    "extract_nested": "--data --model --compressor --r --seeds --batch-size --budget-mb --options --source --shards "
                      "--shard --device --experiment --out-dir --threads --cuda-graph --bucket --deterministic",
    "extract_from_identity": "--data --model --compressor --r --seeds --batch-size --budget-mb --options --source "
                             "--shards --shard --device --experiment --out-dir --threads --cuda-graph --bucket --deterministic",
    "extract_finalize": "--parts --experiment --out-dir --threads",
    "score": "--data --method --r --grads --model --gradients --recompute-batch-size --seeds --damping --curvature "
             "--options --device --experiment --out-dir --threads --pairwise --self-influence",
    "evaluate": "--data --model --scores --method --r --fractions --no-retrain --device --experiment --out --threads",
    "summarize": "--inputs --finetune-metrics --experiment --out --threads",
    "report": "--summary --scored --experiment --out-dir --threads",
    "timing": "summaries --out --threads",
    "verify": "results_dir",
    "lds train": "--data --model --model-options --train --n-models --fraction --subset-seed --part --parts "
                 "--vary-seed --init --out --threads --experiment --device",
    "lds score": "--data --parts --method --r --grads --model --recompute-batch-size --seeds --damping --curvature "
                 "--options --out --per-test --threads --experiment --device",
    "lds summarize": "--inputs --parts --out --table --threads --experiment",
}


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{command name ("score", "lds train"): its parser}, walking groups."""
    out = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subparsers(sub)
                out.update({f"{name} {k}": v for k, v in nested.items()} if nested else {name: sub})
    return out


def _flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {(a.option_strings[0] if a.option_strings else a.dest): a for a in p._actions
            if not isinstance(a, argparse._HelpAction)}


def test_every_stage_has_todays_flags():
    subs = _subparsers(parser())
    assert set(FLAGS) <= set(subs), sorted(set(FLAGS) - set(subs))
    for name, flags in FLAGS.items():
        assert set(_flags(subs[name])) == set(flags.split()), name


def test_each_parser_covers_every_field_of_its_options_and_the_function():
    subs = _subparsers(parser())
    registered = commands.load_stages()
    assert set(FLAGS) <= set(registered)
    for name, cmd in registered.items():
        dests = {a.dest for a in subs[name]._actions if not isinstance(a, argparse._HelpAction)}
        flat = {a.name for a in cmd.flat_arguments}
        assert flat <= dests and dests - flat <= {"threads"}, name
        top = {f.name for f in dataclasses.fields(cmd.options)}
        params = inspect.signature(cmd.function).parameters
        assert set(params) == top, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), name
        assert all(a.help for a in cmd.flat_arguments), name


def test_typed_values_from_a_command_line():
    subs = commands.load_stages()
    p = parser()

    def opts(argv):
        args = p.parse_args(argv)
        return args._command.options_from(vars(args))

    o = opts(["score", "--data", "d.pt", "--method", "dropout", "--r", "8", "--seeds", "0 1,2", "--damping",
              "[0.1, 0.2]", "--options", '{"a": 1}', "--out-dir", "s"])
    assert (o.r, o.seeds, o.damping, o.options, o.data, o.grads) == (8, (0, 1, 2), [0.1, 0.2], {"a": 1},
                                                                     Path("d.pt"), None)
    assert isinstance(o, subs["score"].options)
    o = opts(["score", "--data", "d", "--method", "orig", "--r", "full", "--damping", "paper", "--out-dir", "s"])
    assert (o.r, o.damping, o.seeds, o.gradients, o.curvature) == (None, "paper", (0,), "auto", "layer")
    assert opts(["score", "--data", "d", "--method", "m", "--damping", "0.01", "--out-dir", "s"]).damping == 0.01
    o = opts(["extract", "--data", "d", "--model", "m", "--compressor", "identity", "--budget-mb", "none",
              "--seeds", "none", "--out-dir", "g", "--shard", "1", "--shards", "3"])
    assert (o.job.budget_mb, o.job.seeds, o.job.r, o.shard, o.shards, o.job.out_dir) == (None, (), None, 1, 3,
                                                                                        Path("g"))
    o = opts(["evaluate", "--data", "d", "--model", "m", "--scores", "s", "--method", "x", "--out", "o",
              "--fractions=0.1,0.25", "--no-retrain"])
    assert (o.fractions, o.retrain) == ((0.1, 0.25), False)
    o = opts(["report", "--summary", "s.csv", "--out-dir", "r", "--scored", "dropout/r8", "orig/full"])
    assert o.scored == (("dropout", "r8"), ("orig", "full"))
    o = opts(["finetune", "--data", "d", "--model", "mlp", "--out", "m.pt", "--metrics", "m.json",
              "--train", '{"epochs": 2}'])
    assert (o.settings, o.metrics_out, o.model_options, o.init) == ({"epochs": 2}, Path("m.json"), None, None)
    o = opts(["lds", "train", "--data", "d", "--model", "mlp", "--n-models", "4", "--out", "o", "--vary-seed"])
    assert (o.n_models, o.vary_seed, o.parts) == (4, True, 1)
    with pytest.raises(SystemExit):  # not JSON: argparse's usage error, exit 2
        p.parse_args(["prepare_data", "--dataset", "digits", "--out", "o", "--dataset-options", "{nope"])


def _random_value(a: commands.Argument, rng: random.Random):
    word = lambda: rng.choice(["a", "b7", "x_y", "dir/f.pt", "path with space"])  # noqa: E731
    if a.choices:
        return rng.choice(list(a.choices))
    if a.kind == "flag":
        return rng.random() < 0.5
    if a.kind == "many":
        items = [word() for _ in range(rng.randint(0 if a.default is not commands._REQUIRED else 1, 3))]
        if a.codec is PATH:
            items = [Path(x) for x in items]
        elif a.codec is INT:  # query's test rows
            items = [rng.randint(0, 10**6) for _ in items]
        elif a.codec is not STR:  # METHOD/RTAG pairs
            items = [(x.replace("/", ""), rng.choice(["full", "r8"])) for x in items]
        return a.container(items)
    c = a.codec
    if c is RSIZE or c is OPTIONAL_INT:
        return None if rng.random() < 0.3 else rng.randint(0, 10**6)
    if c is OPTIONAL_FLOAT:
        return None if rng.random() < 0.3 else rng.uniform(-1e3, 1e3)
    if c is INTS:
        return a.container(rng.randint(0, 99) for _ in range(rng.randint(0, 4)))
    if c is FLOATS:
        return a.container(rng.random() for _ in range(rng.randint(0, 4)))
    if c is JSON:
        return {word(): rng.choice([1, 2.5, "s", [1, 2], {"k": None}]) for _ in range(rng.randint(0, 3))}
    if c is DAMPING:
        return rng.choice(["paper", rng.uniform(1e-6, 1.0), [rng.random(), rng.random()]])
    if c is PATH:
        return Path(word())
    if c is STR:
        return word()
    return {int: lambda: rng.randint(-5, 10**6), float: lambda: rng.uniform(-10, 10)}[c.parse]()


def _random_options(cls, arguments, rng):
    values = {}
    for name, a in arguments:
        values[name] = _random_options(*a, rng) if isinstance(a, tuple) else _random_value(a, rng)
    return cls(**values)


@pytest.mark.parametrize("seed", range(5))
def test_options_round_trip_through_the_command_line(seed):
    rng = random.Random(seed)
    p = parser()
    for name, cmd in commands.load_stages().items():
        for _ in range(4):
            want = _random_options(cmd.options, cmd.arguments, rng)
            args = p.parse_args(cmd.argv(want))
            assert args._command is cmd
            assert cmd.options_from(vars(args)) == want, (name, cmd.argv(want))


# ---- a stage registered from another module -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ToyOptions:
    out: Path = option("file to write")
    count: int = option("how many lines", default=2)
    seeds: tuple[int, ...] = option("seeds to list", default=(0,))
    loud: bool = option("shout", default=False)
    fail: str = option("raise this DropinfError message", default="")


def toy(*, out: Path, count: int = 2, seeds=(0,), loud: bool = False, fail: str = "") -> None:
    if fail:
        raise DropinfError(fail)
    text = "\n".join(json.dumps({"line": i, "seeds": list(seeds)}) for i in range(count))
    out.write_text(text.upper() if loud else text)


@pytest.fixture
def toy_stages():
    group("toygroup", help="toy actions")
    command("toy_stage", ToyOptions, help="a toy stage registered by a test module")(toy)
    command("toygroup run", ToyOptions, help="a toy action")(toy)
    yield
    for name in ("toy_stage", "toygroup run"):
        commands.COMMANDS.pop(name)
    commands.GROUPS.pop("toygroup")


def test_a_stage_registered_from_another_module_is_listed_and_runs(toy_stages, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "toy_stage" in out and "a toy stage registered by a test module" in out
    assert "toygroup" in out and "score" in out  # the built-in stages are still there
    with pytest.raises(SystemExit):
        main(["toy_stage", "--help"])
    out = capsys.readouterr().out
    assert "--count" in out and "--loud" in out and "how many lines" in out and "--threads" in out
    assert main(["toy_stage", "--out", str(tmp_path / "t.txt"), "--count", "3", "--seeds", "4,5", "--loud"]) == 0
    assert (tmp_path / "t.txt").read_text().splitlines()[2] == '{"LINE": 2, "SEEDS": [4, 5]}'
    assert main(["toygroup", "run", "--out", str(tmp_path / "g.txt")]) == 0
    assert (tmp_path / "g.txt").read_text().count("line") == 2
    assert main(["toy_stage", "--out", str(tmp_path / "x"), "--fail", "bad toy value"]) == 2  # DropinfError
    assert "toy_stage: bad toy value" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_:  # an unknown flag is argparse's usage error
        main(["toy_stage", "--out", "x", "--nope"])
    assert exit_.value.code == 2


def test_registration_refuses_a_function_that_does_not_match_its_options():
    def positional(out, count=2, seeds=(0,), loud=False, fail=""):
        pass

    def missing(*, out, count=2):
        pass

    def other_default(*, out, count=3, seeds=(0,), loud=False, fail=""):
        pass

    with pytest.raises(TypeError, match="keyword-only"):
        command("toy_bad", ToyOptions, help="x")(positional)
    with pytest.raises(TypeError, match="fields"):
        command("toy_bad", ToyOptions, help="x")(missing)
    with pytest.raises(TypeError, match="'count' defaults to 3 but ToyOptions.count to 2"):
        command("toy_bad", ToyOptions, help="x")(other_default)
    with pytest.raises(ValueError, match="already registered"):
        command("score", ToyOptions, help="x")(toy)

    @dataclass(frozen=True, kw_only=True)
    class NoHelp:
        n: int = dataclasses.field(default=1)

    @dataclass(frozen=True, kw_only=True)
    class NoForm:
        s: set = option("a set", default=frozenset())

    with pytest.raises(TypeError, match="NoHelp.n: give the field a one-line help"):
        command("toy_bad", NoHelp, help="x")(lambda *, n=1: None)
    with pytest.raises(TypeError, match="NoForm.s: no command-line form"):
        command("toy_bad", NoForm, help="x")(lambda *, s=frozenset(): None)
    assert "toy_bad" not in commands.COMMANDS


def test_verify_returns_its_exit_status(tmp_path):
    assert main(["verify", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 0
