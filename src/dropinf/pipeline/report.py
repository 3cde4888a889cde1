"""Stages `summarize` (tidy summary.csv) and `report` (tables and plots for `snakemake --report`).

Neither imports torch: they read CSV/JSON only, so they start fast.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .common import atomic_path, log, read_json
from .methods import METHODS

COLUMNS = ("experiment", "method", "r", "seed", "metric", "value", "git_commit", "git_dirty", "config_sha256",
           "dropinf_version", "torch_version", "device", "stage_seconds", "started_at")
RETRAIN = re.compile(r"^retrain_test_(?P<kind>acc|loss)@(?P<f>[0-9.eE+-]+)$")
#: wall-second metrics of `evaluate`: own gradient pass, projection of stored raw gradients,
#: solver (its seconds include any recomputation), raw gradients recomputed inside the solver
TIMING = ("extract_seconds", "compress_seconds", "score_seconds", "recompute_seconds")


def summarize(inputs, out, finetune_metrics=None, experiment: str = "") -> int:
    import pandas as pd

    text = {c: str for c in COLUMNS if c not in ("r", "seed", "value", "stage_seconds")}
    frames = [pd.read_csv(p, dtype={"r": "Int64", "seed": "Int64", **text}, keep_default_na=False,
                          na_values={"r": [""], "seed": [""], "value": [""], "stage_seconds": [""]}) for p in inputs]
    frames = [f for f in frames if len(f)]
    if finetune_metrics:
        rec = read_json(finetune_metrics)
        prov = rec.get("provenance", {})
        rows = [{"experiment": experiment, "method": "finetune", "r": None, "seed": rec["train"].get("seed"),
                 "metric": k, "value": v, **{c: prov.get(c) for c in COLUMNS[6:]}}
                for k, v in rec["metrics"].items()]
        frames.append(pd.DataFrame(rows))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    df = df.reindex(columns=list(COLUMNS))
    df["r"] = df["r"].astype("Int64")
    df["seed"] = df["seed"].astype("Int64")
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    log.info("summary: %d rows from %d files -> %s", len(df), len(inputs), out)
    return len(df)


def _label(method, r) -> str:
    import pandas as pd

    return method if pd.isna(r) else f"{method} r={int(r)}"


def tables(df):
    """(auc, retrain, timing) tables: mean, std and count over seeds."""
    import numpy as np

    keys = ["method", "r"]
    auc = df[df.metric == "mislabel_auc"].groupby(keys, dropna=False)["value"].agg(["mean", "std", "count"]).reset_index()
    ret = df[df.metric.str.match(RETRAIN)].copy()
    parts = ret.metric.str.extract(RETRAIN)
    ret["fraction_removed"] = parts["f"].astype(float)
    # language models: perplexity exp(mean test loss) per seed, then mean and std over seeds
    loss = parts["kind"] == "loss"
    ret.loc[loss, "value"] = np.exp(ret.loc[loss, "value"].astype(float))
    ret["measure"] = parts["kind"].map({"acc": "test accuracy", "loss": "test perplexity"})
    retrain = ret.groupby(keys + ["measure", "fraction_removed"], dropna=False)["value"].agg(["mean", "std", "count"]).reset_index()
    tim = df[df.metric.isin(TIMING)]
    timing = tim.groupby(keys + ["metric"], dropna=False)["value"].agg(["mean", "std", "count"]).reset_index()
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for t in (auc, retrain, timing):
        t["r"] = t["r"].astype("Int64")
        rank = t["method"].map(lambda m: order.get(m, len(order)))
        extra = [c for c in ("fraction_removed", "metric") if c in t.columns]
        t = t.assign(_rank=rank).sort_values(["_rank", "r"] + extra, na_position="first").drop(columns="_rank")
        out.append(t.reset_index(drop=True))
    return tuple(out)


def _fmt(mean, std, count) -> str:
    import pandas as pd

    if count is None or count <= 1 or pd.isna(std):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def _skipped(summary_path: Path, methods_rtags) -> list[tuple[str, str]]:
    base = summary_path.parent
    out = []
    for method, tag in methods_rtags:
        m = base / "scores" / method / tag / "manifest.json"
        if m.exists():
            rec = json.loads(m.read_text())
            if rec.get("status") == "skipped":
                out.append((method, rec.get("reason", "")))
    return out


def report(summary, out_dir, experiment: str = "", scored=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(summary, dtype={"r": "Int64", "seed": "Int64"})
    auc, retrain, timing = tables(df)
    measure = retrain["measure"].iloc[0] if len(retrain) else "test accuracy"
    base_acc = baseline(df, measure)

    for name, t in (("auc_table.csv", auc), ("retrain_table.csv", retrain), ("timing_table.csv", timing)):
        with atomic_path(out_dir / name) as tmp:
            t.to_csv(tmp, index=False)
    with atomic_path(out_dir / "retrain_table.md") as tmp:
        tmp.write_text(retrain_markdown(df, retrain, _skipped(Path(summary), scored)))

    # ---- AUC by method ------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [_label(m, r) for m, r in zip(auc.method, auc.r)]
    x = np.arange(len(labels))
    ax.bar(x, auc["mean"], yerr=auc["std"].fillna(0), capsize=3, color="#7a9cc6")
    pts = df[df.metric == "mislabel_auc"]
    for i, (m, r) in enumerate(zip(auc.method, auc.r)):
        sel = pts[(pts.method == m) & ((pts.r == r) if not pd.isna(r) else pts.r.isna())]
        ax.scatter(np.full(len(sel), i), sel["value"], color="k", s=10, zorder=3)
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("mislabel-detection AUC")
    ax.set_ylim(0.3, 1.0)
    ax.set_title(f"{experiment}: mislabeled-example detection (mean ± std over seeds; dots = seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _savefig(fig, out_dir / "auc_by_method.png")

    # ---- AUC against r with seed bands -------------------------------------------------------
    fig, ax = plt.subplots(figsize=(6, 4))
    comp = auc[auc.r.notna()]
    for method, g in comp.groupby("method"):
        g = g.sort_values("r")
        seeds_df = pts[pts.method == method]
        band = seeds_df.groupby("r")["value"].agg(["min", "max"]).reindex(g.r)
        line, = ax.plot(g.r.astype(float), g["mean"], marker="o", label=method)
        ax.fill_between(g.r.astype(float), band["min"], band["max"], color=line.get_color(), alpha=0.2)
    for method, g in auc[auc.r.isna()].groupby("method"):
        ax.axhline(float(g["mean"].iloc[0]), ls=":", lw=1, color="grey")
        ax.annotate(method, (1.0, float(g["mean"].iloc[0])), xycoords=("axes fraction", "data"), fontsize=7,
                    va="center")
    if len(comp):
        ax.set_xscale("log", base=2)
    ax.set_xlabel("r (compressed dimension)")
    ax.set_ylabel("mislabel-detection AUC")
    ax.set_title("AUC against r (band: min-max over seeds;\ndotted: uncompressed methods)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, out_dir / "auc_vs_r.png")

    # ---- accuracy against fraction removed ---------------------------------------------------
    rs = sorted(int(r) for r in retrain.r.dropna().unique()) or [None]
    fig, axes = plt.subplots(1, len(rs), figsize=(5 * len(rs), 4), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], rs):
        sel = retrain[(retrain.r == r) | retrain.r.isna()] if r is not None else retrain
        for (method, rr), g in sel.groupby(["method", "r"], dropna=False):
            g = g.sort_values("fraction_removed")
            xs, ys, es = list(g.fraction_removed), list(g["mean"]), list(g["std"].fillna(0))
            if base_acc is not None:
                xs, ys, es = [0.0] + xs, [base_acc] + ys, [0.0] + es
            style = "--" if method == "random" else "-"
            ax.errorbar(xs, ys, yerr=es, marker="o", ls=style, capsize=2, label=method, lw=2 if method == "random" else 1)
        ax.set_xlabel("fraction of most helpful training examples removed")
        ax.set_title("all methods" if r is None else f"compressed at r={r} (+ uncompressed, random)", fontsize=9)
    axes[0][0].set_ylabel(f"{measure} after retraining")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, out_dir / "accuracy_vs_removed.png")

    # ---- HTML tables ---------------------------------------------------------------------------
    skipped = _skipped(Path(summary), scored)
    parts = [f"<h2>{html.escape(experiment)}: results (mean ± std over seeds)</h2>"]
    if base_acc is not None:
        parts.append(f"<p>Fine-tuned model {measure}: {base_acc:.4f}</p>")
    rows = "".join(f"<tr><td>{html.escape(_label(m, r))}</td><td>{_fmt(mu, sd, c)}</td><td>{c}</td></tr>"
                   for m, r, mu, sd, c in zip(auc.method, auc.r, auc["mean"], auc["std"], auc["count"]))
    parts.append("<h3>Mislabel-detection AUC</h3><table><tr><th>method</th><th>AUC</th><th>seeds</th></tr>"
                 + rows + "</table>")
    if len(retrain):
        piv = retrain.assign(cell=[_fmt(a, b, c) for a, b, c in zip(retrain["mean"], retrain["std"], retrain["count"])])
        piv = piv.assign(label=[_label(m, r) for m, r in zip(piv.method, piv.r)])
        wide = piv.pivot(index="label", columns="fraction_removed", values="cell")
        head = "".join(f"<th>{f:g}</th>" for f in wide.columns)
        body = "".join(f"<tr><td>{html.escape(i)}</td>" + "".join(f"<td>{v}</td>" for v in wide.loc[i]) + "</tr>"
                       for i in wide.index)
        parts.append(f"<h3>{measure.capitalize()} after removing the most helpful fraction and retraining</h3>"
                     f"<table><tr><th>method</th>{head}</tr>{body}</table>")
    if len(timing):
        rows = "".join(f"<tr><td>{html.escape(_label(m, r))}</td><td>{html.escape(k)}</td><td>{_fmt(mu, sd, c)}</td></tr>"
                       for m, r, k, mu, sd, c in zip(timing.method, timing.r, timing.metric, timing["mean"],
                                                     timing["std"], timing["count"]))
        parts.append("<h3>Wall seconds</h3><table><tr><th>method</th><th>stage</th><th>seconds</th></tr>"
                     + rows + "</table>")
    if skipped:
        parts.append("<h3>Skipped</h3><ul>" + "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(r)}</li>"
                                                     for m, r in skipped) + "</ul>")
    prov = df.dropna(subset=["git_commit"]).iloc[0] if df["git_commit"].notna().any() else None
    if prov is not None:
        parts.append(f"<p>git {html.escape(str(prov.git_commit))} (dirty: {html.escape(str(prov.git_dirty))}), "
                     f"config sha256 {html.escape(str(prov.config_sha256))}, dropinf {html.escape(str(prov.dropinf_version))}, "
                     f"torch {html.escape(str(prov.torch_version))}, device {html.escape(str(prov.device))}</p>")
    style = ("<style>body{font-family:sans-serif;font-size:14px} table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child{text-align:left}</style>")
    with atomic_path(out_dir / "tables.html") as tmp:
        tmp.write_text(f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>"
                       + "\n".join(parts) + "</body></html>\n")
    log.info("report tables and plots written to %s", out_dir)


def baseline(df, measure: str) -> float | None:
    """The fine-tuned model's (all training examples) value of the retraining measure."""
    import math

    metric = "test_accuracy" if measure == "test accuracy" else "test_loss"
    rows = df[(df.method == "finetune") & (df.metric == metric)]["value"]
    if not len(rows):
        return None
    value = float(rows.iloc[0])
    return math.exp(value) if measure == "test perplexity" else value


