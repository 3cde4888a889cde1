# Target `attribute` (not part of `all`; docs/query.md): for every test example its top-k most helpful
# and most harmful training examples, per queryable method (the exact solve of the compressed methods,
# and orig), r and seed:
#   results/{exp}/attributions/{method}/{rtag}/{seed<s>|unseeded}/topk.csv
# The preconditioned training rows are computed once per (method, r, seed) and cached beside the
# arrays (grads/{compressor}/{rtag}/preconditioned/), where `dropinf query` reuses them.

ATTRIBUTE_K = config.get("attribute", {}).get("k", 10)
# orig reads the stored raw gradients (the identity extraction): not when the config recomputes them
QUERYABLE = list(M.COMPRESSED) + (["orig"] if config["score"]["gradients"] != "recompute" else [])
ATTRIBUTED = [f"{RES}/attributions/{m}/{t}/{s}/topk.csv" for m, t in SCORED if m in QUERYABLE
              for s in ([f"seed{x}" for x in SEEDS] if M.uses_seed(m) else ["unseeded"])]


rule attribute_topk:
    """Top-k training examples of every test example for one method, r and seed (positive = harmful)."""
    input:
        unpack(stored_gradients),
    output:
        f"{RES}/attributions/{{method}}/{{rtag}}/{{seedtag}}/topk.csv",
    wildcard_constraints:
        method="|".join(list(M.COMPRESSED) + ["orig"]),
        seedtag=r"seed[0-9]+|unseeded",
    params:
        results=lambda wc, input: os.path.dirname(os.path.dirname(input.data)),  # results/{exp}
        r=r_of,
        seed=lambda wc: wc.seedtag[4:] if wc.seedtag.startswith("seed") else "0",
        k=ATTRIBUTE_K,
        damping=config["score"]["damping"],
        curvature=config["score"]["curvature"],
        options=lambda wc: json.dumps(config["score"]["method_options"].get(wc.method, {}), sort_keys=True),
    log:
        f"{LOGS}/attribute/{{method}}-{{rtag}}-{{seedtag}}.log",
    benchmark:
        f"{BENCH}/attribute/{{method}}-{{rtag}}-{{seedtag}}.tsv"
    threads: THREADS
    resources:
        runtime=RUNTIME.get("attribute", 60),
        mem_mb=MEM_MB.get("attribute", 16000),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf attribute {params.results:q} --method {wildcards.method} --r {params.r}"
        " --seed {params.seed} --k {params.k} --damping {params.damping} --curvature {params.curvature}"
        " --options {params.options:q} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule attribute:
    """Target: top-k training examples of every test example, every queryable method, r and seed."""
    input:
        ATTRIBUTED,
