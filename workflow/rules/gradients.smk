rule extract:
    """Compressed per-example gradients of both splits, every seed, one fused pass per batch.

    A dropout/gaussian r smaller than a complete extracted r of the same model is served by
    slicing that array (checked and logged by the stage), not by a new pass."""
    input:
        data=rules.prepare_data.output[0],
        model=rules.finetune.output.model,
    output:
        f"{RES}/grads/{{compressor}}/{{rtag}}/manifest.json",
    params:
        exp=EXP,
        r=lambda wc: extract_params(wc)["r"],
        seeds=lambda wc: extract_params(wc)["seeds"],
        options=lambda wc: extract_params(wc)["options"],
        budget=lambda wc: extract_params(wc)["budget"],
        batch_size=config["extract"]["batch_size"],
        nest="" if config["extract"]["nest"] else "--no-nest",
        device=config["device"],
    log:
        f"{LOGS}/extract/{{compressor}}-{{rtag}}.log",
    benchmark:
        f"{BENCH}/extract/{{compressor}}-{{rtag}}.tsv"
    threads: THREADS
    resources:
        gpu=GPU,
        gpu_model=GPU_MODEL,
        cpus_per_gpu=CPUS_PER_GPU,
        runtime=RUNTIME["extract"],
        mem_mb=MEM_MB["extract"],
    conda:
        ENV
    shell:
        "python -m dropinf extract --data {input.data} --model {input.model} --compressor {wildcards.compressor}"
        " --r {params.r} --seeds {params.seeds} --options {params.options:q} --budget-mb {params.budget}"
        " --batch-size {params.batch_size} {params.nest} --device {params.device} --threads {threads}"
        " --experiment {params.exp} --out-dir $(dirname {output}) > {log} 2>&1"
