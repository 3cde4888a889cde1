"""Importance-sampled dropout and the second-moment probe, against slow obvious references (float64)."""
import math
import warnings

import pytest
import torch

import dropinf
from dropinf.compressors import importance
from dropinf.compressors.importance import ImportanceDropout, OptionError
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


# ---- keys: counter-based, device- and chunk-independent, Efraimidis-Spirakis law -------------------

def _philox_ref(ctr, key, rounds=10):
    """Philox4x32 on Python ints, straight from the published round function."""
    M, W, mask = (0xD2511F53, 0xCD9E8D57), (0x9E3779B9, 0xBB67AE85), 0xFFFFFFFF
    c, k = list(ctr), list(key)
    for i in range(rounds):
        if i:
            k = [(k[0] + W[0]) & mask, (k[1] + W[1]) & mask]
        p0, p1 = M[0] * c[0], M[1] * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
    return c


def _key_ref(seed, j):
    """E_j one coordinate at a time, in Python ints and math.log."""
    x = _philox_ref((j & 0xFFFFFFFF, j >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
    m = (x[0] << 20) | (x[1] >> 12)
    return -math.log((2 * m + 1) / 2.0 ** 53)


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (counter, key, output)."""
    kats = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
            ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
            ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
             (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kats:
        got = importance.philox4x32([torch.tensor([c]) for c in ctr], key)
        assert [int(t) for t in got] == list(want)
        assert _philox_ref(ctr, key) == list(want)


def test_keys_equal_the_per_coordinate_reference():
    """E_j (tensor ops, in chunks) == -log(u_j) computed one coordinate at a time in float64, and the
    draw == sorting the reference keys E_j / w_j (zero weights last, by E_j)."""
    for seed in (0, 11, 2**40 + 3, 2**63 - 1):
        js = list(range(300)) + [2**32 - 1, 2**32, 2**35 + 17]
        E = torch.cat([importance.exponential_keys(seed, j, j + 1) for j in js[300:]])
        E = torch.cat([importance.exponential_keys(seed, 0, 300), E])
        ref = torch.tensor([_key_ref(seed, j) for j in js], dtype=torch.float64)
        torch.testing.assert_close(E, ref, rtol=4e-16, atol=0)
    w = _weights(3)
    E = torch.tensor([_key_ref(11, j) for j in range(LAYOUT.dim)], dtype=torch.float64)
    pos = [j for j in range(LAYOUT.dim) if w[j] > 0]
    zero = [j for j in range(LAYOUT.dim) if w[j] == 0]
    want = sorted(pos, key=lambda j: E[j].item() / w[j].item()) + sorted(zero, key=lambda j: E[j].item())
    got = _comp(LAYOUT.dim, seed=11, w=w, weighting="global").indices
    assert got.tolist() == want


@pytest.mark.parametrize("weighting", ["global", "block"])
def test_keys_and_draw_do_not_depend_on_the_chunk_size(monkeypatch, weighting):
    E = importance.exponential_keys(5, 0, LAYOUT.dim)
    for lo, hi in ((0, 7), (7, 40), (40, LAYOUT.dim)):
        assert torch.equal(importance.exponential_keys(5, lo, hi), E[lo:hi])  # bitwise
    w = _weights(1)
    want = _comp(LAYOUT.dim, seed=5, w=w, weighting=weighting).indices
    for chunk in (1, 3, 16, 64, 1 << 20):
        monkeypatch.setattr(importance, "KEY_CHUNK", {"cpu": chunk})
        assert torch.equal(_comp(LAYOUT.dim, seed=5, w=w, weighting=weighting).indices, want), chunk
        assert torch.equal(importance.smallest_keys(w, 3, 90, 20, 5),
                           importance.smallest_keys(w, 3, 90, 20, 5, chunk=7))


def test_keys_are_standard_exponential():
    from scipy import stats

    E = importance.exponential_keys(2, 10**9, 10**9 + 200_000).numpy()
    assert stats.kstest(E, "expon").pvalue > 1e-3
    assert (E > 0).all() and abs(E.mean() - 1) < 5 / math.sqrt(E.size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keys_and_draw_identical_on_cuda():
    E = importance.exponential_keys(9, 0, 1 << 20)
    assert torch.equal(importance.exponential_keys(9, 0, 1 << 20, "cuda").cpu(), E)
    w = _weights(2)
    for weighting in ("global", "block"):
        cpu = _comp(60, seed=9, w=w, weighting=weighting, rescale=True)
        gpu = _comp(60, seed=9, w=w.cuda(), weighting=weighting, rescale=True)
        assert torch.equal(cpu.indices, gpu.indices)
        # the scale uses each block's mass, a float64 sum whose reduction order is the device's
        torch.testing.assert_close(cpu.scale, gpu.scale, rtol=1e-13, atol=0)
        assert gpu.indices.device.type == "cpu"


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


def test_inclusion_frequencies_follow_the_efraimidis_spirakis_law():
    """Over many seeds, the kept pair and its order follow sequential sampling without replacement:
    P(first = i) = w_i / W and P(i kept at r = 2) = sum over orders of w_i/W * w_j/(W - w_i). Each
    frequency is within z binomial standard deviations, z the Bonferroni bound for a family-wise
    false alarm of 1e-6 over all compared frequencies (fixed seeds: the test is deterministic)."""
    from scipy import stats

    lay = Layout.from_shapes([("x", (6,))])
    w = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    W, n = w.sum().item(), 6
    first = (w / W).tolist()
    pair = [sum(first[i] * w[j].item() / (W - w[i].item()) + first[j] * w[i].item() / (W - w[j].item())
                for j in range(n) if j != i) for i in range(n)]
    trials = 4000
    got_first, got_pair = torch.zeros(n), torch.zeros(n)
    for s in range(trials):
        idx = dropinf.compressor("importance_dropout", n, 2, seed=s, layout=lay, weights=w).indices
        got_first[idx[0]] += 1
        got_pair[idx] += 1
    z = stats.norm.isf(1e-6 / (2 * 2 * n))
    for got, p in ((got_first, torch.tensor(first)), (got_pair, torch.tensor(pair))):
        sd = torch.sqrt(p * (1 - p) / trials)
        assert ((got / trials - p).abs() <= z * sd).all(), (got / trials, p, z * sd)
    assert got_first[4] == 0 and got_pair[4] == 0  # weight 0: never before a positive weight
    assert got_pair.sum() == 2 * trials


def test_block_weighting_apportions_r_by_width():
    w = _weights(dead=False)
    w[w == 0] = 0.1  # no zeros: the allocation is by width alone
    for r in (10, 33, 70):
        c = _comp(r, w=w, weighting="block")
        for s in LAYOUT.slots:
            got = int(((c.indices >= s.offset) & (c.indices < s.stop)).sum())
            assert abs(got - r * s.numel / LAYOUT.dim) <= 1, (r, s.name)


def test_rescale_estimates_the_squared_norm():
    """E over seeds of sum_kept (g_j * scale_j)^2 ~ ||g||^2 (with-replacement approximation, small r).
    Block weighting apportions r to the blocks by width, deterministically: with fewer coordinates than
    blocks some block is never sampled and the estimate misses its mass, so it is checked at r = 8
    (every one of the 4 blocks gets at least one)."""
    g = torch.randn(LAYOUT.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    w = g.square() + 0.3
    for weighting, r in (("global", 4), ("block", 8)):
        est = [(_comp(r, seed=s, w=w, weighting=weighting, rescale=True).compress(g[None])).square().sum().item()
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
            w = second_moments(model, loss, batches, n, seed, estimator="exact")
        rows = probe_rows(n_total, n, seed)
        assert w.dtype == torch.float64 and w.shape == (G.shape[1],)
        torch.testing.assert_close(w, G[rows].square().mean(0), rtol=1e-10, atol=1e-14)


class _MLP(torch.nn.Module):
    """nn.Linear on (B, n) inputs only: one position per example."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _mlp_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _mlp_batches(n=10, batch_size=4):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g)
    return [{"x": x[s:s + batch_size], "y": y[s:s + batch_size]} for s in range(0, n, batch_size)]


def test_one_position_layers_fused_square_equals_autograd_for_both_estimators():
    """nn.Linear without a sequence axis: (delta^2)^T (a^2) is the exact per-example square, so both
    estimators equal float64 per-example autograd."""
    torch.manual_seed(4)
    model, batches = _MLP().double(), _mlp_batches()
    G = reference_grads(model, _mlp_loss, batches, [n for n, _ in model.named_parameters()])
    for n, seed in ((10, 0), (6, 3)):
        want = G[probe_rows(10, n, seed)].square().mean(0)
        for est in ("exact", "diagonal"):
            torch.testing.assert_close(second_moments(model, _mlp_loss, batches, n, seed, estimator=est), want,
                                       rtol=1e-12, atol=1e-15)


def _diagonal_reference(model, batches, rows):
    """The diagonal estimator one example at a time, from hooks and float64 autograd: each position's
    rank-one term of every matrix gradient squared on its own, vector parameters' true squares."""
    from transformers.pytorch_utils import Conv1D

    layout = Layout.from_model(model)
    examples = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(b["y"].shape[0])]
    kinds = (torch.nn.Linear, Conv1D, torch.nn.Embedding)
    mats = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    total = torch.zeros(layout.dim, dtype=torch.float64)
    for i in rows.tolist():
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
                 for name, m in mats.items()]
        loss = text_loss(model, examples[i]).sum()
        for h in hooks:
            h.remove()
        vec_names = [n for n, p in model.named_parameters() if p.dim() == 1]
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, [seen[n][1] for n in mats] + [params[n] for n in vec_names])
        for (name, m), delta in zip(mats.items(), grads):
            a, d = seen[name][0].reshape(-1, seen[name][0].shape[-1] if not isinstance(m, torch.nn.Embedding) else 1), \
                delta.reshape(-1, delta.shape[-1])
            sq = torch.zeros_like(params[f"{name}.weight"])
            for t in range(d.shape[0]):
                if isinstance(m, torch.nn.Embedding):
                    tok = int(a[t])
                    if tok != m.padding_idx:
                        sq[tok] += d[t].square()
                elif isinstance(m, Conv1D):  # weight (in, out)
                    sq += torch.outer(a[t], d[t]).square()
                else:  # nn.Linear weight (out, in)
                    sq += torch.outer(d[t], a[t]).square()
            s = layout[f"{name}.weight"]
            total[s.offset:s.stop] += sq.reshape(-1)
        for name, g in zip(vec_names, grads[len(mats):]):
            s = layout[name]
            total[s.offset:s.stop] += g.square().reshape(-1)
    return total / rows.numel()


