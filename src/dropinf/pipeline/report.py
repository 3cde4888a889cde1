"""Stages `summarize` (tidy summary.csv) and `report` (tables and plots for `snakemake --report`).

`report` writes, into one directory: `auc_table.csv` (with `auc_self_*` columns, the mislabel AUC
of self-influence, where `score.self` scored it), `retrain_table.csv`, `timing_table.csv`
(mean, std and count over seeds), `retrain_table.md`, `tables.html`, and the plots
`auc_by_method.png`, `auc_vs_r.png`, `accuracy_vs_removed.png`; `lds_plot` draws `lds_vs_r.png` from
an LDS summary (`pipeline.lds.summarize`). One function per table and per figure; the tables go
through pandas. Neither stage imports torch (CSV/JSON only: they start fast).
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


SELF_AUC = "mislabel_auc_self"
SELF_COLUMNS = [f"auc_self_{s}" for s in STATS]


def auc_stats(df):
    """Mislabel AUC per (method, r): mean, std, count, min, max over seeds; where the methods' self-
    influence was scored (`score.self`), its AUC's mean, std and count as `auc_self_*` columns."""
    auc = df[df.metric == "mislabel_auc"].groupby(["method", "r"], dropna=False)["value"]
    out = _in_method_order(auc.agg(STATS + ["min", "max"]).reset_index())
    own = df[df.metric == SELF_AUC]
    if len(own):
        own = own.groupby(["method", "r"], dropna=False)["value"].agg(STATS).reset_index()
        own = own.assign(r=own["r"].astype("Int64")).rename(columns=dict(zip(STATS, SELF_COLUMNS)))
        out = out.merge(own, on=["method", "r"], how="left")
    return out


def auc_columns(auc) -> list[str]:
    """Columns of the AUC table: method, r, the statistics, and the self-influence AUC's when present."""
    return ["method", "r", *STATS, *[c for c in SELF_COLUMNS if c in auc]]


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
    auc = auc_stats(df)
    return auc[auc_columns(auc)], retrain_stats(df), timing_stats(df)


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
    import pandas as pd

    shown = auc.assign(method=[_label(m, r) for m, r in zip(auc.method, auc.r)], AUC=_cells(auc), seeds=auc["count"])
    if "auc_self_mean" not in auc:
        return shown[["method", "AUC", "seeds"]]
    shown["AUC (self-influence)"] = ["–" if pd.isna(mu) else _fmt(mu, sd, c) for mu, sd, c in
                                     zip(auc.auc_self_mean, auc.auc_self_std, auc.auc_self_count)]
    return shown[["method", "AUC", "AUC (self-influence)", "seeds"]]


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
# Every figure uses constrained layout with its legend outside the axes (nothing clipped, no legend
# over the data) and one colour and line style per method across all figures (`method_style`).

#: line styles of the uncompressed methods, so that each is told apart even where their values coincide
_UNCOMPRESSED = {"orig": ("#000000", ":"), "lissa": ("#8c564b", "--"), "datainf": ("#e377c2", "-."),
                 "tracin": ("#bcbd22", (0, (5, 1, 1, 1, 1, 1)))}
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#17becf", "#7f7f7f"]


def method_style(method: str) -> dict:
    """Colour, line style and legend label of a method: compressed methods solid in their own colour,
    uncompressed ones each their own dash pattern marked '(uncompressed)', random grey dashed."""
    from .methods import COMPRESSED

    if method in _UNCOMPRESSED:
        color, ls = _UNCOMPRESSED[method]
        return {"color": color, "ls": ls, "label": f"{method} (uncompressed)"}
    if method == "random":
        return {"color": "#7f7f7f", "ls": "--", "label": "random scores"}
    i = COMPRESSED.index(method) if method in COMPRESSED else len(COMPRESSED) + sum(map(ord, method))
    return {"color": _COLORS[i % len(_COLORS)], "ls": "-", "label": method}


def _figure(width: float, height: float = 4.5, ncols: int = 1, **kw):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False, layout="constrained", **kw)
    return fig, list(axes[0])


def _legend_outside(fig, ax) -> None:
    """The axes' legend entries (each label once) beside the axes, inside the figure."""
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, label in zip(handles, labels):
        seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=8)


def _title(where, experiment: str, what: str, how: str = "") -> None:
    """Title of an axes (or, for a figure of panels, the figure): the experiment on its own line
    (names can be long), what is shown, and how it is summarised."""
    text = f"{experiment}\n{what}" + (f"\n({how})" if how else "")
    if hasattr(where, "suptitle"):
        where.suptitle(text, fontsize=10)
    else:
        where.set_title(text, fontsize=10)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this experiment", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _r_axis(ax, rs) -> None:
    """Log2 x axis with one tick at each r that ran (and room around a single r)."""
    if not rs:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.minorticks_off()
    ax.set_xlim(min(rs) / 1.4, max(rs) * 1.4)
    ax.set_xlabel("r (compressed dimension)")


