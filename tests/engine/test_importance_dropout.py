"""Importance-sampled dropout and the second-moment probe, against slow obvious references (float64)."""
import math
import warnings

import pytest
import torch

import dropinf
from dropinf.compressors import importance
from dropinf.compressors.importance import ImportanceDropout, OptionError, exponential_keys
from dropinf.layout import Layout
from dropinf.probe import ProbeSizeError, probe_rows, second_moments

from .models import (ConvNet, TextNet, TiedLM, conv_batches, conv_loss, lm_batches, lm_loss, randomize,
                     reference_grads, text_batches, text_loss)

LAYOUT = Layout.from_shapes([("w", (9, 7)), ("b", (9,)), ("dead", (4, 3)), ("v", (11,))])


def _weights(seed=0, dead=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(LAYOUT.dim, generator=g, dtype=torch.float64) ** 3
    w[torch.rand(LAYOUT.dim, generator=g) < 0.1] = 0.0  # scattered zeros
    if dead:
        s = LAYOUT["dead"]
        w[s.offset:s.stop] = 0.0  # a whole block without signal
    return w


def _comp(r, seed=0, w=None, **kw):
    return dropinf.compressor("importance_dropout", LAYOUT.dim, r, seed=seed, layout=LAYOUT,
                              weights=_weights() if w is None else w, **kw)


@pytest.mark.parametrize("weighting", ["global", "block"])
@pytest.mark.parametrize("rescale", [False, True])
def test_reproducible_nested_in_r_and_seeded(weighting, rescale):
    kw = dict(weighting=weighting, rescale=rescale)
    full = _comp(LAYOUT.dim, seed=4, **kw)
    assert sorted(full.indices.tolist()) == list(range(LAYOUT.dim))  # r = d keeps every coordinate once
    G = torch.randn(6, LAYOUT.dim, dtype=torch.float64)
    for r in (1, 5, 30, 80, LAYOUT.dim - 1):
        c = _comp(r, seed=4, **kw)
        assert torch.equal(c.indices, full.indices[:r]) and c.indices.dtype == torch.long
        assert torch.equal(c.indices, _comp(r, seed=4, **kw).indices)
        torch.testing.assert_close(full.nest(full.compress(G), r), c.compress(G), rtol=1e-12, atol=1e-12)
    assert not torch.equal(_comp(30, seed=5, **kw).indices, _comp(30, seed=4, **kw).indices)
    want = G[:, full.indices]
    if rescale:
        want = want * full.scale
    torch.testing.assert_close(full.compress(G), want, rtol=1e-12, atol=1e-12)


def test_keys_are_chunked_exactly_like_the_direct_sort(monkeypatch):
    """Chunked top-r merging (tiny chunks: many merges) == sorting all keys E_j / w_j at once."""
    monkeypatch.setattr(importance, "KEY_CHUNK", 16)
    w = _weights(3)
    E = torch.cat([exponential_keys(11, c * 16, (c + 1) * 16, c) for c in range(math.ceil(LAYOUT.dim / 16))])
    E = E[:LAYOUT.dim]
    pos = torch.nonzero(w > 0).flatten()
    zero = torch.nonzero(w == 0).flatten()
    want = torch.cat([pos[torch.argsort(E[pos] / w[pos])], zero[torch.argsort(E[zero])]])
    got = _comp(LAYOUT.dim, seed=11, w=w, weighting="global").indices
    assert torch.equal(got, want)


def test_zero_weights_never_before_positive_ones():
    w = _weights()
    n_pos = int((w > 0).sum())
    for weighting in ("global", "block"):
        c = _comp(LAYOUT.dim, seed=2, weighting=weighting)
        assert (w[c.indices[:n_pos]] > 0).all() and (w[c.indices[n_pos:]] == 0).all(), weighting
        dead = LAYOUT["dead"]
        k = _comp(n_pos, seed=2, weighting=weighting).indices
        assert not ((k >= dead.offset) & (k < dead.stop)).any(), weighting  # the all-zero block gets no share
    with pytest.warns(UserWarning, match="every weight is 0"):
        c = _comp(20, w=torch.zeros(LAYOUT.dim, dtype=torch.float64), rescale=True)
    assert c.indices.unique().numel() == 20 and torch.allclose(c.scale, torch.full((20,), math.sqrt(LAYOUT.dim / 20),
                                                                                    dtype=torch.float64))


def test_global_first_pick_follows_the_weights(monkeypatch):
    """Efraimidis-Spirakis: the first kept coordinate is j with probability w_j / sum w."""
    monkeypatch.setattr(importance, "KEY_CHUNK", 8)
    lay = Layout.from_shapes([("x", (6,))])
    w = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    counts = torch.zeros(6)
    trials = 3000
    for s in range(trials):
        counts[dropinf.compressor("importance_dropout", 6, 1, seed=s, layout=lay, weights=w,
                                  weighting="global").indices] += 1
    p = w / w.sum()
    assert counts[4] == 0
    assert ((counts / trials - p).abs() <= 4 * torch.sqrt(p * (1 - p) / trials) + 1e-9).all()


def test_block_weighting_apportions_r_by_width():
    w = _weights(dead=False)
    w[w == 0] = 0.1  # no zeros: the allocation is by width alone
    for r in (10, 33, 70):
        c = _comp(r, w=w, weighting="block")
        for s in LAYOUT.slots:
            got = int(((c.indices >= s.offset) & (c.indices < s.stop)).sum())
            assert abs(got - r * s.numel / LAYOUT.dim) <= 1, (r, s.name)


def test_rescale_estimates_the_squared_norm():
    """E over seeds of sum_kept (g_j * scale_j)^2 ~ ||g||^2 (with-replacement approximation, small r)."""
    g = torch.randn(LAYOUT.dim, dtype=torch.float64)
    w = g.square() + 0.3
    for weighting in ("global", "block"):
        est = [(_comp(4, seed=s, w=w, weighting=weighting, rescale=True).compress(g[None])).square().sum().item()
               for s in range(400)]
        assert sum(est) / len(est) == pytest.approx(g.square().sum().item(), rel=0.1), weighting


@pytest.mark.parametrize("blocks", ["global", "per-tensor"])
def test_r_equal_d_gives_orig_scores(blocks):
    g = torch.Generator().manual_seed(1)
    train = torch.randn(40, LAYOUT.dim, generator=g, dtype=torch.float64)
    train[:, LAYOUT["dead"].offset:LAYOUT["dead"].stop] *= 1e-3  # small but not zero: paper damping stays > 0
    test = torch.randn(7, LAYOUT.dim, generator=g, dtype=torch.float64)
    for weighting in ("global", "block"):
        c = _comp(LAYOUT.dim, seed=3, w=train[:16].square().mean(0), weighting=weighting)
        if blocks == "global":
            want = dropinf.influence(train, test, "orig")
            got = dropinf.influence(c.compress(train), c.compress(test), "exact")
        else:
            want = dropinf.influence(train, test, "orig", blocks=LAYOUT.blocks)
            where = LAYOUT.locate(c.indices)
            groups = [torch.nonzero(where == b).flatten() for b in range(len(LAYOUT))]
            got = dropinf.influence(c.compress(train), c.compress(test), "exact", blocks=groups)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


CASES = {
    "text": (lambda: randomize(TextNet().double()), text_loss, lambda: text_batches(n=9, batch_size=4)),
    "conv": (lambda: randomize(ConvNet().double()), conv_loss, lambda: conv_batches(n=7, batch_size=3)),
    "tied": (lambda: TiedLM().double(), lm_loss, lambda: lm_batches(n=7, batch_size=3)),
}


def _double(batches):
    return [{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("case", sorted(CASES))
def test_probe_equals_per_example_autograd(case):
    """Fused square accumulation (sequence positions, conv taps, tied weights, torch.func fallback,
    one-position layers) == squares of per-example autograd gradients of exactly the probe's rows."""
    make, loss, data = CASES[case]
    torch.manual_seed(0)
    model, batches = make(), _double(data())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    G = reference_grads(model, loss, batches, names)
    n_total = G.shape[0]
    for n, seed in ((n_total, 0), (4, 1), (3, 7)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tied model's fallback warning
            w = second_moments(model, loss, batches, n, seed)
        rows = probe_rows(n_total, n, seed)
        assert w.dtype == torch.float64 and w.shape == (G.shape[1],)
        torch.testing.assert_close(w, G[rows].square().mean(0), rtol=1e-10, atol=1e-14)


def test_probe_rebatches_under_the_held_memory_cap(monkeypatch):
    """Tied weights hold a per-example gradient per batch; a tiny cap forces one-row probe batches."""
    from dropinf import probe

    make, loss, data = CASES["tied"]
    torch.manual_seed(3)
    model, batches = make(), _double(data())
    G = reference_grads(model, loss, batches, [n for n, _ in model.named_parameters()])
    sizes = []
    real = probe.SquareAccumulator.end_batch

    def spy(self, start, out):
        sizes.append(out.shape[0])
        real(self, start, out)
    monkeypatch.setattr(probe, "HELD_BYTES", 1)
    monkeypatch.setattr(probe.SquareAccumulator, "end_batch", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = second_moments(model, loss, batches, 5, 4)
    assert sizes == [1] * 5
    torch.testing.assert_close(w, G[probe_rows(7, 5, 4)].square().mean(0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", ["text", "conv"])
@pytest.mark.parametrize("rescale", [False, True])
def test_fused_path_equals_matrix_path(case, rescale):
    make, loss, data = CASES[case]
    torch.manual_seed(1)
    model, batches = make(), _double(data())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    G = reference_grads(model, loss, batches, names)
    opts = ImportanceDropout.prepare_options({"probe": 5, "probe_seed": 2, "rescale": rescale, "weighting": "block"},
                                             model=model, loss_fn=loss, train_loader=batches)
    layout = Layout.from_model(model)
    for seed in (0, 1):
        comp = dropinf.compressor("importance_dropout", layout.dim, 12, seed=seed, layout=layout, **opts)
        fused = dropinf.extract(model, loss, batches, comp)
        torch.testing.assert_close(fused, comp.compress(G), rtol=1e-10, atol=1e-12)
        by_name = dropinf.extract(model, loss, batches, "importance_dropout", r=12, seed=seed, **opts)
        torch.testing.assert_close(by_name, fused, rtol=0, atol=0)


def test_prepare_options_and_provenance():
    model, loss, data = CASES["text"]
    torch.manual_seed(2)
    model, batches = model(), _double(data())
    configured = {"probe": 6, "probe_seed": 3, "weighting": "global", "rescale": False}
    opts = ImportanceDropout.prepare_options(configured, model=model, loss_fn=loss, train_loader=batches)
    assert configured == {"probe": 6, "probe_seed": 3, "weighting": "global", "rescale": False}  # not mutated
    torch.testing.assert_close(opts["weights"], second_moments(model, loss, batches, 6, 3))
    layout = Layout.from_model(model)
    c = dropinf.compressor("importance_dropout", layout.dim, 10, seed=0, layout=layout, **opts)
    a = c.attrs()
    assert a["compressor"] == "importance_dropout" and a["indices"] == c.indices.tolist()
    assert (a["probe"], a["probe_seed"], a["weighting"], a["rescale"]) == (6, 3, "global", False)
    assert a["probe_seconds"] > 0
    s = a["weights_summary"]
    w = opts["weights"]
    assert s["sum"] == pytest.approx(w.sum().item()) and s["max"] == pytest.approx(w.max().item())
    assert s["effective_coordinates"] == pytest.approx((w.sum() ** 2 / w.square().sum()).item())
    assert set(s["block_mass"]) == {sl.name for sl in layout.slots}
    assert sum(s["block_mass"].values()) == pytest.approx(1.0)
    import json
    json.dumps(a)  # provenance is JSON


def test_bad_probe_and_options_are_refused():
    model, loss, data = CASES["text"]
    model, batches = model().double(), _double(data())
    with pytest.raises(ProbeSizeError, match=r"probe of 10 examples is larger than the training set \(9 examples\)"):
        ImportanceDropout.prepare_options({"probe": 10}, model=model, loss_fn=loss, train_loader=batches)
    assert issubclass(ProbeSizeError, ValueError) and issubclass(ProbeSizeError, dropinf.DropinfError)
    with pytest.raises(OptionError, match="unknown option"):
        ImportanceDropout.prepare_options({"sampling": "x"}, model=model, loss_fn=loss, train_loader=batches)
    with pytest.raises(OptionError, match="weighting must be one of global, block"):
        ImportanceDropout.prepare_options({"weighting": "layer"}, model=model, loss_fn=loss, train_loader=batches)
    with pytest.raises(dropinf.DropinfError, match="needs per-coordinate weights"):
        dropinf.compressor("importance_dropout", 10, 3)
    with pytest.raises(dropinf.errors.ShapeError, match=r"shape \(10,\)"):
        dropinf.compressor("importance_dropout", 10, 3, weights=torch.ones(9))
    with pytest.raises(OptionError, match="coordinate 2"):
        dropinf.compressor("importance_dropout", 10, 3, weights=torch.tensor([1.0, 1, -1, 1, 1, 1, 1, 1, 1, 1]))
    with pytest.raises(dropinf.DropinfError, match="r must"):
        dropinf.compressor("importance_dropout", 10, 11, weights=torch.ones(10))


def test_bench_probe_subcommand_cpu(tmp_path):
    import csv

    from dropinf import bench

    out = tmp_path / "probe.csv"
    bench.probe_timing(["--arch", "gpt2-tiny", "--batch", "4", "--probe", "6", "--examples", "12", "--r", "8",
                        "--out", str(out)])
    rows = {r["path"]: r for r in csv.DictReader(open(out))}
    assert float(rows["check_probe"]["rel_err_vs_autograd"]) < 1e-5
    assert rows["probe_second_moments"]["n_examples"] == "6" and rows["extract_dropout"]["n_examples"] == "12"
    assert all(float(rows[p]["seconds"]) > 0 for p in ("probe_second_moments", "importance_draw", "extract_dropout"))
    assert rows["extract_dropout"]["device"] and rows["extract_dropout"]["git_commit"]
