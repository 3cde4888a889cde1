# Config validation, planning helpers and shared settings. Nothing here imports torch.

import hashlib
import importlib.util
import json
import os
import re
import sys

import yaml
from snakemake.exceptions import WorkflowError

SCHEMA = os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")


def _by_path(name, relpath):
    """A stdlib-only module of src/dropinf loaded by its path: no torch import at DAG time."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(workflow.basedir, "src", "dropinf", relpath))
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up by name
    spec.loader.exec_module(loaded)
    return loaded


# Torch-free checks of the config files and of every name and option key (src/dropinf/pipeline/
# options.py and methods.py: the registries, read from the registering modules' source).
OPTIONS = _by_path("dropinf_options", "pipeline/options.py")
M = _by_path("dropinf_methods", "pipeline/methods.py")


def _check_config():
    """Every check of the config before anything runs: one WorkflowError naming the key."""
    for file in workflow.configfiles:  # Snakemake's loader silently keeps the last of duplicate keys
        message = OPTIONS.duplicate_key_error(str(file))
        if message:
            raise WorkflowError(message)
    settings = workflow.config_settings
    cli_files = [os.path.abspath(f) for f in settings.configfiles]
    workflow_files = [] if settings.replace_workflow_config else [
        f for f in workflow.configfiles if os.path.abspath(f) not in cli_files]
    sources = []  # lowest precedence first: which one sets r (or compression_sizes) last
    for path in workflow_files + cli_files:
        with open(path) as f:
            sources.append((str(path), yaml.safe_load(f) or {}))
    sources.append(("--config", OPTIONS._plain(settings.config)))
    with open(SCHEMA) as f:
        raw_schema = yaml.safe_load(f)
    try:
        OPTIONS.apply_command_line(config, settings.config, raw_schema)  # --config seeds=[0,1] gives strings
        plugins = OPTIONS.plugin_list(config)
        errors = M.registry(plugins).errors(config.get("methods"))
        schema = OPTIONS.config_schema(SCHEMA, M.schema_names(plugins))
    except (OPTIONS.ConfigError, M.MethodError) as e:
        raise WorkflowError(str(e)) from None
    message = errors[0] if errors else OPTIONS.schema_error(config, schema)
    if message:
        raise WorkflowError(message)
    try:
        OPTIONS.resolve_sizes(config, sources)
    except OPTIONS.ConfigError as e:
        raise WorkflowError(str(e)) from None
    if "r" not in config:
        raise WorkflowError(f"config error: 'r' is a required property (the compression sizes; on the command "
                            f"line: {OPTIONS.SIZES_KEY}=[16,64])")
    OPTIONS.fill_defaults(config, schema)
    for message in OPTIONS.option_errors(config)[:1]:
        raise WorkflowError(message)


_check_config()
PLUGINS = list(config["plugins"])
REG = M.registry(PLUGINS)
COMPRESSORS = OPTIONS.compressor_table(PLUGINS)

EXP = config["experiment"]
RES = f"{config['results_dir']}/{EXP}"
LOGS = f"logs/{EXP}"
BENCH = f"benchmarks/{EXP}"
METHODS = list(config["methods"])
RS = sorted(config["r"])
SEEDS = list(config["seeds"])
ENV = "../../envs/dropinf.yaml"


def _container():
    """The Apptainer image that all rules name (used with --software-deployment-method apptainer;
    see docs/containers.md): containers/dropinf.sif built from containers/dropinf.def, or
    DROPINF_CONTAINER. Named relative to the working directory when that has no space (Snakemake
    refuses an image path with whitespace); with a space in both forms, only a run that uses the
    container stops, with a message saying how to name it."""
    path = os.environ.get("DROPINF_CONTAINER") or os.path.join(workflow.basedir, "containers", "dropinf.sif")
    for candidate in (os.path.relpath(path), path):
        if not any(c.isspace() for c in candidate):
            return candidate
    methods = {str(m).lower() for m in getattr(workflow.deployment_settings, "deployment_method", ()) or ()}
    if any("apptainer" in m or "singularity" in m for m in methods):
        raise WorkflowError(f"the container image path {path!r} contains a space, which Snakemake cannot run; "
                            f"set DROPINF_CONTAINER to a path without spaces (e.g. a symlink to it)")
    return None  # this invocation uses no container, so none is named


CONTAINER = _container()

# Provenance handed to every job through the environment (not params: changing r must not
# rerun other r's jobs). Rules run `python -m dropinf` from the interpreter running snakemake
# (a conda env, when used, comes first on PATH) with this repository's src/ first on the path.
CONFIG_SHA256 = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
SRC = os.path.join(workflow.basedir, "src")
_env = os.environ
_env.update(
    DROPINF_CONFIG_SHA256=CONFIG_SHA256,
    DROPINF_PLUGINS=",".join(PLUGINS),  # every job imports them (dropinf.plugins)
    DROPINF_REPO=workflow.basedir,
    PYTHONPATH=os.pathsep.join([SRC] + [p for p in _env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SRC]),
    PATH=os.pathsep.join([os.path.dirname(sys.executable), _env.get("PATH", "")]),
)
_env.setdefault("OMP_NUM_THREADS", str(config["threads"]))
# Which device of the node each GPU job takes (src/dropinf/pipeline/devices.py); not params: it
# changes no output.
_binding = config["device_binding"]
_env.update(DROPINF_DEVICE_BINDING="on" if _binding["enabled"] else "off",
            DROPINF_JOBS_PER_GPU=str(_binding["jobs_per_gpu"]), DROPINF_DEVICE_WAIT_MINUTES=str(_binding["wait_minutes"]))
if "lock_dir" in _binding:
    _env["DROPINF_DEVICE_LOCK_DIR"] = os.path.abspath(_binding["lock_dir"])
if not config["progress"]:  # the jobs' progress bars (environment, not params: it changes no result)
    _env["DROPINF_PROGRESS"] = "0"
# CUDA graphs of the gradient passes (environment, not params: replays compute what eager steps do)
_env["DROPINF_CUDA_GRAPH"] = {True: "true", False: "false"}.get(config["extract"]["cuda_graph"], "auto")
# Deterministic kernels in the gradient passes (environment, not params: it changes at most
# rounding-level bits); set only when on, so the rule's ${DROPINF_DETERMINISTIC:+--deterministic}
# adds the flag.
if config["extract"]["deterministic"]:
    _env["DROPINF_DETERMINISTIC"] = "1"
else:
    _env.pop("DROPINF_DETERMINISTIC", None)
# The compressed extractions this config plans, checked by `finetune` against the model's d before
# it trains (environment, not params: changing r must not rerun fine-tuning).
_env["DROPINF_PLANNED_EXTRACTIONS"] = json.dumps(
    {c: {"r": sorted(config["r"]), "options": config["extract"]["compressor_options"].get(c, {})}
     for c in sorted({REG.get(m).extraction for m in METHODS} - {None, M.RAW})}, sort_keys=True)


def tags(method):
    """Path segments (rtag) at which `method` runs: 'full', or 'r16', 'r64', ..."""
    return [M.rtag(r) for r in RS] if REG.get(method).uses_r else ["full"]


SCORED = [(m, t) for m in METHODS for t in tags(m)]  # (method, rtag) pairs that get scored


wildcard_constraints:
    method="|".join(re.escape(m) for m in REG.names()),
    compressor="|".join(re.escape(c) for c in COMPRESSORS),
    rtag=r"full|r[1-9][0-9]*",


def r_of(wildcards):
    return "full" if wildcards.rtag == "full" else wildcards.rtag[1:]


# ---- resources --------------------------------------------------------------------------------
# Minutes and MB per rule (config `resources.runtime` / `resources.mem_mb` override any of them).
# A retried job (the slurm profile's `retries`) asks for `attempt` times as much of both: a job
# killed for time or memory then gets more instead of dying the same way again.
RUNTIME = {"prepare_data": 15, "pretrain": 240, "finetune": 120, "extract": 240, "extract_finalize": 10, "score": 120,
           "evaluate": 240, "summarize": 10, "report": 15, "lds_train": 240, "lds_score": 60, "lds_summarize": 10,
           "bench_one": 60} | config["resources"]["runtime"]
MEM_MB = {"prepare_data": 4000, "pretrain": 16000, "finetune": 16000, "extract": 32000, "extract_finalize": 2000,
          "score": 32000, "evaluate": 16000, "summarize": 2000, "report": 4000, "lds_train": 16000, "lds_score": 16000,
          "lds_summarize": 2000, "bench_one": 64000} | config["resources"]["mem_mb"]
GPU = config["resources"]["gpu"]
# no GPU model unless the config names one: any GPU the scheduler has (`--gpus=N`)
GPU_MODEL = config["resources"].get("gpu_model") if GPU else None
CPUS_PER_GPU = config["resources"]["cpus_per_gpu"]
THREADS = config["threads"]


def job_resources(name, gpu=None):
    """The resources of the rules sized as `name`; `gpu`: GPUs per job (None: a CPU-only rule)."""
    out = {}
    if gpu is not None:
        out.update(gpu=gpu, **({"gpu_model": GPU_MODEL} if GPU_MODEL and gpu else {}), cpus_per_gpu=CPUS_PER_GPU)
    out.update(runtime=lambda wildcards, attempt: RUNTIME[name] * attempt,
               mem_mb=lambda wildcards, attempt: MEM_MB[name] * attempt)
    return out


# ---- input/params functions of the rules ---------------------------------------------------------
def compressor_options(comp):
    """extract.compressor_options of `comp`; a projection's `blocks` defaults to score.curvature."""
    opts = dict(config["extract"]["compressor_options"].get(comp, {}))
    if "blocks" in (COMPRESSORS[comp]["options"] or ()):  # a projection: per curvature block by default
        opts.setdefault("blocks", config["score"]["curvature"])
    return opts


