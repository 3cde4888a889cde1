# GPU benchmarks (issue: extraction at the physical limit; the field's rivals in the same run). Not
# part of `all`:
#   snakemake bench --cores 1                         # the standard set, on a GPU node
#   snakemake results/bench/gpt2_bfloat16.csv --cores 1
# Each CSV carries its own provenance (GPU, torch/CUDA, commit, dtype, batch, seq len).

_TARGETS = "--r 64 512 4096 --graph auto"  # the sizes of the limit targets; eager, replay and auto
BENCH_SET = {  # CSV name -> arguments of `python -m dropinf.bench`
    "gpt2_float32": f"--arch gpt2 --dtype float32 --batch 32 {_TARGETS} --paper-loop --identity --e2e",
    "gpt2_bfloat16": f"--arch gpt2 --dtype bfloat16 --batch 32 {_TARGETS} --paper-loop --identity --e2e",
    "llama-3.2-1b_bfloat16": f"--arch llama-3.2-1b --dtype bfloat16 --batch 32 {_TARGETS}",
    "pythia-1.4b_bfloat16": f"--arch pythia-1.4b --dtype bfloat16 --batch 32 {_TARGETS}",
    "resnet9_float32": f"--arch resnet9 --dtype float32 --batch 512 {_TARGETS} --identity",
    # dattri, traker and logix-ai where installed (`pip install "dropinf[bench]"`), else "not installed" rows
    "peers_gpt2_float32": "peers --table",
    "throughput_gpt2_float32": "throughput --examples 100000",
    # bitwise equality of 4 shard processes needs deterministic kernels (attention backward)
    "throughput_shards4_gpt2_float32": "throughput --examples 40000 --shards 4 --deterministic",
}


rule bench_one:
    """One benchmark CSV: floor and limit vs fused extraction (every compressor) vs the paper's
    batch-size-1 loop; or the peers, or throughput into Zarr (see BENCH_SET). One GPU."""
    output:
        f"{config['results_dir']}/bench/{{name}}.csv",
    params:
        # the set's arguments, or any other <arch>_<dtype> with the default flags
        args=lambda wc: BENCH_SET.get(wc.name, "--arch {} --dtype {} --graph".format(*wc.name.rsplit("_", 1))),
    wildcard_constraints:
        name=r"[^/]+_(float32|bfloat16)",
    log:
        "logs/bench/{name}.log",
    benchmark:
        "benchmarks/bench/{name}.tsv"
    threads: 4
    resources:
        **job_resources("bench_one", gpu=1),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf.bench {params.args} --out {output:q} > {log:q} 2>&1"


rule bench:
    """The standard benchmark set (see BENCH_SET)."""
    input:
        expand(f"{config['results_dir']}/bench/{{name}}.csv", name=list(BENCH_SET)),
