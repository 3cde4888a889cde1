rule evaluate:
    """Mislabel-detection AUC and retraining after removing the most helpful examples."""
    input:
        unpack(lambda wc: PRETRAINED),  # retraining starts from the pretrained weights (path in model.pt)
        data=rules.prepare_data.output[0],
        model=rules.finetune.output.model,
        scores=rules.score.output[0],
    output:
        f"{RES}/eval/{{method}}/{{rtag}}/metrics.csv",
    params:
        exp=EXP,
        r=r_of,
        fractions=",".join(str(f) for f in config["evaluate"]["retrain_fractions"]),
        retrain="" if config["evaluate"]["retrain"] else "--no-retrain",
        device=config["device"],
    log:
        f"{LOGS}/evaluate/{{method}}-{{rtag}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{method}}-{{rtag}}.tsv"
    threads: THREADS
    resources:
        **job_resources("evaluate", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf evaluate --data {input.data:q} --model {input.model:q} --scores {input.scores:q}"
        " --method {wildcards.method} --r {params.r} --fractions={params.fractions:q} {params.retrain}"
        " --device {params.device} --threads {threads} --experiment {params.exp:q} --out {output:q} > {log:q} 2>&1"
