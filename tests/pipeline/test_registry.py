"""The method registry and the one source of names: the DAG-time tables (parsed from source, no
torch) equal the live registries, the schema's name lists are filled from them, pairs resolve,
refusals name what is allowed, and values from `--config` get the schema's types."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dropinf.pipeline import methods as M
from dropinf.pipeline import options

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PLUGIN_DIR = REPO / "tests" / "workflow" / "plugin_modules"


def test_tables_equal_the_live_registries():
    from dropinf.compressors import COMPRESSORS
    from dropinf.data import DATASETS
    from dropinf.influence import SOLVERS
    from dropinf.models import MODELS

    names = options.registry_names()
    assert names["datasets"] == sorted(DATASETS)
    assert names["models"] == sorted(MODELS)
    table = options.compressor_table()
    assert set(table) == set(COMPRESSORS)
    assert {c: t["nests_in_r"] for c, t in table.items()} == {c: cls.nests_in_r for c, cls in COMPRESSORS.items()}
    by_class: dict = {}
    for name, cls in SOLVERS.items():
        by_class.setdefault(cls, []).append(name)
    assert sorted(map(sorted, options.solver_names())) == sorted(map(sorted, by_class.values()))


def test_methods_derive_from_compressors_and_solvers():
    from dropinf.compressors import COMPRESSORS
    from dropinf.influence import SOLVERS

    reg = M.registry()
    assert set(M.COMPRESSED) == set(COMPRESSORS) - {"identity"}
    assert set(M.FULL_SPACE) == {"orig", "lissa", "datainf", "tracin"} and M.BASELINES == ("random",)
    for name in M.METHODS:
        m = reg.get(name)
        assert m.solver is None or m.solver in SOLVERS
        assert m.extraction is None or m.extraction in COMPRESSORS
    # exactly what the plain names meant before pairs existed
    assert [(reg.get(n).extraction, reg.get(n).solver) for n in ("orig", "lissa", "dropout", "sjlt", "random")] == \
        [("identity", "orig"), ("identity", "lissa"), ("dropout", "exact"), ("sjlt", "exact"), (None, None)]
    assert not reg.get("orig").uses_seed and reg.get("dropout").uses_r and reg.get("random").uses_seed
    pair = reg.get("gaussian+datainf")
    assert (pair.extraction, pair.solver, pair.uses_r, pair.uses_seed) == ("gaussian", "datainf", True, True)
    assert M.solver_of("dropout+lissa") == "lissa" and M.extraction_of("sjlt+tracin") == "sjlt"
    assert set(reg.pair_solvers) == {"lissa", "datainf", "tracin"}
    assert len(reg.pairs()) == len(M.COMPRESSED) * 3 and set(reg.pairs()).isdisjoint(M.METHODS)


@pytest.mark.parametrize("name, message", [
    ("dropout+exact", "'dropout+exact' is the method 'dropout' (a compressor alone is solved exactly); write 'dropout'"),
    ("dropout+orig", "is the method 'dropout'"),
    ("identity+lissa", "full-space method named by the solver alone (write 'lissa')"),
    ("dropout+newton", "unknown solver 'newton' (compressors: dropout, gaussian, importance_dropout, logra, sjlt; "
                       "solvers: tracin, lissa, datainf"),
    ("random+lissa", "unknown compressor 'random'"),
    ("magic", "'magic' is not one of orig, tracin, lissa, datainf, dropout"),
])
def test_refused_method_names_say_why(name, message):
    with pytest.raises(M.MethodError) as e:
        M.registry().get(name)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)
    assert M.registry().errors(["orig", name]) == [f"config error at 'methods[1]': {e.value}"]


def test_pair_names_are_safe_path_segments():
    for name in M.registry().names():
        assert "/" not in name and name.strip() == name
        assert all(c.isalnum() or c in "_+" for c in name), name


def test_schema_name_lists_come_from_the_registries():
    raw = yaml.safe_load(SCHEMA.read_text())
    text = SCHEMA.read_text()
    for kind in ("datasets", "models", "compressors", "methods", "solved_methods"):
        assert f"x-registry: {kind}" in text, kind
    schema = options.config_schema(str(SCHEMA), M.schema_names())
    props = schema["properties"]
    assert props["dataset"]["properties"]["name"]["enum"] == options.registry_names()["datasets"]
    assert props["pretrain"]["properties"]["dataset"]["properties"]["name"]["enum"] == \
        props["dataset"]["properties"]["name"]["enum"]
    assert props["model"]["properties"]["name"]["enum"] == options.registry_names()["models"]
    assert props["methods"]["items"]["enum"] == M.registry().names()
    assert set(props["extract"]["properties"]["compressor_options"]["propertyNames"]["enum"]) == \
        set(options.compressor_table())
    assert "random" not in props["score"]["properties"]["method_options"]["propertyNames"]["enum"]
    # the file itself lists none of these names: one source
    assert "enum" not in raw["properties"]["methods"]["items"]
    assert "enum" not in raw["properties"]["dataset"]["properties"]["name"]


def test_plugin_module_is_read_without_importing_it(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    assert options.module_file("toy_strided") == str(PLUGIN_DIR / "toy_strided.py")
    reg = M.registry(["toy_strided"])
    assert "toy_strided" not in sys.modules  # parsed, not imported
    assert reg.get("toy_strided").extraction == "toy_strided" and reg.get("toy_strided+lissa").solver == "lissa"
    assert options.compressor_table(["toy_strided"])["toy_strided"] == {"options": ["phase"], "nests_in_r": False}
    with pytest.raises(options.ConfigError, match=r"'plugins\[1\]': no importable module 'not_there'"):
        options.plugin_files(["toy_strided", "not_there"])
    # imported, the module registers the same compressor the table describes
    from dropinf.compressors import COMPRESSORS
    from dropinf.pipeline.plugins import PluginError, load

    try:
        load(["toy_strided"])
        assert COMPRESSORS["toy_strided"].nests_in_r is False
    finally:
        COMPRESSORS.pop("toy_strided", None)
        sys.modules.pop("toy_strided", None)
    with pytest.raises(PluginError, match="plugin module 'not_there'"):
        load(["not_there"])


def test_dag_time_modules_import_no_torch():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(REPO / 'src/dropinf/pipeline/methods.py')!r})\n"
            "m = sys.modules['m'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "m.schema_names(); m.registry().get('dropout+lissa')\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


SCHEMA_RAW = yaml.safe_load(SCHEMA.read_text())


@pytest.mark.parametrize("given, expected", [
    ({"seeds": ["0", "1"]}, {"seeds": [0, 1]}),
    ({"label_noise": "0.25", "evaluate": {"retrain": "false"}}, {"label_noise": 0.25, "evaluate": {"retrain": False}}),
    ({"score": {"damping": "paper"}}, {"score": {"damping": "paper"}}),
    ({"score": {"damping": "0.5"}}, {"score": {"damping": 0.5}}),
    ({"extract": {"shards": "2"}}, {"extract": {"shards": 2}}),
    ({"compression_sizes": ["4", "8"]}, {"compression_sizes": [4, 8]}),
    ({"methods": ["dropout+lissa"]}, {"methods": ["dropout+lissa"]}),
])
def test_command_line_values_get_the_schema_types(given, expected):
    config = {"seeds": [9], "evaluate": {"retrain": True, "retrain_fractions": [0.1]}, "extract": {"nest": True}}
    merged = yaml.safe_load(yaml.safe_dump(config))
    for k, v in given.items():  # what Snakemake's update_config does before the Snakefile runs
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    options.apply_command_line(merged, given, SCHEMA_RAW)
    for k, v in expected.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                assert merged[k][kk] == vv and type(merged[k][kk]) is type(vv)
        else:
            assert merged[k] == v
    assert merged["evaluate"]["retrain_fractions"] == [0.1] and merged["extract"]["nest"] is True


@pytest.mark.parametrize("given, message", [
    ({"seeds": ["0", "one"]}, "config error at 'seeds[1]': 'one' (from --config) is not an integer"),
    ({"evaluate": {"retrain": "maybe"}}, "config error at 'evaluate.retrain': 'maybe' (from --config) is not true or false"),
    ({"score": {"damping": "lots"}}, "config error at 'score.damping': 'lots' (from --config) matches none"),
])
def test_command_line_values_that_cannot_be_typed(given, message):
    with pytest.raises(options.ConfigError) as e:
        options.apply_command_line(dict(given), given, SCHEMA_RAW)
    assert str(e.value).startswith(message)


def test_compression_sizes_precedence_and_conflict():
    config = {"r": [16], "compression_sizes": [4]}
    options.resolve_sizes(config, [("config.yaml", {"r": [16]}), ("--config", {"compression_sizes": [4]})])
    assert config == {"r": [4]}
    config = {"r": [16]}
    options.resolve_sizes(config, [("config.yaml", {"r": [16]}), ("--config", {})])
    assert config == {"r": [16]}
    config = {"r": [4], "compression_sizes": [16]}
    options.resolve_sizes(config, [("a.yaml", {"compression_sizes": [16]}), ("b.yaml", {"r": [4]})])
    assert config == {"r": [4]}
    with pytest.raises(options.ConfigError, match=r"config error in my\.yaml: 'r' and 'compression_sizes' are one setting"):
        options.resolve_sizes({}, [("my.yaml", {"r": [4], "compression_sizes": [8]})])
