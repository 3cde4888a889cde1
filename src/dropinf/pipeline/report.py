"""Stages `summarize` (tidy summary.csv) and `report` (tables and plots for `snakemake --report`).

`report` writes, into one directory: `auc_table.csv`, `retrain_table.csv`, `timing_table.csv`
(mean, std and count over seeds), `retrain_table.md`, `tables.html`, and the plots
`auc_by_method.png`, `auc_vs_r.png`, `accuracy_vs_removed.png`. One function per table and per
figure; the tables go through pandas. Neither stage imports torch (CSV/JSON only: they start fast).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .commands import Codec, command, option
from .common import atomic_path, log, read_json
from .methods import FULL_SPACE, METHODS
from .metrics import COLUMNS, PROVENANCE, TIMING_METRICS

RETRAIN = re.compile(r"^retrain_test_(?P<kind>acc|loss)@(?P<f>[0-9.eE+-]+)$")
STATS = ["mean", "std", "count"]


# ---- summarize ----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SummarizeOptions:
    inputs: tuple[Path, ...] = option("the evaluation rows (metrics.csv files)")
    out: Path = option("summary.csv to write")
    finetune_metrics: Path | None = option("finetune's metrics JSON, added as rows of method 'finetune'",
                                           default=None)
    experiment: str = option("experiment name of the finetune rows", default="")


@command("summarize", SummarizeOptions, help="concatenate evaluation rows into the tidy summary.csv")
def summarize(*, inputs, out, finetune_metrics=None, experiment: str = "") -> int:
    import pandas as pd

    text = {c: str for c in COLUMNS if c not in ("r", "seed", "value", "stage_seconds")}
    frames = [pd.read_csv(p, dtype={"r": "Int64", "seed": "Int64", **text}, keep_default_na=False,
                          na_values={"r": [""], "seed": [""], "value": [""], "stage_seconds": [""]}) for p in inputs]
    frames = [f for f in frames if len(f)]
    if finetune_metrics:
        rec = read_json(finetune_metrics)
        prov = rec.get("provenance", {})
        rows = [{"experiment": experiment, "method": "finetune", "r": None, "seed": rec["train"].get("seed"),
                 "metric": k, "value": v, **{c: prov.get(c) for c in PROVENANCE}}
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


# ---- statistics over seeds ------------------------------------------------------------------------

def _label(method, r) -> str:
    import pandas as pd

    return method if pd.isna(r) else f"{method} r={int(r)}"


def _fmt(mean, std, count) -> str:
    """'mean ± std' over seeds, or the value alone for one run."""
    import pandas as pd

    if count is None or count <= 1 or pd.isna(std):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def _in_method_order(t, extra=()):
    """Rows sorted as the methods are listed (uncompressed first), then by r and `extra` columns."""
    order = {m: i for i, m in enumerate(METHODS)}
    t = t.assign(r=t["r"].astype("Int64"), _rank=t["method"].map(lambda m: order.get(m, len(order))))
    return t.sort_values(["_rank", "r", *extra], na_position="first").drop(columns="_rank").reset_index(drop=True)


def auc_stats(df):
    """Mislabel AUC per (method, r): mean, std, count, min, max over seeds."""
    auc = df[df.metric == "mislabel_auc"].groupby(["method", "r"], dropna=False)["value"]
    return _in_method_order(auc.agg(STATS + ["min", "max"]).reset_index())


def retrain_stats(df):
    """Retraining measure per (method, r, fraction removed). Language models: perplexity, i.e.
    exp(mean test loss) per seed, then mean and std over seeds."""
    import numpy as np

    ret = df[df.metric.str.match(RETRAIN)].copy()
    parts = ret.metric.str.extract(RETRAIN)
    ret["fraction_removed"] = parts["f"].astype(float)
    loss = parts["kind"] == "loss"
    ret.loc[loss, "value"] = np.exp(ret.loc[loss, "value"].astype(float))
    ret["measure"] = parts["kind"].map({"acc": "test accuracy", "loss": "test perplexity"})
    g = ret.groupby(["method", "r", "measure", "fraction_removed"], dropna=False)["value"]
    return _in_method_order(g.agg(STATS).reset_index(), ["fraction_removed"])


def timing_stats(df):
    """Wall seconds per (method, r, timing metric)."""
    g = df[df.metric.isin(TIMING_METRICS)].groupby(["method", "r", "metric"], dropna=False)["value"]
    return _in_method_order(g.agg(STATS).reset_index(), ["metric"])


def tables(df):
    """(auc, retrain, timing) tables: mean, std and count over seeds."""
    return auc_stats(df)[["method", "r", *STATS]], retrain_stats(df), timing_stats(df)


def baseline(df, measure: str) -> float | None:
    """The fine-tuned model's (all training examples) value of the retraining measure."""
    import math

    metric = "test_accuracy" if measure == "test accuracy" else "test_loss"
    rows = df[(df.method == "finetune") & (df.metric == metric)]["value"]
    if not len(rows):
        return None
    value = float(rows.iloc[0])
    return math.exp(value) if measure == "test perplexity" else value


