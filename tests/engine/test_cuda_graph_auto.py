"""cuda_graph="auto" on the CPU: the per-shape choice between eager steps and graph replays, with an
injected clock and a stand-in for capture/replay (the real ones need a GPU: test_extraction.py
under DROPINF_TEST_DEVICE=cuda). The stand-in replays by running the eager step, so rows must
equal an eager run's; the clock advances by a cost per (batch size, way)."""
from __future__ import annotations

import warnings

import pytest
import torch

import dropinf
from dropinf.errors import InvalidValueError
from dropinf.extraction import GRAPH_TRIALS, GRAPH_WARMUP, Extractor, GraphReplayError, _Graph, graph_mode

from .models import TextNet, randomize, text_batches, text_loss


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def model_and_data(seed=0, sizes=(4, 2), n_each=12):
    torch.manual_seed(seed)
    model = randomize(TextNet(), seed).double()
    batches = []
    for i in range(n_each):  # two batch shapes, interleaved
        for b in sizes:
            batches += text_batches(n=b, batch_size=b, seed=100 * seed + 10 * i + b)
    return model, batches


def faked(ex, costs, capture_cost=0.5, wrong_replay=False):
    """Install the clock and the capture/replay stand-ins; `costs[(B, way)]`: seconds per step."""
    clock = FakeClock()
    step = ex._step
    log = {"captures": 0, "replays": 0}

    def eager(batch, out_dtype, comp=None):
        clock.t += costs[(batch["ids"].shape[0], "eager")]
        return step(batch, out_dtype, comp)

    def capture(batch, out_dtype, comp):
        clock.t += capture_cost
        log["captures"] += 1
        return _Graph(None, None, None, batch["ids"].shape[0], comp)

    def replay(entry, batch):
        clock.t += costs[(batch["ids"].shape[0], "graph")]
        log["replays"] += 1
        out = ex._fused(batch, torch.float64, entry.comp)[0]
        return out + 1.0 if wrong_replay else out

    ex._clock, ex._step, ex._capture, ex._replay = clock, eager, capture, replay
    ex._graph_capable = lambda: True
    return log


def shapes_by_batch(report):
    return {int(s["shape"].split("ids ")[1].split("x")[0]): s for s in report["shapes"]}


def test_auto_keeps_the_faster_way_per_shape():
    model, batches = model_and_data()
    eager_rows = dropinf.extract(model, text_loss, batches, "dropout", r=9, seed=2, cuda_graph=False)
    ex = Extractor(model, text_loss, "dropout", r=9, seed=2)  # "auto" is the default
    assert ex.cuda_graph == "auto"
    costs = {(4, "eager"): 0.010, (4, "graph"): 0.004, (2, "eager"): 0.006, (2, "graph"): 0.009}
    log = faked(ex, costs)
    got = ex.run(batches)
    assert torch.allclose(got, eager_rows, rtol=0, atol=1e-12)  # rows unchanged, in order
    rep = ex.timings["cuda_graph"]
    assert rep["mode"] == "auto" and rep["used"] is True
    by = shapes_by_batch(rep)
    fast, slow = by[4], by[2]
    assert fast["decision"] == "graph" and "replay" in fast["reason"]
    assert slow["decision"] == "eager" and ">=" in slow["reason"]
    assert fast["eager_ms"] == pytest.approx(10.0) and fast["graph_ms"] == pytest.approx(4.0)
    assert slow["eager_ms"] == pytest.approx(6.0) and slow["graph_ms"] == pytest.approx(9.0)
    assert fast["capture_seconds"] == pytest.approx(0.5) and fast["captures"] == 1 == slow["captures"]
    # batch 0 (B=4) is self-checked; then per shape W+T eager steps, 1 checked + T timed replays
    trial = GRAPH_WARMUP + GRAPH_TRIALS
    assert fast["batches_eager"] == trial and fast["batches_graph"] == 11 - trial
    assert slow["batches_eager"] == 12 - (1 + GRAPH_TRIALS) and slow["batches_graph"] == 1 + GRAPH_TRIALS
    assert log["captures"] == 2 and log["replays"] == fast["batches_graph"] + slow["batches_graph"]
    assert len(ex._graphs) == 1  # the slower shape's graph is dropped


def test_a_shape_seen_too_rarely_stays_eager():
    model, batches = model_and_data(sizes=(4,), n_each=GRAPH_WARMUP + GRAPH_TRIALS)  # + the checked batch: 1 short
    ex = Extractor(model, text_loss, "identity")
    log = faked(ex, {(4, "eager"): 0.01, (4, "graph"): 0.001})
    ex.run(batches)
    (s,) = ex.timings["cuda_graph"]["shapes"]
    assert s["decision"] == "undecided" and s["batches_graph"] == 0 and log["captures"] == 0
    assert ex.timings["cuda_graph"]["used"] is False


