# Config validation, planning helpers and shared settings. Nothing here imports torch.

import hashlib
import importlib.util
import json
import os
import sys

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

SCHEMA = os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")


def _config_error_message(config):
    """One line naming the offending key, or None when the config is valid."""
    with open(SCHEMA) as f:
        schema = yaml.safe_load(f)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if not errors:
        return None
    err = jsonschema.exceptions.best_match(errors)
    path = ""
    for part in err.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if err.validator == "additionalProperties":
        where = f" in '{path}'" if path else ""
        return f"config error{where}: {err.message} (schema: workflow/schemas/config.schema.yaml)"
    if err.validator == "required":
        where = f" '{path}'" if path else ""
        return f"config error{where}: {err.message}"
    if err.validator == "pattern" and err.schema.get("x-allowed"):
        return f"config error at '{path}': {err.instance!r} is not allowed ({err.schema['x-allowed']})"
    return f"config error at '{path or '<top level>'}': {err.message}"


# Torch-free checks of the config files and of the option keys (dropinf/pipeline/options.py, by path).
_spec = importlib.util.spec_from_file_location(
    "dropinf_options", os.path.join(workflow.basedir, "src", "dropinf", "pipeline", "options.py")
)
OPTIONS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(OPTIONS)

for _file in workflow.configfiles:  # Snakemake's loader silently keeps the last of duplicate keys
    _message = OPTIONS.duplicate_key_error(str(_file))
    if _message:
        raise WorkflowError(_message)
_message = _config_error_message(config)
if _message:
    raise WorkflowError(_message)
validate(config, SCHEMA)  # fills the schema's defaults
for _message in OPTIONS.option_errors(config)[:1]:
    raise WorkflowError(_message)

# The methods table (which extraction each method reads) is loaded by path: no torch at DAG time.
_spec = importlib.util.spec_from_file_location(
    "dropinf_methods", os.path.join(workflow.basedir, "src", "dropinf", "pipeline", "methods.py")
)
M = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(M)

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
# The compressed extractions this config plans, checked by `finetune` against the model's d before
# it trains (environment, not params: changing r must not rerun fine-tuning).
_env["DROPINF_PLANNED_EXTRACTIONS"] = json.dumps(
    {c: {"r": sorted(config["r"]), "options": config["extract"]["compressor_options"].get(c, {})}
     for c in sorted({M.extraction_of(m) for m in config["methods"]} - {None, "identity"})}, sort_keys=True)


def tags(method):
    """Path segments (rtag) at which `method` runs: 'full', or 'r16', 'r64', ..."""
    return [M.rtag(r) for r in RS] if M.uses_r(method) else ["full"]


SCORED = [(m, t) for m in METHODS for t in tags(m)]  # (method, rtag) pairs that get scored


wildcard_constraints:
    method="|".join(M.METHODS),
    compressor="identity|" + "|".join(M.COMPRESSED),
    rtag=r"full|r[1-9][0-9]*",


def r_of(wildcards):
    return "full" if wildcards.rtag == "full" else wildcards.rtag[1:]


# ---- resources --------------------------------------------------------------------------------
RUNTIME = {"prepare_data": 15, "pretrain": 240, "finetune": 120, "extract": 240, "score": 120, "evaluate": 240,
           "summarize": 10, "report": 15} | config["resources"]["runtime"]
MEM_MB = {"prepare_data": 4000, "pretrain": 16000, "finetune": 16000, "extract": 32000, "score": 32000, "evaluate": 16000,
          "summarize": 2000, "report": 4000} | config["resources"]["mem_mb"]
GPU = config["resources"]["gpu"]
GPU_MODEL = config["resources"]["gpu_model"] if GPU else ""
CPUS_PER_GPU = config["resources"]["cpus_per_gpu"]
THREADS = config["threads"]


# ---- input/params functions of the rules ---------------------------------------------------------
def compressor_options(comp):
    """extract.compressor_options of `comp`; a projection's `blocks` defaults to score.curvature."""
    opts = dict(config["extract"]["compressor_options"].get(comp, {}))
    if comp in ("gaussian", "sjlt"):
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
_spec = importlib.util.spec_from_file_location(
    "dropinf_serving", os.path.join(workflow.basedir, "src", "dropinf", "pipeline", "serving.py")
)
SERVING = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = SERVING  # dataclasses look their module up by name
_spec.loader.exec_module(SERVING)
IDENTITY_DIR = f"{RES}/grads/identity/full"
# the identity extraction is part of the run when a full-space method reads its stored raw gradients
IDENTITY_IN_RUN = any(M.extraction_of(m) == "identity" for m in METHODS) and config["score"]["gradients"] != "recompute"


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
                         from_identity=ex["from_identity"], identity=identity_manifest, device=config["device"])


def extraction_parts(wildcards):
    """The part records extract_finalize combines: of a pass, slicing or compressing raw gradients."""
    grads_dir = f"{RES}/grads/{wildcards.compressor}/{wildcards.rtag}"
    return extraction_route(wildcards).parts(grads_dir, SHARDS)


def stored_gradients(wildcards):
    """The data and the extraction a method reads (none for random)."""
    inputs = {"data": f"{RES}/data/dataset.pt"}
    comp = M.extraction_of(wildcards.method)
    if comp is not None:
        inputs["grads"] = f"{RES}/grads/{comp}/{wildcards.rtag}/manifest.json"
    return inputs


def score_inputs(wildcards):
    inputs = stored_gradients(wildcards)
    if wildcards.method in M.FULL_SPACE:  # raw gradients are recomputed from the model when not stored
        inputs["model"] = f"{RES}/model/model.pt"
        if config["score"]["gradients"] == "recompute":
            del inputs["grads"]
    return inputs


# ---- optional pretraining (config `pretrain`): finetune, retraining and LDS start from its weights -------
PRETRAIN = config.get("pretrain")
PRETRAIN_MODEL = f"{RES}/pretrain/model.pt"
PRETRAINED = {"init": PRETRAIN_MODEL} if PRETRAIN else {}  # input of the rules that start from it
