rule prepare_data:
    """Load the dataset, flip `label_noise` of the training labels (seeded), save tensors."""
    output:
        f"{RES}/data/dataset.pt",
    params:
        dataset=config["dataset"]["name"],
        options=json.dumps(config["dataset"].get("options", {}), sort_keys=True),
        noise=config["label_noise"],
        seed=config["noise_seed"],
    log:
        f"{LOGS}/prepare_data.log",
    benchmark:
        f"{BENCH}/prepare_data.tsv"
    threads: THREADS
    resources:
        **job_resources("prepare_data"),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf prepare_data --dataset {params.dataset:q} --dataset-options {params.options:q}"
        " --label-noise {params.noise} --noise-seed {params.seed} --threads {threads}"
        " --out {output:q} > {log:q} 2>&1"
