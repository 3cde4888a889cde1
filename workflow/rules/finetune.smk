rule finetune:
    """Train the model on the (noisy) training split (from the pretrained weights when config
    `pretrain` is set); save weights and metrics."""
    input:
        unpack(lambda wc: {"data": rules.prepare_data.output[0], **PRETRAINED}),
    output:
        model=f"{RES}/model/model.pt",
        metrics=f"{RES}/model/finetune.json",
    params:
        model=config["model"]["name"],
        options=json.dumps(config["model"].get("options", {}), sort_keys=True),
        train=json.dumps(config["finetune"], sort_keys=True),
        init=lambda wc, input: ["--init", input.init] if "init" in input.keys() else [],
        device=config["device"],
    log:
        f"{LOGS}/finetune.log",
    benchmark:
        f"{BENCH}/finetune.tsv"
    threads: THREADS
    resources:
        **job_resources("finetune", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf finetune --data {input.data:q} --model {params.model:q} --model-options {params.options:q}"
        " --train {params.train:q} {params.init:q} --device {params.device} --threads {threads}"
        " --out {output.model:q} --metrics {output.metrics:q} > {log:q} 2>&1"
