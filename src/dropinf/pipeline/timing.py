"""Cross-experiment timing tables (the paper's Tables 9-11): compression and iHVP seconds per method.

Reads the per-experiment `summary.csv` files of stage `summarize` and writes, into one directory,
`timing.csv` (one row per experiment, method and r: mean, std and count over seeds of
`extract_seconds` and `score_seconds`, with the commits and devices they came from) and `TABLE.md`
(one markdown table per experiment; a missing value prints as "—" with a footnote saying why).

    python -m dropinf timing --out results/reference/timing results/reference/*/summary.csv

Like report.py it reads CSV/JSON only. Both outputs are complete or absent: every
input is read and checked before anything is written.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import DropinfError
from .commands import command, option
from .common import atomic_path, log
from .methods import BASELINES, FULL_SPACE, METHODS
from .metrics import TIMING_METRICS
from .report import _fmt, _skipped, timing_stats

NEEDED = ("experiment", "method", "r", "seed", "metric", "value", "git_commit", "git_dirty", "torch_version", "device")
#: The table's two columns (of `metrics.TIMING_METRICS`); compress_seconds fills the first when a
#: compressor was served from stored raw gradients, recompute_seconds is inside score_seconds.
TABLED = ("extract_seconds", "score_seconds")
CSV_COLUMNS = ("experiment", "method", "r", "device", "n_train",
               *(f"{m}_{s}" for m in TABLED for s in ("mean", "std", "count")),
               "git_commits", "git_dirty", "torch_versions", "extract_seconds_source", "extract_seconds_note",
               "score_seconds_note", "summary")
TEXT = {c: str for c in NEEDED if c not in ("r", "seed", "value")}
SUP = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def read_summary(path):
    """The rows of one summary.csv, checked: DropinfError naming the file on any problem."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"r": "Int64", "seed": "Int64", **TEXT},
                         keep_default_na=False, na_values={c: [""] for c in ("r", "seed", "value")})
    except FileNotFoundError:
        raise DropinfError(f"{path}: no such summary file") from None
    except pd.errors.EmptyDataError:
        raise DropinfError(f"{path}: empty file (not even a header)") from None
    except (ValueError, TypeError, pd.errors.ParserError) as e:
        raise DropinfError(f"{path}: not a readable summary CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise DropinfError(f"{path}: missing column(s) {missing}; a summary.csv has {list(NEEDED)} (and more)")
    if not len(df):
        raise DropinfError(f"{path}: header only, no rows")
    value = pd.to_numeric(df["value"], errors="coerce")
    timed = df.metric.isin(TIMING_METRICS)
    bad = timed & ~(value.notna() & (value >= 0) & (value < float("inf")))
    bad |= timed & (df.method == "")
    if bad.any():
        lines = [int(i) + 2 for i in df.index[bad][:5]]  # 1-based, after the header
        raise DropinfError(f"{path}: timing rows without a method or a finite non-negative value at lines {lines}")
    return df.assign(value=value)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # a garbled manifest must not pass for "nothing skipped"
        raise DropinfError(f"{path}: unreadable JSON ({type(e).__name__}: {e})") from None


def _side_info(summary: Path, present: set[str]) -> tuple[dict[str, str], int | None]:
    """({skipped method: why}, n_train) from what the workflow left beside `summary`, if anything."""
    base = summary.parent
    manifests = sorted(base.glob("scores/*/*/manifest.json"))
    for p in manifests:
        _json(p)  # checked here: report._skipped would raise a JSONDecodeError that names no file
    pairs = [(p.parts[-3], p.parts[-2]) for p in manifests]
    skipped = {m: f"method skipped by the workflow: {why or 'no reason recorded'}" for m, why in _skipped(summary, pairs)}
    n_train = None
    for p in sorted(base.glob("grads/*/*/manifest.json")):
        n_train = (_json(p).get("n") or {}).get("train")
        if n_train is not None:
            break
    return {m: w for m, w in skipped.items() if m not in present}, n_train


PROJECTION = ("projection of the stored raw gradients only (compress_seconds); their one identity pass is the "
              "full-space methods' compression time")


def _why_no_extract(method: str, r, extracted_rs, recomputed: bool) -> str:
    if method in BASELINES:
        return "needs no gradients: no extraction"
    if method in FULL_SPACE:
        if recomputed:
            return "raw gradients recomputed inside the solver: counted in iHVP+scoring"
        return "no raw-gradient (identity) extraction time recorded"
    if r is not None and any(x > r for x in extracted_rs):
        return "served by slicing a larger r: no own pass"
    # served from the raw identity gradients (or sliced from an r not run here): summary.csv has no time for it
    return "no own gradient pass timed at any r: served from the raw identity gradients or by slicing"


def _joined(values) -> str:
    return "; ".join(sorted({str(v) for v in values if str(v) not in ("", "nan", "<NA>")}))


def _experiment(exp: str, df, summary: Path) -> tuple[list[dict], dict]:
    """timing.csv rows of one experiment and its provenance (commits, devices, torch versions)."""
    import pandas as pd

    tim = df[df.metric.isin(TABLED)]
    stats = {}
    for s in timing_stats(df).itertuples(index=False):  # report's own mean/std/count over seeds
        stats[(s.method, None if pd.isna(s.r) else int(s.r), s.metric)] = (s.mean, s.std, int(s.count))
    prov = defaultdict(lambda: defaultdict(set))
    for row in tim.itertuples(index=False):
        key = (row.method, None if pd.isna(row.r) else int(row.r))
        for field in ("device", "git_commit", "git_dirty", "torch_version"):
            prov[key][field].add(getattr(row, field))
    extracted = defaultdict(set)
    for m, r, metric in stats:
        if metric == "extract_seconds" and r is not None:
            extracted[m].add(r)
    recomputed = set(df.loc[df.metric == "recompute_seconds", "method"])
    skipped, n_train = _side_info(summary, set(df.method))
    recorded = df.loc[(df.method == "finetune") & (df.metric == "n_train"), "value"]  # finetune records it now
    if len(recorded):
        n_train = int(recorded.iloc[0])
    rows = []
    for key in prov:
        m, r = key
        ex, sc = stats.get((m, r, "extract_seconds")), stats.get((m, r, "score_seconds"))
        source = "own pass" if ex else ""
        if not ex and stats.get((m, r, "compress_seconds")):  # served from stored raw gradients
            ex, source = stats[(m, r, "compress_seconds")], PROJECTION
        rows.append({"experiment": exp, "method": m, "r": r, "device": _joined(prov[key]["device"]),
                     "n_train": n_train, **_stats("extract_seconds", ex), **_stats("score_seconds", sc),
                     "git_commits": _joined(prov[key]["git_commit"]), "git_dirty": _joined(prov[key]["git_dirty"]),
                     "torch_versions": _joined(prov[key]["torch_version"]), "extract_seconds_source": source,
                     "extract_seconds_note": "" if ex else _why_no_extract(m, r, extracted[m], m in recomputed),
                     "score_seconds_note": "" if sc else "no score_seconds recorded",
                     "summary": str(summary)})
    for m, why in skipped.items():
        rows.append({"experiment": exp, "method": m, "r": None, "device": "", "n_train": n_train,
                     **_stats("extract_seconds", None), **_stats("score_seconds", None), "git_commits": "",
                     "git_dirty": "", "torch_versions": "", "extract_seconds_source": "", "extract_seconds_note": why,
                     "score_seconds_note": why,
                     "summary": str(summary)})
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda x: (order.get(x["method"], len(order)), x["method"], x["r"] is not None, x["r"] or 0))
    src = tim if len(tim) else df
    info = {k: _joined(src[c]) for k, c in (("commits", "git_commit"), ("dirty", "git_dirty"),
                                           ("devices", "device"), ("torch", "torch_version"))}
    return rows, info