def extract_params(wildcards):
    """Only what changes this compressor's arrays (never the list of r values)."""
    comp = wildcards.compressor
    return {
        "r": r_of(wildcards),
        "seeds": "none" if comp == "identity" else ",".join(str(s) for s in SEEDS),
        "options": json.dumps(compressor_options(comp), sort_keys=True),
        "budget": config["extract"]["identity_budget_mb"] if comp == "identity" else "none",
    }


# Which kind of job fills each extraction directory (src/dropinf/pipeline/serving.py, loaded by path).
SERVING = _by_path("dropinf_serving", "pipeline/serving.py")
IDENTITY_DIR = f"{RES}/grads/identity/full"
# the identity extraction is part of the run when a full-space method reads its stored raw gradients
IDENTITY_IN_RUN = any(REG.get(m).full_space for m in METHODS) and config["score"]["gradients"] != "recompute"


def identity_manifest():
    """The identity manifest once its job has run (a checkpoint), when it can serve this run; None
    when the identity extraction is neither part of the run nor finished."""
    if not IDENTITY_IN_RUN and SERVING.read_manifest(IDENTITY_DIR) is None:
        return None
    out = checkpoints.extract_finalize.get(compressor="identity", rtag="full").output[0]
    return SERVING.read_manifest(os.path.dirname(out))