def _probe_batch_sizes(monkeypatch, check_flushed=False) -> list[int]:
    """The row count of every probe batch, with the held-memory cap at one byte (rebatching forced)."""
    from dropinf import probe

    sizes = []
    real = probe.SquareAccumulator.end_batch

    def spy(self, start, out):
        if check_flushed:
            assert not self.pending
        sizes.append(out.shape[0])
        real(self, start, out)
    monkeypatch.setattr(probe, "HELD_BYTES", 1)
    monkeypatch.setattr(probe.SquareAccumulator, "end_batch", spy)
    return sizes


def test_diagonal_estimator_equals_its_per_position_reference():
    """Sequence layers (Linear, HF Conv1D, padded Embedding, a one-position head, norms): the fused
    diagonal probe == the per-position float64 reference; it differs from the exact probe there."""
    make, loss, data = CASES["text"]
    torch.manual_seed(6)
    model, batches = make(), _double(data())
    for n, seed in ((9, 0), (5, 2)):
        rows = probe_rows(9, n, seed)
        got = second_moments(model, loss, batches, n, seed, estimator="diagonal")
        torch.testing.assert_close(got, _diagonal_reference(model, batches, rows), rtol=1e-10, atol=1e-14)
    exact = second_moments(model, loss, batches, 9, 0, estimator="exact")
    assert not torch.allclose(exact, second_moments(model, loss, batches, 9, 0, estimator="diagonal"))