def _stats(metric: str, s) -> dict:
    mean, std, count = s if s else (None, None, 0)
    return {f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_count": count}


def _markdown(exp: str, rows: list[dict], info: dict, summary: Path) -> str:
    notes: list[str] = []

    def missing(why: str) -> str:
        if why not in notes:
            notes.append(why)
        return "—" + str(notes.index(why) + 1).translate(SUP)

    out = [f"## {exp}", ""]
    if rows:
        out += ["| method | r | compression s | iHVP+scoring s | seeds | device |", "|---|---|---|---|---|---|"]
    for x in rows:
        cells = [_fmt(x[f"{k}_mean"], x[f"{k}_std"], x[f"{k}_count"]) if x[f"{k}_count"] else missing(x[f"{k}_note"])
                 for k in TABLED]
        if x["extract_seconds_source"] == PROJECTION:
            cells[0] += missing(PROJECTION)[1:]  # the footnote's marker, after the value
        r = x["r"] if x["r"] is not None else ("full" if x["method"] in FULL_SPACE else "")
        seeds = max(x["extract_seconds_count"], x["score_seconds_count"])
        out.append(f"| {x['method']} | {r} | {cells[0]} | {cells[1]} | {seeds} | {x['device']} |")
    if not rows:
        out.append(f"No extract_seconds or score_seconds rows in {summary}.")
    out += [""] + [f"- {str(i + 1).translate(SUP)} {why}" for i, why in enumerate(notes)] + ([""] if notes else [])
    dirty = " (working tree dirty)" if "true" in info["dirty"].lower().split("; ") else ""
    out += [(f"Provenance: git {info['commits'] or 'unknown'}{dirty}; device {info['devices'] or 'unknown'}; "
             f"torch {info['torch'] or 'unknown'}; from `{summary}`."), ""]
    return "\n".join(out)


HEADER = """# Timing per method (the paper's Tables 9-11)

Wall seconds, mean ± sample std over seeds (one run: its value alone). *compression s*: the gradient
pass over both splits (`extract_seconds`; for orig, lissa, datainf and tracin the one raw-gradient
`identity` pass they share, so the same number). *iHVP+scoring s*: the solver, i.e. the inverse-Hessian
vector products and the scoring (`score_seconds`). *seeds*: runs averaged. Written by
`python -m dropinf timing`; the same numbers, with commits and devices per row, in `timing.csv`.
"""


@dataclass(frozen=True, kw_only=True)
class TimingOptions:
    summaries: tuple[Path, ...] = option("per-experiment summary.csv files", positional=True)
    out_dir: Path = option("directory for timing.csv and TABLE.md", flag="--out")


@command("timing", TimingOptions, help="cross-experiment timing tables (compression and iHVP seconds per method) "
                                       "from summary.csv files")
def timing_tables(*, summaries, out_dir) -> dict:
    """Write `timing.csv` and `TABLE.md` for `summaries` into `out_dir`; returns what was written."""
    import pandas as pd

    if not summaries:
        raise DropinfError("timing: no summary.csv files given")
    frames, seen = [], {}
    for path in map(Path, summaries):
        df = read_summary(path)
        for exp in dict.fromkeys(df.experiment):
            if exp in seen:  # the same runs twice would be averaged as if they were more seeds
                raise DropinfError(f"{path}: experiment {exp!r} is also in {seen[exp]}; give each summary once")
            seen[exp] = path
        frames.append((path, df))
    rows, sections = [], [HEADER]
    for path, df in frames:
        for exp, part in df.groupby("experiment", sort=False):
            exp_rows, info = _experiment(exp, part, path)
            rows += exp_rows
            sections.append(_markdown(exp, exp_rows, info, path))
    table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    table["r"] = table["r"].astype("Int64")
    table["n_train"] = table["n_train"].astype("Int64")
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "timing.csv", out_dir / "TABLE.md"
    # both temporaries are written before either is renamed: an error leaves neither changed
    with atomic_path(csv_path) as tmp_csv, atomic_path(md_path) as tmp_md:
        table.to_csv(tmp_csv, index=False)
        tmp_md.write_text("\n".join(sections))
    log.info("timing: %d rows from %d experiments -> %s, %s", len(table), len(seen), csv_path, md_path)
    return {"csv": csv_path, "markdown": md_path, "experiments": list(seen), "rows": len(table)}
