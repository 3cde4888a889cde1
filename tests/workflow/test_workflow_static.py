"""Static checks: lint, rule resources, profiles, schema/registry sync, environments, README and CI."""
from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
GPU_RULES = ("finetune", "extract", "score", "evaluate", "bench_one", "lds_train", "lds_score", "pretrain",
             "extract_nested", "extract_from_identity")
CPU_RULES = ("prepare_data", "extract_finalize", "summarize", "report", "lds_summarize", "prepare_pretrain_data",
             "attribute_topk")
TARGET_RULES = ("bench", "lds", "attribute")  # input-only aggregation targets: nothing runs, so no log/resources


def test_lint_clean(wf):
    proc = wf.snakemake(REPO, "--lint")
    out = proc.stdout + proc.stderr
    assert "Lints for" not in out and "Congratulations" in out, out[-4000:]


def _rule_blocks():
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    return dict(re.findall(r"^(?:rule|checkpoint) (\w+):\n(.*?)(?=^rule |^checkpoint |\Z)", text, flags=re.S | re.M))


def test_every_rule_declares_log_benchmark_env_and_resources():
    blocks = _rule_blocks()
    assert set(blocks) == set(GPU_RULES + CPU_RULES + TARGET_RULES)
    for name, body in blocks.items():
        if name in TARGET_RULES:
            continue
        for directive in ("log:", "benchmark:", "conda:", "resources:"):
            assert directive in body, (name, directive)


def _resources(out: str) -> dict[str, list[dict]]:
    """rule -> the resolved resources of each of its jobs in a `snakemake -n` listing."""
    found: dict[str, list[dict]] = {}
    rule = None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.match(r"^\s+resources: (.*)$", line)
        if m and rule:
            found.setdefault(rule, []).append(dict(p.split("=", 1) for p in m.group(1).split(", ")))
            rule = None
    return found


def test_dry_run_resources_scale_with_the_attempt(wf, tmp_path):
    """GPU-capable jobs ask for one GPU of any type and 4 CPUs per GPU; CPU jobs for no GPU; a
    retry (attempt 2) asks for twice the runtime and memory of the first attempt."""
    first = _resources(wf.snakemake(tmp_path, "-n", config=wf.repo / "config.yaml").stdout)
    second = _resources(wf.snakemake(tmp_path, "-n", "--attempt", "2", config=wf.repo / "config.yaml").stdout)
    assert set(GPU_RULES[:4]) <= set(first) and {"prepare_data", "summarize", "report", "extract_finalize"} <= set(first)
    for rule, jobs in first.items():
        if rule == "all":
            continue
        for res in jobs:
            assert int(res["runtime"]) > 0 and int(res["mem_mb"]) > 0, (rule, res)
            assert "gpu_model" not in res, (rule, res)  # no GPU type unless the config names one
            if rule in GPU_RULES:
                assert (res["gpu"], res["cpus_per_gpu"]) == ("1", "4"), (rule, res)
            else:
                assert "gpu" not in res and "cpus_per_gpu" not in res, (rule, res)
        for a, b in zip(jobs, second[rule]):
            assert int(b["runtime"]) == 2 * int(a["runtime"]) and int(b["mem_mb"]) == 2 * int(a["mem_mb"]), rule
    assert {int(r["mem_mb"]) for r in first["extract"]} == {32000}
    assert {int(r["runtime"]) for r in first["extract_finalize"]} == {10}


def test_gpu_model_is_a_setting(wf, tmp_path):
    """`--config "resources={gpu_model: a100}"` (the documented override) reaches the GPU rules only;
    config overrides of a rule's runtime/memory apply, and still scale with the attempt."""
    out = wf.snakemake(tmp_path, "-n", "--attempt", "3", "--config", "resources={gpu_model: a100, mem_mb: {score: 1000}}",
                       config=wf.repo / "config.yaml").stdout
    res = _resources(out)
    for rule, jobs in res.items():
        for r in jobs:
            assert (r.get("gpu_model") == "a100") == (rule in GPU_RULES), (rule, r)
    assert {r["mem_mb"] for r in res["score"]} == {"3000"}
    no_gpu = _resources(wf.snakemake(tmp_path, "-n", "--config", "resources={gpu: 0, gpu_model: a100}",
                                     config=wf.repo / "config.yaml").stdout)
    assert all(r["gpu"] == "0" and "gpu_model" not in r for rule in GPU_RULES[:4] for r in no_gpu[rule])


