"""Command line: `dropinf <stage> [options]` (or `python -m dropinf`), the workflow's stages (see
`dropinf.pipeline`); `dropinf --version` prints the version.

Every stage reads and writes files only; the Snakefile is a thin layer over these commands.
JSON-valued options (`--options`, `--dataset-options`, ...) take a JSON object.
Exit codes: 0 success, 2 a user/configuration error (message on stderr), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import sys


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None


def _damping(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _ints(text: str) -> list[int]:
    if text.strip() in ("", "none"):
        return []
    return [int(t) for t in text.replace(",", " ").split()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.replace(",", " ").split()]


def _optfloat(text: str):
    return None if text in ("", "none") else float(text)


def _r(text: str):
    return None if text in ("full", "none", "") else int(text)


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="dropinf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dropinf {__version__}")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="stage", required=True, metavar="<stage>")

    def add(name, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        return s

    s = add("prepare_data", "load a dataset, flip a fraction of training labels (seeded), save tensors")
    s.add_argument("--dataset", required=True)
    s.add_argument("--dataset-options", type=_json, default={})
    s.add_argument("--label-noise", type=float, default=0.0)
    s.add_argument("--noise-seed", type=int, default=0)
    s.add_argument("--out", required=True)

    s = add("finetune", "train the model on the prepared training split")
    s.add_argument("--data", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--model-options", type=_json, default={})
    s.add_argument("--train", type=_json, default={}, help="JSON: epochs, batch_size, lr, weight_decay, optimizer, seed, schedule, warmup_ratio")
    s.add_argument("--init", default=None, help="start from this model.pt of an earlier run (the pretrain stage)")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.add_argument("--metrics", required=True)

    def add_extract(name, help_, source_help=None):
        s = add(name, help_)
        s.add_argument("--data", required=True, help="prepared data")
        s.add_argument("--model", required=True, help="fine-tuned model")
        s.add_argument("--compressor", required=True, help="compressor name")
        s.add_argument("--r", type=_r, default=None, help="compressed size (omit or 'full' for identity)")
        s.add_argument("--seeds", type=_ints, default=[0])
        s.add_argument("--batch-size", type=int, default=256)
        s.add_argument("--budget-mb", type=_optfloat, default=None, help="identity: skip when n*d*4 bytes exceeds this")
        s.add_argument("--options", type=_json, default={}, help="JSON compressor options")
        if source_help:
            s.add_argument("--source", required=True, help=source_help)
        s.add_argument("--shards", type=int, default=1, help="the extraction's rows are split into this many parts")
        s.add_argument("--shard", type=int, default=None,
                       help="run only part K (0..N-1) and write its record; omitted: every part, then the manifest")
        s.add_argument("--device", default="auto")
        s.add_argument("--experiment", default="")
        s.add_argument("--out-dir", required=True)

    add_extract("extract", "per-example gradients (train and test splits, every seed) to Zarr, by a gradient pass")
    add_extract("extract_nested", "a smaller r of a nesting compressor, sliced from a complete larger-r extraction",
                "directory of the complete larger-r extraction of the same compressor")
    add_extract("extract_from_identity", "a compressor served by compressing stored raw gradients (matrix path)",
                "directory of the complete identity (raw-gradient) extraction")
    s = add("extract_finalize", "check an extraction's part records, mark its arrays complete, write its manifest")
    s.add_argument("--parts", nargs="+", required=True, help="the part records (parts/*.json)")
    s.add_argument("--experiment", default="")
    s.add_argument("--out-dir", required=True)

    s = add("score", "influence scores of one method (all seeds)")
    s.add_argument("--data", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--r", type=_r, default=None)
    s.add_argument("--grads", default=None, help="extract manifest.json (not for random)")
    s.add_argument("--model", default=None, help="fine-tuned model.pt: full-space methods recompute raw gradients from it")
    s.add_argument("--gradients", default="auto", choices=["auto", "stored", "recompute"],
                   help="full-space methods: read stored raw gradients, recompute them, or auto (stored if complete)")
    s.add_argument("--recompute-batch-size", type=int, default=64, help="rows per recomputed chunk")
    s.add_argument("--seeds", type=_ints, default=[0])
    s.add_argument("--damping", type=_damping, default="paper", help="'paper', a number, or a JSON list (one per block)")
    s.add_argument("--curvature", default="layer", choices=["layer", "tensor", "global"],
                   help="curvature blocks of every method (docs/curvature.md)")
    s.add_argument("--options", type=_json, default={}, help="JSON options for dropinf.influence")
    s.add_argument("--device", default="auto")
    s.add_argument("--experiment", default="")
    s.add_argument("--out-dir", required=True)

    s = add("evaluate", "mislabel AUC and retraining after removing the most helpful examples")
    s.add_argument("--data", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--scores", required=True, help="score manifest.json")
    s.add_argument("--method", required=True)
    s.add_argument("--r", type=_r, default=None)
    s.add_argument("--fractions", type=_floats, default=[])
    s.add_argument("--no-retrain", action="store_true")
    s.add_argument("--device", default="auto")
    s.add_argument("--experiment", default="")
    s.add_argument("--out", required=True)

    s = add("summarize", "concatenate evaluation rows into the tidy summary.csv")
    s.add_argument("--inputs", nargs="+", required=True)
    s.add_argument("--finetune-metrics", default=None)
    s.add_argument("--experiment", default="")
    s.add_argument("--out", required=True)

    s = add("report", "tables and plots from summary.csv")
    s.add_argument("--summary", required=True)
    s.add_argument("--scored", nargs="*", default=[], help="METHOD/RTAG pairs, to list skipped methods")
    s.add_argument("--experiment", default="")
    s.add_argument("--out-dir", required=True)

    s = add("timing", "cross-experiment timing tables (compression and iHVP seconds per method) from summary.csv files")
    s.add_argument("summaries", nargs="+", help="per-experiment summary.csv files")
    s.add_argument("--out", required=True, help="directory for timing.csv and TABLE.md")

    s = sub.add_parser("verify", help="check every manifest, array and chunk of an experiment's results",
                       description="check every manifest, array and chunk of an experiment's results; one line "
                                   "per problem with the command that recomputes it; exit 0 (none) or 2")
    s.add_argument("results_dir", help="an experiment's folder (results/<experiment>) or a results folder")

    from .pipeline.lds import add_parser as add_lds  # `lds {train,score,summarize}` (stdlib-only import)
    add_lds(sub)
    from .pipeline.query import add_parser as add_query  # `query`, `attribute` (dispatched by their `run`)
    add_query(sub)
    return p


def main(argv=None) -> int:
    """Entry point of the `dropinf` console command and of `python -m dropinf`."""
    args = parser().parse_args(argv)
    from .errors import DropinfError
    from .pipeline.common import log, setup_logging

    setup_logging(args.log_level)
    try:
        return (args.run(args) if hasattr(args, "run") else _run(args)) or 0
    except DropinfError as e:
        log.error("%s: %s", args.stage, e)
        return 2


def _run(args) -> int | None:
    st = args.stage
    if st == "prepare_data":
        from .pipeline.prepare import prepare_data
        prepare_data(args.out, args.dataset, args.dataset_options, args.label_noise, args.noise_seed, args.threads)
    elif st == "finetune":
        from .pipeline.train import finetune
        finetune(args.data, args.out, args.metrics, args.model, args.model_options, device=args.device,
                 threads=args.threads, init=args.init, **args.train)
    elif st in ("extract", "extract_nested", "extract_from_identity"):
        from .pipeline import extract as stage
        job = stage.ExtractJob(data=args.data, model=args.model, out_dir=args.out_dir, compressor=args.compressor,
                               r=args.r, seeds=tuple(args.seeds), batch_size=args.batch_size, device=args.device,
                               threads=args.threads, budget_mb=args.budget_mb, options=args.options,
                               experiment=args.experiment)
        if st == "extract":
            stage.extract(job=job, shard=args.shard, shards=args.shards)
        else:
            run = stage.extract_nested if st == "extract_nested" else stage.extract_from_identity
            run(job=job, source=args.source, shard=args.shard, shards=args.shards)
    elif st == "extract_finalize":
        from .pipeline.extract import finalize
        finalize(out_dir=args.out_dir, parts=args.parts, experiment=args.experiment)
    elif st == "score":
        from .pipeline.score import score
        score(args.data, args.out_dir, args.method, args.r, args.grads, args.seeds, args.damping, args.device,
              args.threads, args.options, args.experiment, model=args.model, gradients=args.gradients,
              recompute_batch_size=args.recompute_batch_size, curvature=args.curvature)
    elif st == "evaluate":
        from .pipeline.evaluate import evaluate
        evaluate(args.data, args.model, args.scores, args.out, args.method, args.r, args.experiment,
                 args.fractions, not args.no_retrain, args.device, args.threads)
    elif st == "timing":
        from .pipeline.timing import timing_tables
        timing_tables(args.summaries, args.out)
    elif st == "summarize":
        from .pipeline.report import summarize
        summarize(args.inputs, args.out, args.finetune_metrics, args.experiment)
    elif st == "report":
        from .pipeline.report import report
        report(args.summary, args.out_dir, args.experiment, [tuple(s.split("/", 1)) for s in args.scored])
    elif st == "verify":
        from .pipeline.verify import main as verify
        return verify(args.results_dir)
    elif st == "lds":
        from .pipeline.lds import run as run_lds
        run_lds(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
