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


def test_figures_name_the_experiment_and_tick_the_r_values(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dropinf.pipeline.report import (auc_by_method_figure, auc_stats, auc_vs_r_figure, baseline,
                                         retrain_figure, retrain_stats)

    df = pd.read_csv(_summary(tmp_path), dtype={"r": "Int64", "seed": "Int64"})
    auc, retrain = auc_stats(df), retrain_stats(df)
    fig = auc_vs_r_figure(df, auc, "toy-exp")
    ax = fig.axes[0]
    assert "toy-exp" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "64"]
    labels = ax.get_legend_handles_labels()[1]
    assert {"dropout", "gaussian", "orig (uncompressed)", "lissa (uncompressed)"} <= set(labels)
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["orig (uncompressed)"] != styles["lissa (uncompressed)"]  # distinguishable
    fig = auc_by_method_figure(df, auc, "toy-exp")
    assert "toy-exp" in fig.axes[0].get_title()
    assert "dropout r=16" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    fig = retrain_figure(retrain, baseline(df, "test accuracy"), "toy-exp")
    assert len(fig.axes) == 2 and "toy-exp" in fig._suptitle.get_text()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0%", "5%", "30%"]
