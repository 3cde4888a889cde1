"""Commit-ready reference outputs of a finished mislabel-detection run of the workflow.

    .venv/bin/python scripts/mislabel_reference.py results/mislabel-amazon-minilm-lora8 [--dest results/reference] [--r 16]

Reads only what the workflow wrote (`summary.csv`, `report/`, `model/finetune.json`, the score
manifests, `benchmarks/<exp>/`) and writes `DEST/<exp>/`:

* `summary.csv`: the workflow's summary, every row with its provenance (copied unchanged);
* `auc_table.md`: mislabel-detection AUC at r = R (mean ± std, min, max, n seeds) for every method,
  the fine-tuned model's accuracies, skipped methods with the reason, and the provenance;
* `rsweep_table.md`: AUC against r for every compressed method (mean, std, min, max over seeds);
* `stage_seconds.md`: wall seconds of every workflow job (Snakemake's `benchmark:` files);
* `auc_by_method.png`, `auc_vs_r.png` (the report stage's plots), and `figure1_dropout_gaussian.png`:
  the report's AUC-against-r figure for dropout, importance_dropout and gaussian only, orig as a line (the layout of
  the paper's Figure 1), drawn from `summary.csv`.
No per-example arrays and no model weights are copied.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dropinf.pipeline.report import _fmt as fmt, auc_stats as auc_rows  # noqa: E402  (one method order, one format)


#: the methods of the paper's Figure 1
FIGURE1 = ("dropout", "importance_dropout", "gaussian", "orig")


def skipped(run: Path) -> list[tuple[str, str]]:
    out = []
    for m in sorted(run.glob("scores/*/*/manifest.json")):
        rec = json.loads(m.read_text())
        if rec.get("status") == "skipped":
            out.append((f"{m.parent.parent.name}/{m.parent.name}", rec.get("reason", "")))
    return out


def provenance_line(df: pd.DataFrame) -> str:
    p = df.dropna(subset=["git_commit"])
    if not len(p):
        return ""
    row = p.iloc[0]
    devices = ", ".join(sorted(set(map(str, p.device.dropna()))))
    return (f"git {row.git_commit} (dirty: {row.git_dirty}), config sha256 {row.config_sha256}, dropinf "
            f"{row.dropinf_version}, torch {row.torch_version}, device {devices}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="results/<experiment>")
    ap.add_argument("--dest", type=Path, default=Path("results/reference"))
    ap.add_argument("--r", type=int, default=16, help="the r of the main table")
    ap.add_argument("--benchmarks", type=Path, default=None, help="default: benchmarks/<experiment>")
    args = ap.parse_args(argv)

    run, exp = args.run, args.run.name
    dest = args.dest / exp
    dest.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(run / "summary.csv", dtype={"r": "Int64", "seed": "Int64"})
    shutil.copyfile(run / "summary.csv", dest / "summary.csv")
    for png in ("auc_by_method.png", "auc_vs_r.png"):
        if (run / "report" / png).exists():
            shutil.copyfile(run / "report" / png, dest / png)
    ft = json.loads((run / "model" / "finetune.json").read_text())
    t = auc_rows(df)

    # ---- main table at r = R ------------------------------------------------------------------
    main_t = t[t.r.isna() | (t.r == args.r)]
    lines = [f"# {exp}: mislabel-detection AUC (r = {args.r} for compressed methods)", "",
             "Produced by the workflow (`summary.csv` beside this file, every row with its provenance); "
             "mean ± std over compressor seeds (random: over score seeds); uncompressed methods are "
             "deterministic. 0.5 = chance.", "",
             "| method | r | AUC | min | max | seeds |", "|---|---|---|---|---|---|"]
    for row in main_t.itertuples():
        r = "" if pd.isna(row.r) else int(row.r)
        lines.append(f"| {row.method} | {r} | {fmt(row.mean, row.std, row.count)} | {row.min:.3f} | "
                     f"{row.max:.3f} | {row.count} |")
    m = ft["metrics"]
    lines += ["", "Fine-tuned model: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + "; settings "
              + json.dumps(ft["train"], sort_keys=True) + f"; model {ft['model']} "
              + json.dumps(ft["model_options"], sort_keys=True) + "."]
    sk = skipped(run)
    if sk:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({why})" for k, why in sk)]
    lines += ["", "Provenance: " + provenance_line(df)]
    (dest / "auc_table.md").write_text("\n".join(lines) + "\n")

    # ---- r sweep -------------------------------------------------------------------------------
    comp = t[t.r.notna()]
    lines = [f"# {exp}: AUC against r (mean, std, min, max over seeds)", ""]
    unc = t[t.r.isna()]
    if len(unc):
        lines += ["Without r (uncompressed, random): " + ", ".join(f"{r.method} {r.mean:.3f}" for r in unc.itertuples()), ""]
    rs = sorted(int(r) for r in comp.r.unique())
    lines += ["| method | " + " | ".join(f"r={r}" for r in rs) + " |", "|---|" + "---|" * len(rs)]
    for method, g in comp.groupby("method", sort=False):
        cells = []
        for r in rs:
            s = g[g.r == r]
            cells.append("" if not len(s) else
                         f"{s['mean'].iloc[0]:.3f} ± {s['std'].iloc[0]:.3f} [{s['min'].iloc[0]:.3f}, {s['max'].iloc[0]:.3f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean ± std [min, max] over seeds."]
    (dest / "rsweep_table.md").write_text("\n".join(lines) + "\n")

    # ---- stage wall seconds (Snakemake's `benchmark:` files) -----------------------------------
    bench = args.benchmarks or Path("benchmarks") / exp
    rows = [(str(f.relative_to(bench))[:-4], float(pd.read_csv(f, sep="\t")["s"].iloc[0]))
            for f in (sorted(bench.rglob("*.tsv")) if bench.exists() else [])]
    if rows:
        lines = [f"# {exp}: wall seconds per workflow job", "", "| job | wall s |", "|---|---|"]
        lines += [f"| {name} | {s:.1f} |" for name, s in rows]
        (dest / "stage_seconds.md").write_text("\n".join(lines) + "\n")

    # ---- Figure-1 style plot: the report's AUC-against-r figure for dropout, gaussian and orig ---
    import matplotlib

    matplotlib.use("Agg")
    from dropinf.pipeline.report import _savefig, auc_vs_r_figure

    _savefig(auc_vs_r_figure(df, t, exp, methods=FIGURE1), dest / "figure1_dropout_gaussian.png")
    print(f"wrote {dest}: " + ", ".join(sorted(p.name for p in dest.iterdir())))


if __name__ == "__main__":
    main()
