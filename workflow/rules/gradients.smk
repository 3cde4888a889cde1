# Extraction: every directory grads/{compressor}/{rtag}/ is written by part jobs of one kind, then
# extract_finalize writes its manifest.json (the file the score rules read). Which kind fills a
# directory is decided at DAG time by `extraction_parts` (common.smk, src/dropinf/pipeline/serving.py):
#   extract                a gradient pass, in extract.shards parts (rows split on chunk boundaries)
#   extract_nested         a smaller r sliced from the complete larger-r directory (its manifest is an input)
#   extract_from_identity  compressed from the stored raw gradients (the identity manifest is an input)
# extract_finalize is a checkpoint: a compressor is served from raw gradients only when the identity
# manifest says they were stored (not over identity_budget_mb), which is known once that job ran.

SHARDS = config["extract"]["shards"]
GRADS = f"{RES}/grads/{{compressor}}/{{rtag}}"
# The part count is part of a record's name, so changing extract.shards reruns the extractions
# instead of mixing the row ranges of two plans. One part: no shard wildcard (logs as before).
PART = "0" if SHARDS == 1 else "{shard}"
PART_LOG = "" if SHARDS == 1 else f"-shard{{shard}}of{SHARDS}"
# what every kind of part job is told (params: only what changes a compressor's arrays)
EXTRACT_PARAMS = dict(
    exp=EXP,
    r=lambda wc: extract_params(wc)["r"],
    seeds=lambda wc: extract_params(wc)["seeds"],
    options=lambda wc: extract_params(wc)["options"],
    budget=lambda wc: extract_params(wc)["budget"],
    batch_size=config["extract"]["batch_size"],
    device=config["device"],
    out_dir=lambda wc: f"{RES}/grads/{wc.compressor}/{wc.rtag}",
)


wildcard_constraints:
    shard=r"[0-9]+",
    big=r"[1-9][0-9]*",


rule extract:
    """A gradient pass (one fused forward+backward per batch) over part {shard} of the rows: both
    splits, every seed. Writes its rows of the arrays, then its record."""
    input:
        data=rules.prepare_data.output[0],
        model=rules.finetune.output.model,
    output:
        f"{GRADS}/parts/pass-{PART}of{SHARDS}.json",
    params:
        **EXTRACT_PARAMS,
        shards=SHARDS,
        shard=lambda wc: wc.get("shard", 0),
        bucket=config["extract"]["bucket"],
    log:
        f"{LOGS}/extract/{{compressor}}-{{rtag}}{PART_LOG}.log",
    benchmark:
        f"{BENCH}/extract/{{compressor}}-{{rtag}}{PART_LOG}.tsv"
    threads: THREADS
    resources:
        **job_resources("extract", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf extract "
        "--data {input.data:q} --model {input.model:q} --compressor {wildcards.compressor} --r {params.r}"
        " --seeds {params.seeds} --options {params.options:q} --budget-mb {params.budget}"
        " --batch-size {params.batch_size} --device {params.device} --experiment {params.exp:q}"
        " --threads {threads} --out-dir {params.out_dir:q} --shards {params.shards} --shard {params.shard}"
        " --bucket {params.bucket} --cuda-graph \"$DROPINF_CUDA_GRAPH\" ${{DROPINF_DETERMINISTIC:+--deterministic}}"
        " > {log:q} 2>&1"


rule extract_nested:
    """A smaller r of a compressor that nests in r (dropout, gaussian): the first r columns of the
    complete r={big} arrays (Compressor.nest), every seed; no gradient pass."""
    input:
        data=rules.prepare_data.output[0],
        model=rules.finetune.output.model,
        source=f"{RES}/grads/{{compressor}}/r{{big}}/manifest.json",
    output:
        f"{GRADS}/parts/from-r{{big}}-0of1.json",
    params:
        **EXTRACT_PARAMS,
        source=lambda wc, input: os.path.dirname(input.source),
    log:
        f"{LOGS}/extract/{{compressor}}-{{rtag}}-from-r{{big}}.log",
    benchmark:
        f"{BENCH}/extract/{{compressor}}-{{rtag}}-from-r{{big}}.tsv"
    threads: THREADS
    resources:
        **job_resources("extract", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf extract_nested "
        "--data {input.data:q} --model {input.model:q} --compressor {wildcards.compressor} --r {params.r}"
        " --seeds {params.seeds} --options {params.options:q} --budget-mb {params.budget}"
        " --batch-size {params.batch_size} --device {params.device} --experiment {params.exp:q}"
        " --threads {threads} --out-dir {params.out_dir:q} --source {params.source:q} --shards 1 --shard 0 > {log:q} 2>&1"


rule extract_from_identity:
    """A compressor's arrays for part {shard} of the rows, by its matrix path on the stored raw
    gradients (each block read once for every seed); no gradient pass."""
    input:
        data=rules.prepare_data.output[0],
        model=rules.finetune.output.model,
        source=f"{RES}/grads/identity/full/manifest.json",
    output:
        f"{GRADS}/parts/from-identity-{PART}of{SHARDS}.json",
    params:
        **EXTRACT_PARAMS,
        source=lambda wc, input: os.path.dirname(input.source),
        shards=SHARDS,
        shard=lambda wc: wc.get("shard", 0),
    log:
        f"{LOGS}/extract/{{compressor}}-{{rtag}}-from-identity{PART_LOG}.log",
    benchmark:
        f"{BENCH}/extract/{{compressor}}-{{rtag}}-from-identity{PART_LOG}.tsv"
    threads: THREADS
    resources:
        **job_resources("extract", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf extract_from_identity "
        "--data {input.data:q} --model {input.model:q} --compressor {wildcards.compressor} --r {params.r}"
        " --seeds {params.seeds} --options {params.options:q} --budget-mb {params.budget}"
        " --batch-size {params.batch_size} --device {params.device} --experiment {params.exp:q}"
        " --threads {threads} --out-dir {params.out_dir:q} --source {params.source:q}"
        " --shards {params.shards} --shard {params.shard} > {log:q} 2>&1"


localrules:
    extract_finalize,


checkpoint extract_finalize:
    """Checks that the part records agree and tile the rows, marks the arrays complete and writes
    the manifest. Copies no data."""
    input:
        parts=extraction_parts,
    output:
        f"{GRADS}/manifest.json",
    params:
        exp=EXP,
        out_dir=lambda wc: f"{RES}/grads/{wc.compressor}/{wc.rtag}",
    log:
        f"{LOGS}/extract/{{compressor}}-{{rtag}}-finalize.log",
    benchmark:
        f"{BENCH}/extract/{{compressor}}-{{rtag}}-finalize.tsv"
    resources:
        **job_resources("extract_finalize"),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf extract_finalize --parts {input.parts:q} --experiment {params.exp:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
