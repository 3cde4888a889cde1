# GPU benchmark (issue: extraction cheaper than a training step). Not part of `all`:
#   snakemake bench --cores 1                         # the standard set, on a GPU node
#   snakemake results/bench/gpt2_bfloat16.csv --cores 1
# Each CSV carries its own provenance (GPU, torch/CUDA, commit, dtype, batch, seq len).

BENCH_SET = {  # architecture_dtype -> extra flags
    "gpt2_float32": "--batch 32 --graph --paper-loop --identity --e2e",
    "gpt2_bfloat16": "--batch 32 --graph --paper-loop --identity --e2e",
    "llama-3.2-1b_bfloat16": "--batch 32 --graph",
    "pythia-1.4b_bfloat16": "--batch 32 --graph",
    "resnet9_float32": "--batch 512 --graph --identity",
}


rule bench_one:
    """Floor vs fused extraction (every compressor) vs the paper's batch-size-1 loop, one GPU."""
    output:
        f"{config['results_dir']}/bench/{{arch}}_{{dtype}}.csv",
    params:
        flags=lambda wc: BENCH_SET.get(f"{wc.arch}_{wc.dtype}", "--batch 32 --graph"),
    wildcard_constraints:
        dtype="float32|bfloat16",
    log:
        f"logs/bench/{{arch}}_{{dtype}}.log",
    benchmark:
        f"benchmarks/bench/{{arch}}_{{dtype}}.tsv"
    threads: 4
    resources:
        **job_resources("bench_one", gpu=1),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf.bench --arch {wildcards.arch} --dtype {wildcards.dtype} {params.flags}"
        " --out {output:q} > {log:q} 2>&1"


rule bench:
    """The standard benchmark set (see BENCH_SET)."""
    input:
        expand(f"{config['results_dir']}/bench/{{name}}.csv", name=list(BENCH_SET)),
