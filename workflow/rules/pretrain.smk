# Optional pretraining (config `pretrain`): the model is first trained on another dataset (e.g. the
# five Austen novels other than the held-out one), and `finetune`, the retrainings of `evaluate`
# and the LDS subset models all start from these weights. The rules run only when a config sets
# `pretrain` (nothing else asks for their outputs otherwise).

# what the rules' params read when no `pretrain` is configured (e.g. `--forcerun pretrain` in any config)
PRETRAIN_SPEC = PRETRAIN or {"dataset": {"name": "none"}, "train": {}}

rule prepare_pretrain_data:
    """Load the pretraining dataset (no label noise) and save its tensors."""
    output:
        f"{RES}/pretrain/dataset.pt",
    params:
        dataset=lambda wc: PRETRAIN_SPEC["dataset"]["name"],
        options=lambda wc: json.dumps(PRETRAIN_SPEC["dataset"].get("options", {}), sort_keys=True),
    log:
        f"{LOGS}/prepare_pretrain_data.log",
    benchmark:
        f"{BENCH}/prepare_pretrain_data.tsv"
    threads: THREADS
    resources:
        **job_resources("prepare_data"),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf prepare_data --dataset {params.dataset:q} --dataset-options {params.options:q}"
        " --label-noise 0 --noise-seed 0 --threads {threads} --out {output:q} > {log:q} 2>&1"

rule pretrain:
    """Train the model (config `model`) from its seeded initialisation on the pretraining data."""
    input:
        data=rules.prepare_pretrain_data.output[0],
    output:
        model=PRETRAIN_MODEL,
        metrics=f"{RES}/pretrain/pretrain.json",
    params:
        model=config["model"]["name"],
        options=json.dumps(config["model"].get("options", {}), sort_keys=True),
        train=lambda wc: json.dumps(PRETRAIN_SPEC["train"], sort_keys=True),
        device=config["device"],
    log:
        f"{LOGS}/pretrain.log",
    benchmark:
        f"{BENCH}/pretrain.tsv"
    threads: THREADS
    resources:
        **job_resources("pretrain", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf finetune --data {input.data:q} --model {params.model:q} --model-options {params.options:q}"
        " --train {params.train:q} --device {params.device} --threads {threads}"
        " --out {output.model:q} --metrics {output.metrics:q} > {log:q} 2>&1"