def _r_phrase(pts) -> str:
    rs = sorted(int(r) for r in pts.r.dropna().unique())
    return f"at r = {rs[0]}" if len(rs) == 1 else "against r"


def _band_phrase(pts) -> str:
    return "; band: min–max" if pts.r.dropna().nunique() > 1 else ""


def _seed_stats(pts, keys):
    """mean, std, min, max and count over seeds of `value` per `keys` (r NaN kept)."""
    return pts.groupby(keys, dropna=False, sort=False)["value"].agg(["mean", "std", "min", "max", "count"]).reset_index()


def _against_r(fig, ax, stats) -> None:
    """Compressed methods: mean against r with std error bars and a min-max band over seeds, the
    markers of the methods dodged sideways around each r (so that error bars do not hide each
    other; the ticks stay at r); methods without r: a labelled horizontal line at their mean. The
    caller adds the legend."""
    order = {m: i for i, m in enumerate(METHODS)}
    stats = stats.assign(_rank=stats["method"].map(lambda m: order.get(m, len(order)))).sort_values(["_rank", "r"])
    compressed = stats[stats.r.notna()]
    names = list(dict.fromkeys(compressed.method))
    step = 0.5 / max(1, len(names)) if compressed.r.nunique() == 1 else 0.04  # in log2 units of r
    for k, (method, g) in enumerate(compressed.groupby("method", sort=False)):
        st = method_style(method)
        x = g.r.astype(float).to_numpy() * 2.0 ** ((names.index(method) - (len(names) - 1) / 2) * step)
        ax.errorbar(x, g["mean"], yerr=g["std"].fillna(0), marker="o", ms=5, capsize=3, lw=1.6, color=st["color"],
                    label=st["label"])
        if len(g) > 1:
            ax.fill_between(x, g["min"], g["max"], color=st["color"], alpha=0.12, lw=0)
    for row in stats[stats.r.isna()].itertuples():
        st = method_style(row.method)
        ax.axhline(row.mean, color=st["color"], ls=st["ls"], lw=1.4, label=f"{st['label']}: {row.mean:.3f}")
    _r_axis(ax, sorted(int(r) for r in stats.r.dropna().unique()))


def auc_by_method_figure(df, auc, experiment: str):
    """Bars: mean AUC per (method, r) with std error bars; dots: the seeds; chance at 0.5."""
    import numpy as np
    import pandas as pd
    from matplotlib.patches import Patch

    fig, (ax,) = _figure(max(7.0, 0.32 * len(auc) + 3.5), 4.8)
    _title(ax, experiment, "mislabeled-example detection", "bars: mean ± std over seeds; dots: seeds")
    if not len(auc):
        _no_data(ax, "mislabel-detection AUC")
        return fig
    x = np.arange(len(auc))
    kinds = {"uncompressed": "#c67a7a", "compressed (at r)": "#7a9cc6", "random scores": "#999999"}
    kind = ["random scores" if m == "random" else "uncompressed" if m in FULL_SPACE else "compressed (at r)"
            for m in auc.method]
    ax.bar(x, auc["mean"], yerr=auc["std"].fillna(0), capsize=3, color=[kinds[k] for k in kind])
    pts = df[df.metric == "mislabel_auc"]
    for i, (m, r) in enumerate(zip(auc.method, auc.r)):
        sel = pts[(pts.method == m) & (pts.r.isna() if pd.isna(r) else (pts.r == r))]
        ax.scatter(np.full(len(sel), i), sel["value"], color="k", s=8, zorder=3)
    chance = ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(x, [_label(m, r) for m, r in zip(auc.method, auc.r)], rotation=90)
    ax.set_xlim(-0.7, len(auc) - 0.3)
    ax.set_ylabel("mislabel-detection AUC")
    ax.set_ylim(min(0.3, float(pts["value"].min()) - 0.05), 1.0)
    present = [k for k in kinds if k in kind]
    handles = [Patch(color=kinds[k]) for k in present] + [chance]
    fig.legend(handles, present + ["chance (0.5)"], loc="outside right center", fontsize=8)
    return fig


