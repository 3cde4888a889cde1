"""Cross-experiment timing tables: numbers against an independent computation, missing-value notes,
clear errors on bad input with nothing written, and the committed reference summaries."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from dropinf.errors import DropinfError
from dropinf.__main__ import main
from dropinf.pipeline.timing import timing_tables

REPO = Path(__file__).resolve().parents[2]
HEADER = ["experiment", "method", "r", "seed", "metric", "value", "git_commit", "git_dirty", "config_sha256",
          "dropinf_version", "torch_version", "device", "stage_seconds", "started_at"]
PROV = {"git_commit": "abc123", "git_dirty": "false", "config_sha256": "f00", "dropinf_version": "0.1.0",
        "torch_version": "2.0", "device": "cpu (x86_64, 2 cores)", "stage_seconds": "1.0", "started_at": "t"}

# (method, r, seed) -> (extract_seconds or None, score_seconds)
TIMES = {
    ("orig", None, None): (4.0, 3.0),
    ("lissa", None, None): (4.0, 20.0),
    ("gaussian", 16, 0): (2.5, 0.50), ("gaussian", 16, 1): (2.0, 0.02), ("gaussian", 16, 2): (2.25, 0.03),
    ("gaussian", 4, 0): (None, 0.40), ("gaussian", 4, 1): (None, 0.01), ("gaussian", 4, 2): (None, 0.02),
    ("dropout", 8, 0): (None, 0.30), ("dropout", 8, 1): (None, 0.05),
    ("random", None, 0): (None, 0.001), ("random", None, 1): (None, 0.003),
}


def write_summary(path: Path, experiment: str = "exp-a", times=TIMES, drop: str | None = None, **prov) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for (m, r, seed), (ext, score) in times.items():
        key = {"experiment": experiment, "method": m, "r": "" if r is None else r, "seed": "" if seed is None else seed}
        rows.append({**key, "metric": "mislabel_auc", "value": 0.7})
        if ext is not None:
            rows.append({**key, "metric": "extract_seconds", "value": ext})
        rows.append({**key, "metric": "score_seconds", "value": score})
    with open(path, "w", newline="") as f:
        cols = [c for c in HEADER if c != drop]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({**PROV, **prov, **row})
    return path


def read_rows(path: Path) -> dict:
    with open(path, newline="") as f:
        return {(r["experiment"], r["method"], r["r"]): r for r in csv.DictReader(f)}


def expected(metric: int, method: str, r) -> list[float]:
    return [v[metric] for (m, rr, _), v in TIMES.items() if m == method and rr == r and v[metric] is not None]


def test_means_stds_counts_and_order(tmp_path):
    summary = write_summary(tmp_path / "exp-a" / "summary.csv")
    out = timing_tables(summaries=[summary], out_dir=tmp_path / "out")
    assert out["experiments"] == ["exp-a"] and out["rows"] == 6
    rows = read_rows(tmp_path / "out" / "timing.csv")
    for method, r in [("gaussian", 16), ("gaussian", 4), ("dropout", 8), ("random", None), ("orig", None)]:
        row = rows[("exp-a", method, "" if r is None else str(r))]
        for i, metric in enumerate(("extract_seconds", "score_seconds")):
            vals = expected(i, method, r)
            assert int(row[f"{metric}_count"]) == len(vals)
            if vals:
                assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.mean(vals))
            if len(vals) > 1:
                assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(vals))
            else:
                assert row[f"{metric}_std"] == ""
        assert row["git_commits"] == "abc123" and row["device"] == "cpu (x86_64, 2 cores)"
        assert row["n_train"] == ""  # nothing beside this summary tells it
    # canonical method order (METHODS), then r ascending
    assert [(m, r) for _, m, r in rows] == [("orig", ""), ("lissa", ""), ("dropout", "8"), ("gaussian", "4"),
                                            ("gaussian", "16"), ("random", "")]
    notes = {k[1:]: (v["extract_seconds_note"], v["score_seconds_note"]) for k, v in rows.items()}
    assert notes[("gaussian", "4")][0] == "served by slicing a larger r: no own pass"
    assert "no own gradient pass timed at any r" in notes[("dropout", "8")][0]
    assert notes[("random", "")][0] == "needs no gradients: no extraction"
    assert notes[("gaussian", "16")] == ("", "")

    md = (tmp_path / "out" / "TABLE.md").read_text()
    g16 = expected(0, "gaussian", 16), expected(1, "gaussian", 16)
    cell = " | ".join(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" for v in g16)
    assert f"| gaussian | 16 | {cell} | 3 | cpu (x86_64, 2 cores) |" in md
    assert "| orig | full | 4.000 | 3.000 | 1 |" in md
    # footnotes numbered in table order: dropout comes before gaussian in METHODS
    assert "| dropout | 8 | —¹ |" in md and "| gaussian | 4 | —² |" in md and "| random |  | —³ |" in md
    assert "- ² served by slicing a larger r: no own pass" in md and "- ³ needs no gradients" in md
    assert "Provenance: git abc123; device cpu (x86_64, 2 cores); torch 2.0" in md


def test_skipped_method_and_n_train_from_workflow_files(tmp_path):
    base = tmp_path / "exp-a"
    summary = write_summary(base / "summary.csv", git_dirty="true")
    (base / "scores" / "tracin" / "full").mkdir(parents=True)
    (base / "scores" / "tracin" / "full" / "manifest.json").write_text(
        json.dumps({"status": "skipped", "reason": "identity over budget"}))
    (base / "grads" / "gaussian" / "r16").mkdir(parents=True)
    (base / "grads" / "gaussian" / "r16" / "manifest.json").write_text(json.dumps({"n": {"train": 123, "test": 7}}))
    timing_tables(summaries=[summary], out_dir=tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "timing.csv")
    tr = rows[("exp-a", "tracin", "")]
    assert tr["score_seconds_count"] == "0" and tr["score_seconds_note"] == "method skipped by the workflow: identity over budget"
    assert {r["n_train"] for r in rows.values()} == {"123"}
    md = (tmp_path / "out" / "TABLE.md").read_text()
    assert "| tracin | full | —¹ | —¹ | 0 |  |" in md and "(working tree dirty)" in md


def test_two_experiments_and_cli(tmp_path):
    a = write_summary(tmp_path / "a" / "summary.csv", "exp-a")
    b = write_summary(tmp_path / "b" / "summary.csv", "exp-b", device="NVIDIA H100")
    assert main(["timing", "--out", str(tmp_path / "out"), str(a), str(b)]) == 0
    rows = read_rows(tmp_path / "out" / "timing.csv")
    assert rows[("exp-b", "orig", "")]["device"] == "NVIDIA H100"
    md = (tmp_path / "out" / "TABLE.md").read_text()
    assert md.index("## exp-a") < md.index("## exp-b")
    assert main(["timing", "--out", str(tmp_path / "out2"), str(a), str(a)]) == 2  # same experiment twice
    assert not (tmp_path / "out2").exists()


def test_missing_column_is_one_clear_error(tmp_path):
    bad = write_summary(tmp_path / "x" / "summary.csv", drop="value")
    with pytest.raises(DropinfError, match=r"x/summary.csv: missing column\(s\) \['value'\]"):
        timing_tables(summaries=[bad], out_dir=tmp_path / "out")


@pytest.mark.parametrize("problem, match", [
    ("missing", "no such summary file"),
    ("empty", "empty file"),
    ("header", "header only"),
    ("garbled", "finite non-negative value at lines"),
    ("bad_r", "not a readable summary CSV"),
])
def test_bad_input_writes_nothing(tmp_path, problem, match):
    good = write_summary(tmp_path / "good" / "summary.csv")
    bad = tmp_path / "bad" / "summary.csv"
    bad.parent.mkdir()
    text = good.read_text()
    if problem == "empty":
        bad.write_text("")
    elif problem == "header":
        bad.write_text(text.splitlines()[0] + "\n")
    elif problem == "garbled":
        bad.write_text(text.replace("score_seconds,0.5,", "score_seconds,fast,"))
    elif problem == "bad_r":
        bad.write_text(text.replace("gaussian,16,", "gaussian,sixteen,"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "TABLE.md").write_text("earlier table\n")
    with pytest.raises(DropinfError, match=match) as err:
        timing_tables(summaries=[good, bad], out_dir=out)
    assert str(bad) in str(err.value)
    assert [p.name for p in out.iterdir()] == ["TABLE.md"] and (out / "TABLE.md").read_text() == "earlier table\n"


def test_garbled_workflow_file_beside_summary_is_named(tmp_path):
    summary = write_summary(tmp_path / "exp-a" / "summary.csv")
    (summary.parent / "scores" / "orig" / "full").mkdir(parents=True)
    (summary.parent / "scores" / "orig" / "full" / "manifest.json").write_text("{not json")
    with pytest.raises(DropinfError, match=r"orig/full/manifest.json: unreadable JSON"):
        timing_tables(summaries=[summary], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_committed_reference_summaries(tmp_path):
    summaries = sorted((REPO / "results" / "reference").glob("*/summary.csv"))
    assert summaries, "no committed results/reference/*/summary.csv"
    out = timing_tables(summaries=summaries, out_dir=tmp_path)
    rows = read_rows(tmp_path / "timing.csv")
    direct: dict = {}
    for path in summaries:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["metric"] in ("extract_seconds", "score_seconds"):
                    direct.setdefault((r["experiment"], r["method"], r["r"], r["metric"]), []).append(float(r["value"]))
    assert {k[:3] for k in direct} <= set(rows)
    for key in [("mislabel-amazon-minilm-lora8", "lissa", ""), ("mislabel-amazon-minilm-lora8", "gaussian", "16"),
                ("retrain-fashion-mnist-resnet9", "gaussian", "64"), ("mislabel-amazon-minilm-lora2", "random", "")]:
        for metric in ("extract_seconds", "score_seconds"):
            vals = direct.get((*key, metric), [])
            assert int(rows[key][f"{metric}_count"]) == len(vals)
            if vals:
                assert float(rows[key][f"{metric}_mean"]) == pytest.approx(statistics.mean(vals), rel=1e-12)
            if len(vals) > 1:
                assert float(rows[key][f"{metric}_std"]) == pytest.approx(statistics.stdev(vals), rel=1e-9)
    assert out["rows"] == len({k[:3] for k in direct})
    md = (tmp_path / "TABLE.md").read_text()
    assert md.count("\n## ") == len(summaries)


def test_n_train_recorded_by_finetune_wins_over_workflow_files(tmp_path):
    base = tmp_path / "exp-a"
    summary = write_summary(base / "summary.csv")
    with open(summary, "a", newline="") as f:  # the row `summarize` makes of finetune.json's n_train
        csv.DictWriter(f, fieldnames=HEADER, extrasaction="ignore").writerow(
            {**PROV, "experiment": "exp-a", "method": "finetune", "r": "", "seed": 0, "metric": "n_train",
             "value": 2000})
    (base / "grads" / "gaussian" / "r16").mkdir(parents=True)
    (base / "grads" / "gaussian" / "r16" / "manifest.json").write_text(json.dumps({"n": {"train": 123}}))
    timing_tables(summaries=[summary], out_dir=tmp_path / "out")
    assert {r["n_train"] for r in read_rows(tmp_path / "out" / "timing.csv").values()} == {"2000"}
