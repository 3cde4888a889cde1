rule score:
    """Influence scores of one method at one r, every seed (positive = harmful)."""
    input:
        unpack(score_inputs),
    output:
        f"{RES}/scores/{{method}}/{{rtag}}/manifest.json",
    params:
        exp=EXP,
        r=r_of,
        seeds=lambda wc: ",".join(str(s) for s in SEEDS) if REG.get(wc.method).uses_seed else "0",
        grads=lambda wc, input: ["--grads", input.grads] if "grads" in input.keys() else [],
        model=lambda wc, input: ["--model", input.model] if "model" in input.keys() else [],
        gradients=config["score"]["gradients"],
        recompute_batch_size=config["score"]["recompute_batch_size"],
        damping=config["score"]["damping"],
        curvature=config["score"]["curvature"],
        extras=" ".join(f for f, on in (("--pairwise", config["score"]["pairwise"]),
                                        ("--self-influence", config["score"]["self"])) if on),
        options=lambda wc: json.dumps(config["score"]["method_options"].get(wc.method, {}), sort_keys=True),
        device=config["device"],
    log:
        f"{LOGS}/score/{{method}}-{{rtag}}.log",
    benchmark:
        f"{BENCH}/score/{{method}}-{{rtag}}.tsv"
    threads: THREADS
    resources:
        **job_resources("score", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf score --data {input.data:q} --method {wildcards.method} --r {params.r} {params.grads:q}"
        " {params.model:q} --gradients {params.gradients} --recompute-batch-size {params.recompute_batch_size}"
        " --seeds {params.seeds} --damping {params.damping} --curvature {params.curvature} {params.extras}"
        " --options {params.options:q}"
        " --device {params.device} --threads {threads} --experiment {params.exp:q}"
        " --out-dir \"$(dirname {output:q})\" > {log:q} 2>&1"
