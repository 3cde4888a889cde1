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
    return f"config error at '{path or '<top level>'}': {err.message}"


_message = _config_error_message(config)
if _message:
    raise WorkflowError(_message)
validate(config, SCHEMA)  # fills the schema's defaults

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
# The Apptainer image that all rules name (used with --software-deployment-method apptainer; see
# docs/containers.md): containers/dropinf.sif built from containers/dropinf.def, or DROPINF_CONTAINER.
CONTAINER = os.environ.get("DROPINF_CONTAINER") or os.path.join(workflow.basedir, "containers", "dropinf.sif")

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
def extract_params(wildcards):
    """Only what changes this compressor's arrays (never the list of r values)."""
    comp = wildcards.compressor
    return {
        "r": r_of(wildcards),
        "seeds": "none" if comp == "identity" else ",".join(str(s) for s in SEEDS),
        "options": json.dumps(config["extract"]["compressor_options"].get(comp, {}), sort_keys=True),
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