def _skipped(summary_path: Path, methods_rtags) -> list[tuple[str, str]]:
    """(method, reason) of every scored method whose score manifest says it was skipped."""
    base = Path(summary_path).parent
    out = []
    for method, tag in methods_rtags:
        m = base / "scores" / method / tag / "manifest.json"
        if m.exists():
            rec = json.loads(m.read_text())
            if rec.get("status") == "skipped":
                out.append((method, rec.get("reason", "")))
    return out


# ---- tables as text ---------------------------------------------------------------------------------

def _cells(t):
    return [_fmt(mu, sd, c) for mu, sd, c in zip(t["mean"], t["std"], t["count"])]


def retrain_wide(df, retrain, skipped=()):
    """One row per (method, r), one column per fraction removed (with the number of examples when
    the fine-tuning recorded n_train), 'mean ± std' cells, the number of seeds; the model trained on
    all examples first, skipped methods last."""
    import pandas as pd

    fractions = sorted(retrain.fraction_removed.unique())
    n_rows = df[(df.method == "finetune") & (df.metric == "n_train")]["value"]
    n = int(n_rows.iloc[0]) if len(n_rows) else None
    heads = {f: f"{round(f * n)} removed ({f:.1%})" if n else f"{f:.1%} removed" for f in fractions}
    cells = retrain.assign(cell=_cells(retrain), r=retrain.r.map(lambda r: "" if pd.isna(r) else str(int(r))))
    wide = cells.pivot_table(index=["method", "r"], columns="fraction_removed", values="cell", aggfunc="first",
                             sort=False).reindex(columns=fractions).fillna("–")
    seeds = cells.groupby(["method", "r"], sort=False)["count"].max().astype(int).astype(str)
    wide = wide.rename(columns=heads).assign(seeds=seeds).reset_index()
    rows = []
    base = baseline(df, retrain["measure"].iloc[0])
    if base is not None:
        rows.append({"method": "none (all training examples)", "r": "", **{heads[f]: f"{base:.3f}" for f in fractions},
                     "seeds": "1"})
    rows += wide.to_dict("records")
    rows += [{"method": m, "r": "", **{heads[f]: "skipped" for f in fractions}, "seeds": "0"} for m, _ in skipped]
    return pd.DataFrame(rows, columns=["method", "r", *heads.values(), "seeds"])


def retrain_markdown(df, retrain, skipped=()) -> str:
    """The retraining table in markdown, with a sentence saying what it measures."""
    if not len(retrain):
        return "No retraining in this experiment.\n"
    measure = retrain["measure"].iloc[0]
    better = "higher" if measure == "test perplexity" else "lower"
    what = ("perplexity exp(mean over the test samples of each sample's mean token cross-entropy) per seed"
            if measure == "test perplexity" else "test accuracy")
    intro = (f"{measure.capitalize()} after removing the most helpful training examples (most negative influence) "
             f"and retraining with the same initialisation, order and settings; {what}, mean ± sample std over "
             f"the seeds (compressor seeds; random-score seeds for `random`). {better.capitalize()} = the method "
             "found more valuable examples.")
    table = retrain_wide(df, retrain, skipped).to_markdown(index=False, disable_numparse=True)
    notes = "".join(f"- **{m}** skipped by the workflow: {why}\n" for m, why in skipped)
    return f"{intro}\n\n{table}\n\n{notes}"


def auc_display(auc):
    return auc.assign(method=[_label(m, r) for m, r in zip(auc.method, auc.r)], AUC=_cells(auc),
                      seeds=auc["count"])[["method", "AUC", "seeds"]]


def timing_display(timing):
    return timing.assign(method=[_label(m, r) for m, r in zip(timing.method, timing.r)], seconds=_cells(timing),
                         seeds=timing["count"]).rename(columns={"metric": "stage"})[["method", "stage", "seconds", "seeds"]]


