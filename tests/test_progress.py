"""Progress bars (dropinf.progress): whole lines at a bounded rate in a log, silent when turned off,
and the loops they count compute exactly what they compute without them."""
from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

import dropinf
from dropinf import progress
from dropinf.progress import ENV, LogBar, bar

LINE = re.compile(r"^\d\d:\d\d:\d\d PROGRESS (?P<desc>.+?): +(?P<pct>\d+)% (?P<n>\d+)/(?P<total>\d+) ")


class Log(io.StringIO):
    """A job's log file: not a terminal."""

    def isatty(self):
        return False


def lines(text: str) -> list[str]:
    assert "\r" not in text  # no carriage-return redrawing in a log
    return [line for line in text.splitlines() if line]


@pytest.fixture
def on(monkeypatch):
    """Bars on (whatever the environment of the test run) and shown from the first iteration."""
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(progress, "DELAY", 0.0)


def test_a_long_loop_writes_the_quarter_lines_only(on):
    log = Log()
    with LogBar(total=100_000, desc="long loop", file=log, delay=0.0, interval=3600.0, mininterval=0.0,
                miniters=1) as b:
        for _ in range(100_000):
            b.update()  # tqdm asks to redraw on every step; the bar writes 5 lines
    got = lines(log.getvalue())
    assert [int(LINE.match(line)["pct"]) for line in got] == [0, 25, 50, 75, 100]
    assert all(LINE.match(line)["desc"] == "long loop" for line in got)


def test_time_lines_are_bounded_by_the_interval(on):
    log = Log()
    t0 = time.monotonic()
    for _ in bar(range(400), desc="slow loop", file=log, interval=0.05):
        time.sleep(0.001)
    seconds = time.monotonic() - t0
    got = lines(log.getvalue())
    assert 3 <= len(got) <= 5 + seconds / 0.05 + 1
    assert LINE.match(got[-1])["pct"] == "100" and LINE.match(got[-1])["n"] == "400"


def test_a_short_loop_stays_silent(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    log = Log()
    for _ in bar(range(1000), desc="quick", file=log):  # the default delay: under DELAY seconds, nothing
        pass
    assert log.getvalue() == ""


def test_off_by_flag_and_environment(monkeypatch, on):
    log = Log()
    for _ in bar(range(10), file=log, progress=False):
        pass
    monkeypatch.setenv(ENV, "0")
    for _ in bar(range(10), file=log):
        pass
    assert log.getvalue() == ""
    for _ in bar(range(10), file=log, progress=True):  # an explicit True wins over the environment
        pass
    assert len(lines(log.getvalue())) == 2


def test_cli_flag_turns_bars_off(monkeypatch, tmp_path):
    from dropinf.__main__ import main

    monkeypatch.setenv(ENV, "1")
    main(["--no-progress", "verify", str(tmp_path)])
    assert not progress.enabled()


def _mlp_data(n=300, seed=0):
    from dropinf.pipeline.train import Batches

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none")

    return model, loss, Batches({"x": x, "y": y}, 16)


def test_extract_and_influence_show_bars_and_give_the_same_results(on, capsys):
    model, loss, loader = _mlp_data()
    shown = dropinf.extract(model, loss, loader, "dropout", r=20, seed=1, progress=True)
    err = capsys.readouterr().err
    ext = [line for line in lines(err) if "PROGRESS extract dropout" in line]
    assert 2 <= len(ext) <= 5 and LINE.match(ext[-1])["n"] == LINE.match(ext[-1])["total"] == "300"
    silent = dropinf.extract(model, loss, loader, "dropout", r=20, seed=1, progress=False)
    assert capsys.readouterr().err == ""
    assert torch.equal(shown, silent)

    test = silent[:40]
    a = dropinf.influence(silent, test, "lissa", blocks="global", chunk_rows=64, lissa_iters=3)
    err = capsys.readouterr().err
    passes = {LINE.match(line)["desc"] for line in lines(err) if "influence lissa pass" in line}
    # 'paper' damping, 5 power iterations, 3 iterations, the scores: one bar per pass over train
    assert passes == {f"influence lissa pass {k}" for k in range(1, 11)}
    b = dropinf.influence(silent, test, "lissa", blocks="global", chunk_rows=64, lissa_iters=3, progress=False)
    assert capsys.readouterr().err == ""
    assert torch.equal(a, b)


def test_training_counts_its_steps_and_trains_the_same(on, capsys):
    from dropinf.models import ModelSpec
    from dropinf.pipeline.train import fit

    histories, weights = [], []
    for env in ("1", "0"):
        model, loss, loader = _mlp_data(seed=3)
        spec = ModelSpec(module=model, loss_fn=loss)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV, env)
            histories.append(fit(spec, loader.split, epochs=4, batch_size=32, lr=1e-2, seed=0))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        err = capsys.readouterr().err
        train = [line for line in lines(err) if "PROGRESS train" in line]
        if env == "1":
            assert 2 <= len(train) <= 5 and "epoch 4/4, train loss" in train[-1]
            assert LINE.match(train[-1])["n"] == str(4 * 10)  # 300 rows in batches of 32: 10 steps per epoch
        else:
            assert train == []
    assert histories[0] == histories[1] and torch.equal(weights[0], weights[1])


