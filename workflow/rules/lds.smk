# Linear datamodeling score (docs/lds.md). Not part of `all`:
#   snakemake lds --cores 2 --configfile workflow/configs/lds-fashion-mnist-resnet9.yaml --replace-workflow-config
# lds_train: config lds.n_models models retrained on seeded random subsets (lds.parts jobs; they need only
# the prepared data, so they run beside finetune/extract); lds_score: per (method, r), per-test-example
# influence (reduce=False) on the extracted gradients (full-space methods over the identity budget:
# recomputed from the model, unless score.gradients is 'stored'), Spearman against the subset models' test losses;
# lds_summarize: results/{exp}/lds/summary.csv, lds_table.md and lds_vs_r.png.

LDS = config["lds"]
LDS_DIR = f"{RES}/lds"
LDS_PARTS = [f"{LDS_DIR}/subsets/part{p}of{LDS['parts']}.npz" for p in range(LDS["parts"])]
if LDS["parts"] > LDS["n_models"]:
    raise WorkflowError(f"config error at 'lds.parts': {LDS['parts']} parts for {LDS['n_models']} models")


rule lds_train:
    """Models retrained on random subsets (the finetune recipe), their loss on every test example."""
    input:
        unpack(lambda wc: {"data": rules.prepare_data.output[0], **PRETRAINED}),
    output:
        f"{LDS_DIR}/subsets/part{{part}}of{LDS['parts']}.npz",
    params:
        exp=EXP,
        model=config["model"]["name"],
        options=json.dumps(config["model"].get("options", {}), sort_keys=True),
        train=json.dumps(config["finetune"], sort_keys=True),
        n_models=LDS["n_models"],
        fraction=LDS["fraction"],
        seed=LDS["seed"],
        parts=LDS["parts"],
        vary="--vary-seed" if LDS["vary_seed"] else "",
        init=lambda wc, input: ["--init", input.init] if "init" in input.keys() else [],
        device=config["device"],
    wildcard_constraints:
        part=r"[0-9]+",
    log:
        f"{LOGS}/lds/train-part{{part}}of{LDS['parts']}.log",
    benchmark:
        f"{BENCH}/lds/train-part{{part}}of{LDS['parts']}.tsv"
    threads: THREADS
    resources:
        **job_resources("lds_train", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf lds train --data {input.data:q} --model {params.model:q} --model-options {params.options:q}"
        " --train {params.train:q} --n-models {params.n_models} --fraction {params.fraction} --subset-seed {params.seed}"
        " --part {wildcards.part} --parts {params.parts} {params.vary} {params.init:q} --device {params.device}"
        " --threads {threads}"
        " --experiment {params.exp:q} --out {output:q} > {log:q} 2>&1"


rule lds_score:
    """LDS of one method at one r, every seed: per-test-example influence against the subset models."""
    input:
        unpack(lambda wc: {**stored_gradients(wc), "parts": LDS_PARTS,
                           **({"model": rules.finetune.output.model}
                              if REG.get(wc.method).full_space and config["score"]["gradients"] != "stored" else {})}),
    output:
        metrics=f"{LDS_DIR}/{{method}}/{{rtag}}/metrics.csv",
        per_test=f"{LDS_DIR}/{{method}}/{{rtag}}/per_test.npz",
    params:
        exp=EXP,
        r=r_of,
        seeds=lambda wc: ",".join(str(s) for s in SEEDS) if REG.get(wc.method).uses_seed else "0",
        grads=lambda wc, input: ["--grads", input.grads] if "grads" in input.keys() else [],
        model=lambda wc, input: ["--model", input.model] if "model" in input.keys() else [],
        recompute_batch_size=config["score"]["recompute_batch_size"],
        damping=config["score"]["damping"],
        curvature=config["score"]["curvature"],
        options=lambda wc: json.dumps(config["score"]["method_options"].get(wc.method, {}), sort_keys=True),
        device=config["device"],
    log:
        f"{LOGS}/lds/score-{{method}}-{{rtag}}.log",
    benchmark:
        f"{BENCH}/lds/score-{{method}}-{{rtag}}.tsv"
    threads: THREADS
    resources:
        **job_resources("lds_score", gpu=GPU),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf lds score --data {input.data:q} --parts {input.parts:q} --method {wildcards.method}"
        " --r {params.r} {params.grads:q} {params.model:q} --recompute-batch-size {params.recompute_batch_size}"
        " --seeds {params.seeds} --damping {params.damping} --curvature {params.curvature} --options {params.options:q}"
        " --device {params.device} --threads {threads} --experiment {params.exp:q}"
        " --out {output.metrics:q} --per-test {output.per_test:q} > {log:q} 2>&1"


rule lds_summarize:
    """summary.csv (one row per method, r, seed and metric, with provenance) and lds_table.md."""
    input:
        metrics=[f"{LDS_DIR}/{m}/{t}/metrics.csv" for m, t in SCORED],
        parts=LDS_PARTS,
    output:
        summary=f"{LDS_DIR}/summary.csv",
        table=f"{LDS_DIR}/lds_table.md",
        plot=report(f"{LDS_DIR}/lds_vs_r.png", caption="../report/lds_vs_r.rst", category="LDS",
                    labels={"figure": "LDS against r"}),
    params:
        exp=EXP,
    log:
        f"{LOGS}/lds/summarize.log",
    benchmark:
        f"{BENCH}/lds/summarize.tsv"
    threads: 1
    resources:
        **job_resources("lds_summarize"),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf lds summarize --inputs {input.metrics:q} --parts {input.parts:q} --experiment {params.exp:q}"
        " --out {output.summary:q} --table {output.table:q} > {log:q} 2>&1"


rule lds:
    """Target: the linear datamodeling score of every configured method (docs/lds.md)."""
    input:
        rules.lds_summarize.output,