def extraction_route(wildcards):
    r = None if wildcards.rtag == "full" else int(wildcards.rtag[1:])
    ex = config["extract"]
    return SERVING.route(compressor=wildcards.compressor, r=r, grads=f"{RES}/grads", rs=RS, nest=ex["nest"],
                         from_identity=ex["from_identity"], identity=identity_manifest, device=config["device"],
                         nests_in_r=COMPRESSORS[wildcards.compressor]["nests_in_r"])


def extraction_parts(wildcards):
    """The part records extract_finalize combines: of a pass, slicing or compressing raw gradients."""
    grads_dir = f"{RES}/grads/{wildcards.compressor}/{wildcards.rtag}"
    return extraction_route(wildcards).parts(grads_dir, SHARDS)


def stored_gradients(wildcards):
    """The data and the extraction a method reads (none for random)."""
    inputs = {"data": f"{RES}/data/dataset.pt"}
    comp = REG.get(wildcards.method).extraction
    if comp is not None:
        inputs["grads"] = f"{RES}/grads/{comp}/{wildcards.rtag}/manifest.json"
    return inputs


def score_inputs(wildcards):
    inputs = stored_gradients(wildcards)
    if REG.get(wildcards.method).full_space:  # raw gradients are recomputed from the model when not stored
        inputs["model"] = f"{RES}/model/model.pt"
        if config["score"]["gradients"] == "recompute":
            del inputs["grads"]
    return inputs


# ---- optional pretraining (config `pretrain`): finetune, retraining and LDS start from its weights -------
PRETRAIN = config.get("pretrain")
PRETRAIN_MODEL = f"{RES}/pretrain/model.pt"
PRETRAINED = {"init": PRETRAIN_MODEL} if PRETRAIN else {}  # input of the rules that start from it
