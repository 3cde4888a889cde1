SUMMARY = f"{RES}/summary.csv"
REPORT_DIR = f"{RES}/report"
REPORT_FILES = [
    f"{REPORT_DIR}/tables.html",
    f"{REPORT_DIR}/auc_by_method.png",
    f"{REPORT_DIR}/auc_vs_r.png",
    f"{REPORT_DIR}/accuracy_vs_removed.png",
    f"{REPORT_DIR}/retrain_table.md",
]

# aggregation of small files: run by snakemake itself, not submitted as cluster jobs
localrules:
    summarize,
    report,


rule summarize:
    """One tidy table: experiment, method, r, seed, metric, value + provenance columns."""
    input:
        metrics=[f"{RES}/eval/{m}/{t}/metrics.csv" for m, t in SCORED],
        finetune=rules.finetune.output.metrics,
    output:
        SUMMARY,
    params:
        exp=EXP,
    log:
        f"{LOGS}/summarize.log",
    benchmark:
        f"{BENCH}/summarize.tsv"
    threads: 1
    resources:
        **job_resources("summarize"),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf summarize --inputs {input.metrics:q} --finetune-metrics {input.finetune:q}"
        " --experiment {params.exp:q} --out {output:q} > {log:q} 2>&1"


rule report:
    """Tables and plots: AUC by method, AUC against r (seed bands), accuracy against fraction removed."""
    input:
        summary=SUMMARY,
        scores=[f"{RES}/scores/{m}/{t}/manifest.json" for m, t in SCORED],
    output:
        tables=report(REPORT_FILES[0], caption="../report/tables.rst", category="Results", labels={"figure": "tables"}),
        auc=report(REPORT_FILES[1], caption="../report/auc_by_method.rst", category="Results", labels={"figure": "AUC by method"}),
        auc_r=report(REPORT_FILES[2], caption="../report/auc_vs_r.rst", category="Results", labels={"figure": "AUC against r"}),
        retrain=report(REPORT_FILES[3], caption="../report/accuracy_vs_removed.rst", category="Results", labels={"figure": "retraining"}),
        retrain_md=REPORT_FILES[4],
    params:
        exp=EXP,
        scored=" ".join(f"{m}/{t}" for m, t in SCORED),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    threads: 1
    resources:
        **job_resources("report"),
    conda:
        ENV
    container:
        CONTAINER
    shell:
        "python -m dropinf report --summary {input.summary:q} --scored {params.scored} --experiment {params.exp:q}"
        " --out-dir \"$(dirname {output.tables:q})\" > {log:q} 2>&1"
