"""The import graph of src/dropinf follows the layers data -> model -> gradients -> compression ->
storage -> influence -> evaluation -> report: a module imports only modules of its own layer or an
earlier one, never a later one. Every import counts, function-local ones included."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "dropinf"

ORDER = ["base", "data", "model", "gradients", "compression", "storage", "influence", "evaluation", "report"]

#: module (dotted, below dropinf) or package prefix -> layer; the longest matching key wins
LAYERS = {
    # no dependencies on the rest: errors, logging/provenance/atomic files, the torch-free registry
    # tables the DAG reads (names and options parsed from source) and the plugin loader
    "errors": "base", "pipeline.common": "base", "pipeline.options": "base", "pipeline.methods": "base",
    "pipeline.plugins": "base", "progress": "base", "pipeline.commands": "base", "pipeline.devices": "base",
    "data": "data", "pipeline.prepare": "data",
    "models": "model",
    # which coordinates a model's gradients have, and how each module type's factors are read
    "layout": "gradients", "modules": "gradients", "factors": "gradients",
    # the gather-dot kernel reads factors for dropout-family compressors (its Triton source beside it)
    "gather_dot": "gradients", "_gather_dot_kernel": "gradients",
    # compressors and the fused extraction that applies them (with its self-check and the probe
    # importance dropout samples from); the finetune stage checks the planned compressions of
    # the config against the model before it trains, so it sits here too
    "compressors": "compression", "extraction": "compression", "selfcheck": "compression",
    "probe": "compression", "pipeline.train": "compression",
    "pipeline.storage": "storage", "pipeline.sharding": "storage", "pipeline.serving": "storage",
    "pipeline.extract": "storage",
    "influence": "influence", "recompute": "influence", "pipeline.score": "influence",
    "pipeline.metrics": "evaluation", "pipeline.evaluate": "evaluation", "pipeline.verify": "evaluation",
    "pipeline.lds": "report",  # trains, scores and evaluates subset models, and its summarize draws the LDS plot
    "pipeline.query": "report", "pipeline.query_bench": "report",  # questions asked of finished results
    "pipeline.report": "report", "pipeline.timing": "report", "bench": "report", "__main__": "report",
    "pipeline": "report",  # the package: its __init__ only loads plugins
    "": "report",  # the package root is the public facade over everything
}
#: names of the package root a lower layer may read (constants defined in dropinf/__init__.py itself)
ROOT_CONSTANTS = {"__version__", "SIGN_CONVENTION"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(mod: str) -> str:
    keys = [k for k in LAYERS if k == "" or mod == k or mod.startswith(k + ".")]
    return LAYERS[max(keys, key=len)]


def imports(path: Path) -> list[tuple[str, int, str | None]]:
    """(imported module below dropinf, line, name imported from the package root or None)."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dropinf" or alias.name.startswith("dropinf."):
                    out.append((alias.name.removeprefix("dropinf").lstrip("."), node.lineno, None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "dropinf" or node.module.startswith("dropinf.")):
                target = node.module.removeprefix("dropinf").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{alias.name}" if target else alias.name
                out.append((sub if (PKG / sub.replace(".", "/")).with_suffix(".py").exists()
                            or (PKG / sub.replace(".", "/")).is_dir() else target, node.lineno,
                            alias.name if target == "" else None))
    return out


def root_attributes(path: Path) -> set[str]:
    """Attributes read from the name `dropinf` in a module that does `import dropinf`."""
    tree = ast.parse(path.read_text())
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "dropinf"}


def test_every_module_has_a_layer():
    for path in sorted(PKG.rglob("*.py")):
        assert layer_of(module_name(path)) in ORDER, path


def test_no_import_runs_back_up_the_layers():
    back = []
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        here = ORDER.index(layer_of(mod))
        for target, line, root_name in imports(path):
            if target == "":
                names = {root_name} if root_name else root_attributes(path)
                if names <= ROOT_CONSTANTS:
                    continue  # constants of the root itself, not what it re-exports
            there = ORDER.index(layer_of(target))
            if there > here:
                back.append(f"{path.relative_to(SRC)}:{line}: {mod or 'dropinf'} ({ORDER[here]}) imports "
                            f"{target or 'dropinf'} ({ORDER[there]})")
    assert not back, "imports against the layer order:\n" + "\n".join(back)


def test_the_check_sees_imports():
    """The parser finds relative, absolute and function-local imports (so the check can fail)."""
    edges = {t for t, _, _ in imports(PKG / "pipeline" / "score.py")}
    assert {"influence", "pipeline.extract", "compressors.base", "recompute", "pipeline.methods"} <= edges
    assert layer_of("pipeline.score") == "influence" and layer_of("compressors.dropout") == "compression"