def provenance_display(df):
    import pandas as pd

    cols = ["git_commit", "git_dirty", "config_sha256", "dropinf_version", "torch_version", "device"]
    rows = df.reindex(columns=cols).dropna(subset=["git_commit"])
    return rows.drop_duplicates().reset_index(drop=True) if len(rows) else pd.DataFrame(columns=cols)


def tables_html(df, auc, retrain, timing, skipped, experiment: str) -> str:
    """The report's summary tables as one HTML page (pandas' to_html)."""
    import html

    import pandas as pd

    def table(t):
        return t.to_html(index=False, border=0, classes="results", na_rep="")

    measure = retrain["measure"].iloc[0] if len(retrain) else "test accuracy"
    base = baseline(df, measure)
    parts = [f"<h2>{html.escape(experiment)}: results (mean ± std over seeds)</h2>"]
    if base is not None:
        parts.append(f"<p>Fine-tuned model {measure}: {base:.4f}</p>")
    parts += ["<h3>Mislabel-detection AUC</h3>", table(auc_display(auc))]
    if len(retrain):
        parts += [f"<h3>{measure.capitalize()} after removing the most helpful fraction and retraining</h3>",
                  table(retrain_wide(df, retrain))]
    if len(timing):
        parts += ["<h3>Wall seconds</h3>", table(timing_display(timing))]
    if skipped:
        parts += ["<h3>Skipped</h3>", table(pd.DataFrame(skipped, columns=["method", "reason"]))]
    parts += ["<h3>Provenance</h3>", table(provenance_display(df))]
    style = ("<style>body{font-family:sans-serif;font-size:14px} table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child{text-align:left}</style>")
    return (f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")


# ---- figures ----------------------------------------------------------------------------------------

def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this experiment", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_outside(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def auc_by_method_figure(df, auc, experiment: str):
    """Bars: mean AUC per (method, r) with std error bars; dots: the seeds; chance at 0.5."""
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(auc) + 2.5), 4.5))
    ax.set_title(f"{experiment}: mislabeled-example detection\n(bars: mean ± std over seeds; dots: seeds)", fontsize=10)
    if not len(auc):
        _no_data(ax, "mislabel-detection AUC")
        return fig
    x = np.arange(len(auc))
    colors = ["#999999" if m == "random" else "#c67a7a" if m in FULL_SPACE else "#7a9cc6" for m in auc.method]
    ax.bar(x, auc["mean"], yerr=auc["std"].fillna(0), capsize=3, color=colors)
    pts = df[df.metric == "mislabel_auc"]
    for i, (m, r) in enumerate(zip(auc.method, auc.r)):
        sel = pts[(pts.method == m) & (pts.r.isna() if pd.isna(r) else (pts.r == r))]
        ax.scatter(np.full(len(sel), i), sel["value"], color="k", s=8, zorder=3)
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(x, [_label(m, r) for m, r in zip(auc.method, auc.r)], rotation=45, ha="right")
    ax.set_ylabel("mislabel-detection AUC")
    ax.set_ylim(min(0.3, float(pts["value"].min()) - 0.05), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def auc_vs_r_figure(df, auc, experiment: str):
    """AUC of each compressed method against r (x ticks at the r values that ran), min-max bands over
    seeds; the uncompressed methods as horizontal lines of their own style."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.set_title(f"{experiment}: mislabel-detection AUC against r\n(line: mean over seeds; band: min-max)",
                 fontsize=10)
    comp = auc[auc.r.notna()]
    if not len(auc):
        _no_data(ax, "mislabel-detection AUC")
        return fig
    pts = df[df.metric == "mislabel_auc"]
    for method, g in comp.groupby("method", sort=False):
        x = g.r.astype(float)
        line, = ax.plot(x, g["mean"], marker="o", label=method)
        ax.fill_between(x, g["min"], g["max"], color=line.get_color(), alpha=0.2)
    styles = iter([("k", ":"), ("#8c564b", "--"), ("#555555", "-."), ("#bcbd22", (0, (5, 1, 1, 1, 1, 1)))])
    for row in auc[auc.r.isna()].itertuples():
        if row.method in FULL_SPACE:
            color, ls = next(styles, ("k", ":"))
            ax.axhline(row.mean, ls=ls, lw=1.3, color=color, label=f"{row.method} (uncompressed)")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8, label="chance")
    rs = sorted(int(r) for r in comp.r.unique())
    if rs:
        ax.set_xscale("log", base=2)
        ax.set_xticks(rs, [str(r) for r in rs])
        ax.minorticks_off()
    ax.set_xlabel("r (compressed dimension)")
    ax.set_ylabel("mislabel-detection AUC")
    ax.set_ylim(min(0.4, float(pts["value"].min()) - 0.05), 1.0)
    _legend_outside(ax)
    return fig


def retrain_figure(retrain, base, experiment: str):
    """One panel per r: the retraining measure against the fraction removed (0 = the model trained
    on everything), the uncompressed methods and random in every panel; random dashed."""
    import matplotlib.pyplot as plt

    rs = sorted(int(r) for r in retrain.r.dropna().unique()) or [None]
    fig, axes = plt.subplots(1, len(rs), figsize=(4.8 * len(rs) + 2.0, 4.5), squeeze=False, sharey=True)
    axes = axes[0]
    if not len(retrain):
        _no_data(axes[0], "retraining")
        axes[0].set_title(f"{experiment}: retraining", fontsize=10)
        return fig
    measure = retrain["measure"].iloc[0]
    fractions = sorted(retrain.fraction_removed.unique())
    ticks = ([0.0] if base is not None else []) + fractions
    for ax, r in zip(axes, rs):
        sel = retrain[(retrain.r == r) | retrain.r.isna()] if r is not None else retrain
        for (method, _), g in sel.groupby(["method", "r"], dropna=False, sort=False):
            xs, ys, es = list(g.fraction_removed), list(g["mean"]), list(g["std"].fillna(0))
            if base is not None:
                xs, ys, es = [0.0] + xs, [base] + ys, [0.0] + es
            style = "--" if method == "random" else ":" if method in FULL_SPACE else "-"
            ax.errorbar(xs, ys, yerr=es, marker="o", ls=style, capsize=2, label=method, lw=1.5)
        ax.set_xticks(ticks, [f"{f:.0%}" if f * 100 == round(f * 100) else f"{f:.1%}" for f in ticks])
        ax.set_xlabel("most helpful training examples removed")
        ax.set_title("all methods" if r is None else f"compressed at r = {r}", fontsize=9)
    axes[0].set_ylabel(f"{measure} after retraining")
    _legend_outside(axes[-1])
    fig.suptitle(f"{experiment}: {measure} after removing the most helpful examples and retraining", fontsize=10)
    return fig


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")  # tight: nothing clipped
    plt.close(fig)


# ---- the stage ----------------------------------------------------------------------------------------

def method_rtag(text: str) -> tuple[str, ...]:
    return tuple(text.split("/", 1))


#: a (method, rtag) pair on the command line: METHOD/RTAG
METHOD_RTAG = Codec(method_rtag, "/".join, "METHOD/RTAG")


@dataclass(frozen=True, kw_only=True)
class ReportOptions:
    summary: Path = option("summary.csv")
    out_dir: Path = option("directory for the tables and plots")
    experiment: str = option("experiment name in titles", default="")
    scored: tuple[tuple[str, str], ...] = option("METHOD/RTAG pairs, to list skipped methods", default=(),
                                                 codec=METHOD_RTAG)


@command("report", ReportOptions, help="tables and plots from summary.csv")
def report(*, summary, out_dir, experiment: str = "", scored=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(summary, dtype={"r": "Int64", "seed": "Int64"})
    auc, retrain, timing = auc_stats(df), retrain_stats(df), timing_stats(df)
    measure = retrain["measure"].iloc[0] if len(retrain) else "test accuracy"
    skipped = _skipped(Path(summary), scored)
    for name, t in (("auc_table.csv", auc[["method", "r", *STATS]]), ("retrain_table.csv", retrain),
                    ("timing_table.csv", timing)):
        with atomic_path(out_dir / name) as tmp:
            t.to_csv(tmp, index=False)
    with atomic_path(out_dir / "retrain_table.md") as tmp:
        tmp.write_text(retrain_markdown(df, retrain, skipped))
    _savefig(auc_by_method_figure(df, auc, experiment), out_dir / "auc_by_method.png")
    _savefig(auc_vs_r_figure(df, auc, experiment), out_dir / "auc_vs_r.png")
    _savefig(retrain_figure(retrain, baseline(df, measure), experiment), out_dir / "accuracy_vs_removed.png")
    with atomic_path(out_dir / "tables.html") as tmp:
        tmp.write_text(tables_html(df, auc, retrain, timing, skipped, experiment))
    log.info("report tables and plots written to %s", out_dir)
