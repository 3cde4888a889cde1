"""Report tables: perplexity for language models (exp per seed, then mean ± std over seeds) and the
retraining table in markdown."""
from __future__ import annotations

import math
import statistics

import pandas as pd

from dropinf.pipeline.report import retrain_markdown, tables


def markdown_rows(md: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of every body row of the markdown table(s) in `md`."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]
    return {r[0]: r[1:] for r in rows}


def _rows(method, r, metric, values):
    return [{"experiment": "e", "method": method, "r": r, "seed": s, "metric": metric, "value": v}
            for s, v in enumerate(values)]


def test_language_model_retraining_is_reported_as_perplexity():
    losses = [5.0, 5.2, 5.1]
    df = pd.DataFrame(_rows("dropout", 64, "retrain_test_loss@0.075", losses)
                      + _rows("random", None, "retrain_test_loss@0.075", [4.9, 4.95])
                      + [{"experiment": "e", "method": "finetune", "r": None, "seed": 0, "metric": m, "value": v}
                         for m, v in (("test_loss", 4.8), ("n_train", 2000))])
    df["r"] = df["r"].astype("Int64")
    _, retrain, _ = tables(df)
    row = retrain[retrain.method == "dropout"].iloc[0]
    ppl = [math.exp(v) for v in losses]
    assert row.measure == "test perplexity" and row["count"] == 3
    assert math.isclose(row["mean"], statistics.mean(ppl)) and math.isclose(row["std"], statistics.stdev(ppl))
    md = retrain_markdown(df, retrain, [("tracin", "over budget")])
    rows = markdown_rows(md)
    assert rows["method"] == ["r", "150 removed (7.5%)", "seeds"]
    assert rows["none (all training examples)"] == ["", f"{math.exp(4.8):.3f}", "1"]
    assert rows["dropout"] == ["64", f"{statistics.mean(ppl):.3f} ± {statistics.stdev(ppl):.3f}", "3"]
    assert rows["random"][2] == "2" and rows["tracin"] == ["", "skipped", "0"]
    assert list(rows)[1:] == ["none (all training examples)", "dropout", "random", "tracin"]
    assert "**tracin** skipped by the workflow: over budget" in md
    assert "Higher = the method found more valuable examples" in md


def test_classifier_retraining_stays_accuracy():
    df = pd.DataFrame(_rows("gaussian", 16, "retrain_test_acc@0.1", [0.9, 0.8])
                      + [{"experiment": "e", "method": "finetune", "r": None, "seed": 0, "metric": "test_accuracy",
                          "value": 0.95}])
    df["r"] = df["r"].astype("Int64")
    _, retrain, _ = tables(df)
    rows = markdown_rows(retrain_markdown(df, retrain))
    assert rows["method"] == ["r", "10.0% removed", "seeds"] and rows["gaussian"] == ["16", "0.850 ± 0.071", "2"]
    assert rows["none (all training examples)"] == ["", "0.950", "1"]
    assert "Lower = " in retrain_markdown(df, retrain)
    assert retrain_markdown(df[df.method == "finetune"], retrain.iloc[0:0]) == "No retraining in this experiment.\n"


def _summary(tmp_path):
    """A small summary.csv: AUC of orig, lissa and two compressed methods at two r, retraining."""
    rows = _rows("orig", None, "mislabel_auc", [0.9]) + _rows("lissa", None, "mislabel_auc", [0.88])
    rows += _rows("random", None, "mislabel_auc", [0.5, 0.52])
    for method in ("dropout", "gaussian"):
        for r in (16, 64):
            rows += _rows(method, r, "mislabel_auc", [0.6 + r / 200, 0.62 + r / 200, 0.64 + r / 200])
            rows += _rows(method, r, "retrain_test_acc@0.05", [0.9, 0.91, 0.92])
            rows += _rows(method, r, "retrain_test_acc@0.3", [0.8, 0.81, 0.82])
            rows += _rows(method, r, "extract_seconds", [1.0, 1.2, 1.1])
    rows += [{"experiment": "e", "method": "finetune", "r": None, "seed": 0, "metric": "test_accuracy", "value": 0.95,
              "git_commit": "abc", "git_dirty": "false"}]
    path = tmp_path / "summary.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _html_table(text):
    """Rows (header first) of one <table> written by pandas' to_html."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(text)
    return [[("".join(c.itertext())).strip() for c in tr] for tr in root.iter("tr")]


def test_report_writes_every_output_the_rule_declares(tmp_path):
    import re
    from pathlib import Path

    from dropinf.pipeline.report import report

    rules = (Path(__file__).resolve().parents[2] / "workflow" / "rules" / "report.smk").read_text()
    declared = re.findall(r'f"\{REPORT_DIR\}/([\w.]+)"', rules)
    assert declared
    report(summary=_summary(tmp_path), out_dir=tmp_path / "report", experiment="toy-exp")
    for name in declared + ["auc_table.csv", "retrain_table.csv", "timing_table.csv"]:
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    html = (tmp_path / "report" / "tables.html").read_text()
    tables = [_html_table(t) for t in re.findall(r"<table.*?</table>", html, flags=re.S)]
    assert len(tables) == 4  # AUC, retraining, seconds, provenance: each parsed back as XML
    auc = {row[0]: row[1:] for row in tables[0][1:]}
    assert tables[0][0] == ["method", "AUC", "seeds"]
    assert auc["dropout r=16"] == ["0.700 ± 0.020", "3"] and auc["orig"] == ["0.900", "1"]
    assert "toy-exp" in html and "Mislabel-detection AUC" in html


def _readable(fig):
    """Draw `fig` and check what a reader needs: every label inside the figure, no two tick labels
    of an axis overlapping, no text under the legend, the legend beside (not over) the axes."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    legends = [leg.get_window_extent(renderer) for leg in fig.legends]
    inside_legend = {id(t) for leg in fig.legends for t in leg.findobj(Text)}
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert texts
    for t in texts:
        ext = t.get_window_extent(renderer)
        assert box.x0 - 0.5 <= ext.x0 and ext.x1 <= box.x1 + 0.5 and box.y0 - 0.5 <= ext.y0 and \
            ext.y1 <= box.y1 + 0.5, f"{t.get_text()!r} is clipped: {ext} outside {box}"
        if id(t) not in inside_legend:
            assert not any(ext.overlaps(leg) for leg in legends), f"{t.get_text()!r} is under the legend"
    for ax in fig.axes:
        area = ax.get_window_extent(renderer)
        assert not any(area.overlaps(leg) for leg in legends), "the legend covers the data"
        labels = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                assert not a.overlaps(b), "x tick labels overlap"


def _r_ticks(ax):
    """(positions, labels) of the x ticks that carry a label."""
    return ([float(x) for x, t in zip(ax.get_xticks(), ax.get_xticklabels()) if t.get_text()],
            [t.get_text() for t in ax.get_xticklabels() if t.get_text()])


def test_figures_name_the_experiment_tick_the_r_values_and_are_readable(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dropinf.pipeline.report import (auc_by_method_figure, auc_stats, auc_vs_r_figure, baseline,
                                         retrain_figure, retrain_stats)

    df = pd.read_csv(_summary(tmp_path), dtype={"r": "Int64", "seed": "Int64"})
    auc, retrain = auc_stats(df), retrain_stats(df)
    fig = auc_vs_r_figure(df, auc, "toy-exp")
    ax = fig.axes[0]
    assert "toy-exp" in ax.get_title()
    assert _r_ticks(ax) == ([16.0, 64.0], ["16", "64"])
    labels = ax.get_legend_handles_labels()[1]
    assert {"dropout", "gaussian", "orig (uncompressed): 0.900", "lissa (uncompressed): 0.880"} <= set(labels)
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["orig (uncompressed): 0.900"] != styles["lissa (uncompressed): 0.880"]  # distinguishable
    _readable(fig)
    fig = auc_by_method_figure(df, auc, "toy-exp")
    assert "toy-exp" in fig.axes[0].get_title()
    assert "dropout r=16" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    _readable(fig)
    fig = retrain_figure(retrain, baseline(df, "test accuracy"), "toy-exp")
    assert len(fig.axes) == 2 and "toy-exp" in fig._suptitle.get_text()
    assert _r_ticks(fig.axes[0]) == ([0.0, 0.05, 0.3], ["0%", "5%", "30%"])
    _readable(fig)


def test_many_methods_and_r_values_stay_readable(tmp_path):
    """A full sweep: every method, seven r, ten seeds; long experiment name."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from dropinf.pipeline.methods import COMPRESSED, FULL_SPACE
    from dropinf.pipeline.report import auc_by_method_figure, auc_stats, auc_vs_r_figure

    rng = np.random.default_rng(0)
    rs = [1, 2, 3, 4, 8, 16, 64]
    rows = [row for m in FULL_SPACE for row in _rows(m, None, "mislabel_auc", [0.8])]
    rows += _rows("random", None, "mislabel_auc", list(rng.uniform(0.45, 0.55, 10)))
    for m in COMPRESSED:
        for r in rs:
            rows += _rows(m, r, "mislabel_auc", list(rng.uniform(0.5, 0.85, 10)))
    df = pd.DataFrame(rows)
    df["r"] = df["r"].astype("Int64")
    auc = auc_stats(df)
    exp = "mislabel-amazon-minilm-lora8-a-long-experiment-name"
    fig = auc_vs_r_figure(df, auc, exp)
    assert _r_ticks(fig.axes[0]) == ([float(r) for r in rs], [str(r) for r in rs])
    _readable(fig)
    _readable(auc_by_method_figure(df, auc, exp))


def test_lds_plot_of_a_summary(tmp_path):
    """LDS against r with one line per compressed method, the others as labelled lines; written as a
    PNG by the LDS summary's plot function."""
    import matplotlib

    matplotlib.use("Agg")
    from dropinf.pipeline.report import lds_figure, lds_plot

    rows = _rows("tracin", None, "lds", [0.11]) + _rows("random", None, "lds", [0.01, -0.02, 0.0])
    for m in ("dropout", "logra"):
        for r in (16, 64, 256):
            rows += _rows(m, r, "lds", [r / 1000, r / 1000 + 0.02, r / 1000 + 0.04])
            rows += _rows(m, r, "lds_n_test", [100, 100, 100])
    df = pd.DataFrame(rows)
    df["r"] = df["r"].astype("Int64")
    fig = lds_figure(df, "toy-lds")
    ax = fig.axes[0]
    assert "toy-lds" in ax.get_title()
    assert _r_ticks(ax) == ([16.0, 64.0, 256.0], ["16", "64", "256"])
    labels = ax.get_legend_handles_labels()[1]
    assert {"dropout", "logra", "tracin (uncompressed): 0.110", "random scores: -0.003"} <= set(labels)
    _readable(fig)
    path = tmp_path / "summary.csv"
    df.to_csv(path, index=False)
    lds_plot(path, tmp_path / "lds_vs_r.png", "toy-lds")
    png = (tmp_path / "lds_vs_r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