def test_decisions_and_graphs_carry_over_to_the_next_compressor():
    """`use(compressor)` (the next seed): the shape's decision is kept (no new timing), a graph is
    captured for the new compressor, and with room for one graph the old compressor's goes."""
    model, batches = model_and_data(sizes=(4,), n_each=10)
    c1 = dropinf.compressor("dropout", dim=sum(p.numel() for p in model.parameters()), r=7, seed=1)
    c2 = dropinf.compressor("dropout", dim=c1.dim, r=7, seed=2)
    ex = Extractor(model, text_loss, c1)
    ex._MAX_GRAPHS = 1
    log = faked(ex, {(4, "eager"): 0.01, (4, "graph"): 0.002})
    ex.run(batches)
    assert log["captures"] == 1
    got = ex.use(c2).run(batches)
    want = dropinf.extract(model, text_loss, batches, c2, cuda_graph=False)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    (s,) = ex.timings["cuda_graph"]["shapes"]  # one shape, one compressor kind (dropout r=7)
    assert s["decision"] == "graph" and s["captures"] == 2 and log["captures"] == 2
    assert s["batches_eager"] == GRAPH_WARMUP + GRAPH_TRIALS  # timed once, for the first seed only
    assert s["batches_graph"] == (10 - 1 - GRAPH_WARMUP - GRAPH_TRIALS) + (10 - 1)  # seed 2: all but its checked batch
    assert [g.comp for g in ex._graphs.values()] == [c2]


def test_a_replay_that_differs_from_eager_falls_back_under_auto_and_raises_under_true():
    model, batches = model_and_data(sizes=(4,), n_each=8)
    want = dropinf.extract(model, text_loss, batches, "identity", cuda_graph=False)
    ex = Extractor(model, text_loss, "identity")
    faked(ex, {(4, "eager"): 0.01, (4, "graph"): 0.001}, wrong_replay=True)
    with pytest.warns(UserWarning, match="eagerly"):
        got = ex.run(batches)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    (s,) = ex.timings["cuda_graph"]["shapes"]
    assert s["decision"] == "eager" and "GraphReplayError" in s["reason"] and not ex._graphs
    forced = Extractor(model, text_loss, "identity", cuda_graph=True)
    faked(forced, {(4, "eager"): 0.01, (4, "graph"): 0.001}, wrong_replay=True)
    with pytest.raises(GraphReplayError, match="differs from the eager step"):
        forced.run(batches)


def test_cuda_graph_true_replays_every_unchecked_batch():
    model, batches = model_and_data(sizes=(4, 2), n_each=3)
    ex = Extractor(model, text_loss, "dropout", r=5, cuda_graph="true")
    log = faked(ex, {(4, "eager"): 0.01, (4, "graph"): 0.02, (2, "eager"): 0.01, (2, "graph"): 0.02})
    ex.run(batches)
    assert log["replays"] == len(batches) - 1 and log["captures"] == 2
    assert all(s["decision"] == "graph" for s in ex.timings["cuda_graph"]["shapes"])
    assert ex.timings["cuda_graph"]["mode"] == "true"


def test_on_the_cpu_auto_is_eager_and_says_so():
    model, batches = model_and_data(sizes=(4,), n_each=6)
    ex = Extractor(model, text_loss, "dropout", r=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex.run(batches)
    rep = ex.timings["cuda_graph"]
    assert rep == {"mode": "auto", "device_type": "cpu", "bucket": 0, "used": False, "shapes": []}


def test_a_compressor_not_marked_graph_safe_stays_eager_under_auto():
    model, batches = model_and_data(sizes=(4,), n_each=8)
    ex = Extractor(model, text_loss, "gaussian", r=12)  # draws its projection per batch
    log = faked(ex, {(4, "eager"): 0.01, (4, "graph"): 0.001})
    ex.run(batches)
    (s,) = ex.timings["cuda_graph"]["shapes"]
    assert s["decision"] == "eager" and "graph_safe" in s["reason"] and log["captures"] == 0


@pytest.mark.parametrize("bad", ["yes", 1, None, "on"])
def test_cuda_graph_values_are_checked(bad):
    model, _ = model_and_data(sizes=(2,), n_each=1)
    with pytest.raises(InvalidValueError, match="cuda_graph must be 'auto', True or False"):
        Extractor(model, text_loss, "identity", cuda_graph=bad)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_bucket_values_are_checked(bad):
    model, _ = model_and_data(sizes=(2,), n_each=1)
    with pytest.raises(InvalidValueError, match="bucket must be 0"):
        Extractor(model, text_loss, "identity", bucket=bad)


def test_graph_mode_reads_command_line_spellings():
    assert [graph_mode(v) for v in ("auto", "true", "False", True, False)] == ["auto", True, False, True, False]


def test_auto_keeps_large_rows_eager():
    """Raw gradients of a large model: a graph would hold a batch's rows besides each replay's copy."""
    model, batches = model_and_data(sizes=(4,), n_each=8)
    ex = Extractor(model, text_loss, "identity")
    ex._GRAPH_ROWS_BYTES = 4 * ex.compressor.out_dim * 8 - 1  # just below one batch of float64 rows
    log = faked(ex, {(4, "eager"): 0.01, (4, "graph"): 0.001})
    ex.run(batches)
    (s,) = ex.timings["cuda_graph"]["shapes"]
    assert s["decision"] == "eager" and "held twice" in s["reason"] and log["captures"] == 0
