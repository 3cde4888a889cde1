"""Modules none of whose coordinates a compressor reads are not hooked, and the backward stops below
the lowest module that is read; the rows stay equal to per-example float64 autograd."""
import pytest
import torch
from torch import nn

import dropinf
from dropinf.compressors.dropout import Dropout
from dropinf.extraction import Extractor
from dropinf.layout import Layout

from .models import TextNet, randomize, reference_grads, text_batches, text_loss


class Kept(Dropout):
    """Dropout keeping exactly the given coordinates (in this column order)."""

    def __init__(self, dim, kept, layout):
        self._kept = torch.as_tensor(kept, dtype=torch.long)
        super().__init__(dim, len(kept), seed=0, layout=layout)

    def _draw(self):
        return self._kept


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.third(torch.tanh(self.second(torch.tanh(self.first(x)))))


def chain_loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _chain(seed):
    g = torch.Generator().manual_seed(seed)
    model = randomize(Chain(), seed).double()
    data = [{"x": torch.randn(4, 5, generator=g, dtype=torch.float64), "y": torch.randint(3, (4,), generator=g)}
            for _ in range(2)]
    return model, data


def test_dropout_reads_exactly_the_slots_holding_a_kept_coordinate():
    seed = torch.seed() % 10_000
    layout = Layout.from_shapes([("a", (3, 4)), ("b", (4,)), ("c", (5, 2)), ("d", (1,))])
    for r in (1, 2, 5, 27):
        comp = Dropout(layout.dim, r, seed=seed, layout=layout)
        kept = set(comp.indices.tolist())
        for slot in layout.slots:
            assert comp.reads(slot) == any(slot.offset <= i < slot.stop for i in kept), (r, slot.name, seed)


def test_unread_modules_are_not_hooked_and_the_backward_stops_above_them():
    seed = torch.seed() % 10_000
    model, data = _chain(seed)
    names = [n for n, _ in model.named_parameters()]
    layout = Layout.from_shapes((n, p.shape) for n, p in model.named_parameters())
    second_w, third_b = layout["second.weight"], layout["third.bias"]
    kept = [second_w.offset + 3, third_b.offset + 1, second_w.offset + 40]
    comp = Kept(layout.dim, kept, layout)
    ex = Extractor(model, chain_loss, comp, params=names, self_check=False)  # (its reference passes need the graph)
    ex.prepare(data[0])
    read = ex._read_modules(comp)
    assert set(read) == {model.second, model.third}
    assert set(read[model.second]) == {"weight"} and set(read[model.third]) == {"bias"}

    seen = []  # whether the first layer's output was part of the graph during the fused step
    model.first.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    got = ex.run(data)
    assert seen and not any(seen), "the first layer is below every read module: no backward through it"
    want = reference_grads(model, chain_loss, data, names)[:, kept]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), f"seed {seed}"


def test_a_compressor_reading_no_hooked_module_gives_zero_rows_without_a_backward():
    model, data = _chain(0)
    layout = Layout.from_shapes((n, p.shape) for n, p in model.named_parameters())

    class Nothing(Kept):
        def reads(self, slot):  # a compressor that says so for every slot
            return False

    comp = Nothing(layout.dim, [0, 1], layout)
    seen = []  # whether any layer's output was part of an autograd graph
    for m in (model.first, model.second, model.third):
        m.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    ex = Extractor(model, chain_loss, comp, self_check=False)
    ex.prepare(data[0])  # (the plan's own passes build a graph)
    seen.clear()
    got = ex.run(data)
    assert got.shape == (8, 2) and not got.any()
    assert seen and not any(seen)


@pytest.mark.parametrize("r", [1, 3, 20])
def test_sparse_dropout_on_a_text_model_matches_autograd(r):
    """At small r most of TextNet's modules keep nothing; the ones that do still give exact rows
    (the self-check runs on the first batch too)."""
    seed = torch.seed() % 10_000
    torch.manual_seed(seed)
    model = randomize(TextNet(), seed).double()
    data = text_batches(seed=seed)
    names = [n for n, _ in model.named_parameters()]
    got = dropinf.extract(model, text_loss, data, "dropout", r=r, seed=seed)
    comp = Dropout(sum(p.numel() for p in model.parameters()), r, seed=seed)
    want = reference_grads(model, text_loss, data, names)[:, comp.indices]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), f"seed {seed}"


def test_a_wrong_reads_is_caught_by_the_self_check():
    """A compressor that claims not to read a slot it reads: its coordinates come out zero, which the
    self-check reports by name instead of passing silently."""
    model, data = _chain(1)
    layout = Layout.from_shapes((n, p.shape) for n, p in model.named_parameters())
    w = layout["first.weight"]

    class Liar(Kept):
        def reads(self, slot):
            return slot.name != "first.weight" and super().reads(slot)

    comp = Liar(layout.dim, [w.offset + 2, layout["third.weight"].offset], layout)
    with pytest.raises(dropinf.errors.GradientCheckError, match="first.weight"):
        Extractor(model, chain_loss, comp).run(data)
