# dropinf workflow: which training examples matter, by influence functions on compressed
# per-example gradients.  prepare_data -> [pretrain ->] finetune -> extract -> score -> evaluate -> report.
#
#   snakemake --cores 2                                   # the embedded default (config.yaml)
#   snakemake --cores 2 --configfile my.yaml --replace-workflow-config
#   snakemake --cores 2 --config compression_sizes=[16,64] seeds=[0,1]   # keys on the command line
#   snakemake --profile slurm                             # on a SLURM cluster
#   snakemake --report report.html                        # HTML report after a run
#
# Rules are thin: each runs `python -m dropinf <stage> ...` (src/dropinf/pipeline/). Methods, and
# the names the config may use, come from the registries (docs/extending.md).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/gradients.smk"
include: "workflow/rules/scores.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/lds.smk"
include: "workflow/rules/attribute.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        SUMMARY,
        REPORT_FILES,