def retrain_markdown(df, retrain, skipped=()) -> str:
    """The retraining table as markdown: one row per (method, r), one column per fraction removed
    (with the number of examples when the fine-tuning recorded n_train), mean ± sample std over seeds."""
    import pandas as pd

    if not len(retrain):
        return "No retraining in this experiment.\n"
    measure = retrain["measure"].iloc[0]
    fractions = sorted(retrain.fraction_removed.unique())
    n_rows = df[(df.method == "finetune") & (df.metric == "n_train")]["value"]
    n = int(n_rows.iloc[0]) if len(n_rows) else None
    heads = [f"{round(f * n)} removed ({f:.1%})" if n else f"{f:.1%} removed" for f in fractions]
    lines = ["| method | r | " + " | ".join(heads) + " | seeds |", "|" + "---|" * (len(fractions) + 3)]
    base = baseline(df, measure)
    if base is not None:
        lines.append("| none (all training examples) | | " + " | ".join(f"{base:.3f}" for _ in fractions) + " | 1 |")
    for (method, r), g in retrain.groupby(["method", "r"], dropna=False, sort=False):
        cells = {f: _fmt(mu, sd, c) for f, mu, sd, c in zip(g.fraction_removed, g["mean"], g["std"], g["count"])}
        lines.append(f"| {method} | {'' if pd.isna(r) else int(r)} | " + " | ".join(cells.get(f, "–") for f in fractions)
                     + f" | {int(g['count'].max())} |")
    for method, why in skipped:
        lines.append(f"| {method} | | " + " | ".join("skipped" for _ in fractions) + " | 0 |")
    better = "higher" if measure == "test perplexity" else "lower"
    what = ("perplexity exp(mean over the test samples of each sample's mean token cross-entropy) per seed"
            if measure == "test perplexity" else "test accuracy")
    out = [f"{measure.capitalize()} after removing the most helpful training examples (most negative influence) "
           f"and retraining with the same initialisation, order and settings; {what}, mean ± sample std over "
           f"the seeds (compressor seeds; random-score seeds for `random`). {better.capitalize()} = the method "
           "found more valuable examples.", "", *lines, ""]
    out += [f"- **{m}** skipped by the workflow: {why}" for m, why in skipped]
    return "\n".join(out) + "\n"


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
