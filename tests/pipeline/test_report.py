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