def test_diagonal_estimator_needs_no_counting_pass_or_held_sums(monkeypatch):
    """Tied weights: the diagonal probe squares each contribution on its own (no pending sums, full
    batches even under a 1-byte cap) and is recorded in the compressor's provenance."""
    make, loss, data = CASES["tied"]
    torch.manual_seed(3)
    model, batches = make(), _double(data())
    sizes = _probe_batch_sizes(monkeypatch, check_flushed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = ImportanceDropout.prepare_options({"probe": 5, "probe_estimator": "diagonal"}, model=model,
                                                 loss_fn=loss, train_loader=batches)
    assert sum(sizes) == 5 and max(sizes) > 1 and (opts["weights"] > 0).any()  # not cut to one-row batches
    layout = Layout.from_model(model)
    c = dropinf.compressor("importance_dropout", layout.dim, 6, seed=0, layout=layout, **opts)
    assert c.attrs()["probe_estimator"] == "diagonal"
    with pytest.raises(OptionError, match="probe_estimator must be one of exact, diagonal"):
        ImportanceDropout.prepare_options({"probe_estimator": "fast"}, model=model, loss_fn=loss, train_loader=batches)


def test_probe_rebatches_under_the_held_memory_cap(monkeypatch):
    """Tied weights hold a per-example gradient per batch; a tiny cap forces one-row probe batches."""
    make, loss, data = CASES["tied"]
    torch.manual_seed(3)
    model, batches = make(), _double(data())
    G = reference_grads(model, loss, batches, [n for n, _ in model.named_parameters()])
    sizes = _probe_batch_sizes(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = second_moments(model, loss, batches, 5, 4, estimator="exact")
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
    assert a["probe_estimator"] == "diagonal" and a["key_rule"].startswith("Philox4x32-10")  # the defaults
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
    bench.probe_timing(["--arch", "gpt2-tiny", "--batch", "4", "--probe", "6", "3", "--examples", "12", "--r", "8",
                        "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    by = {(r["path"], r.get("probe_estimator", ""), r["n_examples"]): r for r in rows}
    assert float(by["check_probe", "exact", ""]["rel_err_vs_autograd"]) < 1e-5
    extract = by["extract_dropout", "", "12"]
    for est in ("exact", "diagonal"):
        for n in ("6", "3"):
            row = by["probe_second_moments", est, n]
            assert float(row["seconds"]) > 0
            assert float(row["ratio_to_extract"]) == pytest.approx(float(row["seconds"]) / float(extract["seconds"]))
    draw = by["importance_draw", "", ""]
    for est in ("exact", "diagonal"):
        total, probe = by["probe_and_draw", est, "6"], by["probe_second_moments", est, "6"]
        assert float(total["seconds"]) == pytest.approx(float(probe["seconds"]) + float(draw["seconds"]))
    assert float(draw["seconds"]) > 0 and draw["draw_device"] == ("cuda" if torch.cuda.is_available() else "cpu") and float(draw["ratio_to_extract"]) > 0
    assert extract["device"] and extract["git_commit"]