def auc_vs_r_figure(df, auc, experiment: str, methods=None):
    """AUC of each compressed method against r (x ticks at the r values that ran; error bars: std,
    bands: min-max over seeds); uncompressed methods as horizontal lines of their own style, labelled
    with their value; chance at 0.5. `methods`: only these (default: all but random). Drawn from the
    seed rows of `df` (`auc`, the table of `auc_stats`, is accepted for a uniform call)."""
    fig, (ax,) = _figure(8.0, 4.5)
    pts = df[(df.metric == "mislabel_auc") & (df.method != "random")]
    if methods is not None:
        pts = pts[pts.method.isin(list(methods))]
    _title(ax, experiment, f"mislabel-detection AUC {_r_phrase(pts)}", f"mean ± std over seeds{_band_phrase(pts)}")
    if not len(pts):
        _no_data(ax, "mislabel-detection AUC")
        return fig
    _against_r(fig, ax, _seed_stats(pts, ["method", "r"]))
    ax.axhline(0.5, color="grey", ls=":", lw=0.9, label="chance (0.5)")
    _legend_outside(fig, ax)
    ax.set_ylabel("mislabel-detection AUC")
    ax.set_ylim(min(0.4, float(pts["value"].min()) - 0.05), 1.0)
    return fig


def retrain_figure(retrain, base, experiment: str):
    """One panel per r: the retraining measure against the fraction removed (0 = the model trained
    on everything), the uncompressed methods and random in every panel, each in its own style."""
    rs = sorted(int(r) for r in retrain.r.dropna().unique()) or [None]
    fig, axes = _figure(4.8 * len(rs) + 2.2, 4.5, ncols=len(rs), sharey=True)
    if not len(retrain):
        _no_data(axes[0], "retraining")
        _title(axes[0], experiment, "retraining")
        return fig
    measure = retrain["measure"].iloc[0]
    fractions = sorted(retrain.fraction_removed.unique())
    ticks = ([0.0] if base is not None else []) + fractions
    gap = min(b - a for a, b in zip(ticks, ticks[1:])) if len(ticks) > 1 else 0.1
    for ax, r in zip(axes, rs):
        sel = retrain[(retrain.r == r) | retrain.r.isna()] if r is not None else retrain
        groups = list(sel.groupby(["method", "r"], dropna=False, sort=False))
        for k, ((method, _), g) in enumerate(groups):
            # markers dodged sideways (a quarter of the closest tick gap in all) so error bars stay apart
            dodge = (k - (len(groups) - 1) / 2) * gap * 0.25 / max(1, len(groups) - 1)
            xs, ys, es = list(g.fraction_removed + dodge), list(g["mean"]), list(g["std"].fillna(0))
            if base is not None:
                xs, ys, es = [0.0] + xs, [base] + ys, [0.0] + es
            st = method_style(method)
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=5, ls=st["ls"], color=st["color"], capsize=2, lw=1.5,
                        label=st["label"])
        ax.set_xticks(ticks, [f"{f:.0%}" if f * 100 == round(f * 100) else f"{f:.1%}" for f in ticks])
        ax.set_xlabel("most helpful training examples removed")
        ax.set_title("all methods" if r is None else f"compressed methods at r = {r}", fontsize=9)
    axes[0].set_ylabel(f"{measure} after retraining")
    _legend_outside(fig, axes[-1])
    _title(fig, experiment, f"{measure} after removing the most helpful examples and retraining",
           "mean ± std over seeds, markers dodged sideways; 0% = the model trained on all examples")
    return fig


def lds_figure(df, experiment: str):
    """The linear datamodeling score against r per method (error bars: std over seeds; bands:
    min-max when several r ran); methods without r (uncompressed, random scores) as labelled lines."""
    fig, (ax,) = _figure(8.0, 4.5)
    pts = df[df.metric == "lds"]
    _title(ax, experiment, f"linear datamodeling score {_r_phrase(pts)}",
           f"mean over test examples; mean ± std over seeds{_band_phrase(pts)}")
    if not len(pts):
        _no_data(ax, "linear datamodeling score")
        return fig
    _against_r(fig, ax, _seed_stats(pts, ["method", "r"]))
    ax.axhline(0.0, color="grey", lw=0.6)
    _legend_outside(fig, ax)
    ax.set_ylabel("LDS (higher is better)")
    return fig


def lds_plot(summary, out, experiment: str = "") -> None:
    """`lds_figure` of an LDS summary.csv (`pipeline.lds.summarize`), written to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    df = pd.read_csv(summary, dtype={"r": "Int64", "seed": "Int64"})
    _savefig(lds_figure(df, experiment), Path(out))


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
    for name, t in (("auc_table.csv", auc[auc_columns(auc)]), ("retrain_table.csv", retrain),
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