def test_workflow_setting_defaults_on():
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow" / "schemas"
                             / "config.schema.yaml").read_text())
    assert schema["properties"]["progress"] == {**schema["properties"]["progress"], "type": "boolean",
                                                "default": True}


def test_lissa_on_recomputed_gradients_shows_one_bar_per_pass(on, capsys, tmp_path, train_digits_mlp):
    """The score stage on raw gradients recomputed from the model: every solver pass has its bar
    (the one-batch slices it reads have none of their own), the test gradients' mean one; and the
    scores equal those computed silently."""
    import numpy as np
    import zarr

    from dropinf.pipeline.score import score

    d = train_digits_mlp(tmp_path)
    capsys.readouterr()  # the fine-tuning's own bar
    runs = {}
    for env in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV, env)
            out = tmp_path / f"scores{env}"
            score(data=d / "data.pt", out_dir=out, method="lissa", device="cpu", threads=1, model=str(d / "model.pt"),
                  gradients="recompute", recompute_batch_size=64, options={"lissa_iters": 2})
        runs[env] = np.asarray(zarr.open_array(str(out / "scores.zarr"), mode="r")[...])
        got = [line for line in lines(capsys.readouterr().err) if " PROGRESS " in line]
        if env == "0":
            assert got == []
            continue
        descs = [LINE.match(line)["desc"] for line in got]
        # 'paper' damping, 5 power iterations, 2 iterations, the scores: 9 passes over 300 rows
        assert sorted(set(descs)) == sorted({f"influence lissa pass {k}" for k in range(1, 10)}
                                            | {"recompute gradients (mean row)"})
        for desc in set(descs):
            assert 2 <= descs.count(desc) <= 5, desc
        assert all(LINE.match(line)["total"] == "300" for line in got if "lissa" in line)
    assert np.array_equal(runs["1"], runs["0"])


def test_retraining_and_lds_subset_models_count_their_models(on, capsys, tmp_path, train_digits_mlp):
    """`evaluate`'s retraining runs and `lds train`'s subset models each have a bar over the models
    (besides every model's own training bar); the rows are those of a silent run."""
    import numpy as np

    from dropinf.pipeline.evaluate import evaluate
    from dropinf.pipeline.lds import load_npz, train_part
    from dropinf.pipeline.score import score

    d = train_digits_mlp(tmp_path, epochs=2)
    score(data=d / "data.pt", out_dir=d / "scores", method="random", seeds=(0, 1), device="cpu", threads=1)
    capsys.readouterr()
    runs = {}
    for env in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV, env)
            rows = evaluate(data=d / "data.pt", model=d / "model.pt", scores=d / "scores" / "manifest.json",
                            out=d / f"m{env}.csv", method="random", fractions=[0.1, 0.2], device="cpu", threads=1)
            train_part(data=d / "data.pt", out=d / f"lds{env}.npz", model="mlp", model_options={"hidden": [16]},
                       settings={"epochs": 2}, n_models=3,
                       device="cpu", threads=1)
        got = lines(capsys.readouterr().err)
        retrain = [line for line in got if "PROGRESS retrain without the most helpful examples (random)" in line]
        subsets = [line for line in got if "PROGRESS lds subset models (part 0 of 1)" in line]
        if env == "1":
            assert 2 <= len(retrain) <= 5 and LINE.match(retrain[-1])["n"] == LINE.match(retrain[-1])["total"] == "4"
            assert 2 <= len(subsets) <= 5 and LINE.match(subsets[-1])["n"] == "3"
            assert sum("PROGRESS train" in line for line in got) >= 2 * (4 + 3)  # every model's training
        else:
            assert not any(" PROGRESS " in line for line in got)
        runs[env] = ([(r["metric"], r["seed"], r["value"]) for r in rows], load_npz(d / f"lds{env}.npz")[1])
    assert runs["1"][0] == runs["0"][0]
    assert np.array_equal(runs["1"][1]["test_loss"], runs["0"][1]["test_loss"])
