SHARDS = config["extract"]["shards"]
GRADS = f"{RES}/grads/{{compressor}}/{{rtag}}"
# A sharded extraction's per-shard done marker (the shard count is part of the name, so changing it
# reruns the extraction instead of mixing row ranges of two plans).
SHARD_MARKER = f"{GRADS}/shards/{{shard}}of{SHARDS}.json"


# Identity first, then larger r, so that the raw gradients (and a larger r of a nested compressor)
# can serve the other extract jobs at run time. Ordering only, never a dependency.
EXTRACT_PRIORITY = lambda wc: (1000 if wc.compressor == "identity" else 0 if wc.rtag == "full"
                               else min(999, int(wc.rtag[1:])))
_EXTRACT_JOB = "{compressor}-{rtag}" + ("" if SHARDS == 1 else f"-shard{{shard}}of{SHARDS}")


ruleorder: extract > extract_finalize


rule extract:
    """Compressed per-example gradients of both splits, every seed, one fused pass per batch.

    With extract.shards = 1 one job per (compressor, r) writes the arrays and the manifest. With
    shards = N > 1 there are N jobs per (compressor, r): shard k fills only its own chunk-aligned rows
    of the same arrays, in place, and writes its done marker; extract_finalize then writes the
    manifest. A dropout/gaussian r smaller than a complete extracted r of the same model is served by
    slicing that array, and any compressor by compressing the complete raw (identity) gradients of
    the same model (both checked and logged by the stage), not by a new pass. Neither is a DAG
    input (so changing r reruns only that r); `priority` runs identity, then larger r, first."""
    input:
        data=rules.prepare_data.output[0],
        model=rules.finetune.output.model,
    output:
        f"{GRADS}/manifest.json" if SHARDS == 1 else SHARD_MARKER,
    params:
        exp=EXP,
        r=lambda wc: extract_params(wc)["r"],
        seeds=lambda wc: extract_params(wc)["seeds"],
        options=lambda wc: extract_params(wc)["options"],
        budget=lambda wc: extract_params(wc)["budget"],
        batch_size=config["extract"]["batch_size"],
        nest="" if config["extract"]["nest"] else "--no-nest",
        from_identity="" if config["extract"]["from_identity"] else "--no-from-identity",
        shard=lambda wc: "" if SHARDS == 1 else f"--shards {SHARDS} --shard {wc.shard}",
        out_dir=lambda wc: f"{RES}/grads/{wc.compressor}/{wc.rtag}",
        device=config["device"],
    log:
        f"{LOGS}/extract/{_EXTRACT_JOB}.log",
    benchmark:
        f"{BENCH}/extract/{_EXTRACT_JOB}.tsv"
    threads: THREADS
    priority: EXTRACT_PRIORITY
    resources:
        gpu=GPU,
        gpu_model=GPU_MODEL,
        cpus_per_gpu=CPUS_PER_GPU,
        runtime=RUNTIME["extract"],
        mem_mb=MEM_MB["extract"],
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf extract --data {input.data:q} --model {input.model:q} --compressor {wildcards.compressor}"
        " --r {params.r} --seeds {params.seeds} --options {params.options:q} --budget-mb {params.budget}"
        " --batch-size {params.batch_size} {params.nest} {params.from_identity} {params.shard}"
        " --device {params.device} --threads {threads} --experiment {params.exp:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


localrules:
    extract_finalize,


rule extract_finalize:
    """Sharded extraction only: checks that every shard's done marker exists, agrees and that the
    shards tile the rows, marks the arrays complete and writes the manifest. Copies no data."""
    input:
        lambda wc: expand(SHARD_MARKER, shard=range(SHARDS), allow_missing=True),
    output:
        f"{GRADS}/manifest.json",
    params:
        exp=EXP,
        shards=SHARDS,
        out_dir=lambda wc: f"{RES}/grads/{wc.compressor}/{wc.rtag}",
    log:
        f"{LOGS}/extract/{{compressor}}-{{rtag}}-finalize.log",
    benchmark:
        f"{BENCH}/extract/{{compressor}}-{{rtag}}-finalize.tsv"
    priority: EXTRACT_PRIORITY
    resources:
        runtime=RUNTIME.get("extract_finalize", 10),
        mem_mb=MEM_MB.get("extract_finalize", 2000),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf extract --finalize --shards {params.shards} --experiment {params.exp:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