def test_aggregation_rules_are_local(wf, tmp_path):
    """summarize, report and extract_finalize run on the submit host: Snakemake's own view of the
    Snakefile (its API) lists them as local rules, and only them."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=wf.snakefile, workdir=tmp_path,
                                config_settings=ConfigSettings(configfiles=[wf.repo / "config.yaml"],
                                                               replace_workflow_config=True))._workflow
        local = set(workflow._localrules)
    assert local == {"summarize", "report", "extract_finalize"}


def test_profiles_exist():
    """`snakemake --profile slurm` / `--profile local` resolve from the repository root."""
    for name in ("slurm", "local"):
        link = REPO / name
        assert link.is_symlink() and link.resolve() == (REPO / "workflow" / "profiles" / name).resolve()
        assert (link / "config.yaml").is_file()
    assert "executor: slurm" in (REPO / "slurm" / "config.yaml").read_text()


def test_schema_names_are_registered():
    """The schema names no dataset, model, compressor or method itself: `x-registry` nodes are filled
    from the registries (tests/pipeline/test_registry.py checks the lists)."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]
    assert props["dataset"]["properties"]["name"]["x-registry"] == "datasets"
    assert props["pretrain"]["properties"]["dataset"]["properties"]["name"]["x-registry"] == "datasets"
    assert props["model"]["properties"]["name"]["x-registry"] == "models"
    assert props["methods"]["items"]["x-registry"] == "methods"
    assert set(props["pretrain"]["properties"]["train"]["properties"]) == set(props["finetune"]["properties"])
    assert schema["$schema"].endswith("2020-12/schema")


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = re.search(r'"?([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([0-9][^\s"\\]*)"?', line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def test_container_and_conda_env_pin_the_package_metadata():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"]]
    for extra in ("workflow", "hf", "data", "hub"):
        reqs += [Requirement(r) for r in meta["optional-dependencies"][extra]]
    definition = (REPO / "containers" / "dropinf.def").read_text()
    post = definition.split("%post", 1)[1].split("\n%", 1)[0]
    container = _pins(post.splitlines())
    env = yaml.safe_load((REPO / "envs" / "dropinf.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = _pins(pip)
    assert container == conda, "containers/dropinf.def and envs/dropinf.yaml pin different versions"
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        assert name in container, f"{req.name} is a dependency in pyproject.toml but not pinned in the container"
        assert req.specifier.contains(container[name], prereleases=True), \
            f"{req.name}=={container[name]} does not satisfy pyproject.toml's {req}"
    assert "pip install --no-deps /opt/dropinf" in post  # the project itself, from this tree


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_quick_start_and_ci():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1]
    blocks = _bash_blocks(quick)
    assert len(blocks) >= 2
    install_run, install_test = blocks[0], blocks[1]
    assert "pip install" in install_run and "snakemake" in install_run and "results" in install_run
    assert "pip install" in install_test and "pytest" in install_test
    ci = (REPO / ".ci" / "run").read_text()
    assert install_test in ci, ".ci/run must run the README's test command verbatim"
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    for section in ("## Python API", "sign convention", "SLURM", "paper experiment", "reference results"):
        assert section.lower() in readme.lower(), section


def test_cli_help_lists_every_stage():
    import sys

    out = subprocess.run([sys.executable, "-m", "dropinf", "--help"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout
    for stage in ("prepare_data", "finetune", "extract", "score", "evaluate", "summarize", "report"):
        assert stage in out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "workflow" / "configs").glob("*.yaml")))
def test_shipped_experiment_configs_validate_and_plan(wf, tmp_path, name):
    """Every config under workflow/configs/ passes the schema and builds its DAG (dry run)."""
    cfg = yaml.safe_load((REPO / "workflow" / "configs" / name).read_text())
    out = wf.snakemake(tmp_path, "-n", config=REPO / "workflow" / "configs" / name).stdout
    assert "rule extract:" in out and "rule report:" in out
    assert f"results/{cfg['experiment']}/summary.csv" in out


@pytest.mark.parametrize("source", ["auto", "recompute"])
def test_full_space_scores_get_the_model_and_read_stored_gradients_unless_recomputing(wf, tmp_path, source):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["score"] = {**cfg.get("score", {}), "gradients": source}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = wf.snakemake(tmp_path, "-n", "-p", "--forceall", config=path).stdout
    cmds = [line.strip() for line in out.splitlines() if "python -m dropinf score" in line]
    full = [c for c in cmds if re.search(r"--method (orig|lissa|datainf|tracin) ", c)]
    compressed = [c for c in cmds if "--method dropout " in c]
    assert full and compressed
    for c in full:
        assert "--model " in c and f"--gradients {source}" in c
        assert ("--grads " in c) == (source == "auto"), c
    assert all("--model " not in c and "--grads " in c for c in compressed)
    assert ("--compressor identity" in out) == (source == "auto")
