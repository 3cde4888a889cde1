"""Coverage routing, the per-module fallback and the self-check, against batch-size-1 float64 autograd."""
import warnings

import pytest
import torch

import dropinf
from dropinf import modules, selfcheck
from dropinf.errors import DropinfError, GradientCheckError
from dropinf.extraction import Extractor
from dropinf.factors import Dense

from . import coverage_models as cm
from .models import TextNet, reference_grads, text_batches, text_loss

CASES = {
    "functional_tied": (cm.FunctionalTied, cm.lm_loss, cm.ids_batches),
    "mha_batch_first": (lambda: cm.MHA(True), cm.x_loss, cm.x_batches),
    "mha_seq_first": (lambda: cm.MHA(False), cm.x_loss, cm.x_batches),
    "encoder_layer": (cm.EncoderLayer, cm.x_loss, cm.x_batches),
    "query_squeeze": (lambda: cm.LearnedQuery(True), cm.x_loss, cm.x_batches),
    "query_broadcast": (lambda: cm.LearnedQuery(False), cm.x_loss, cm.x_batches),
    "seq_first_T_eq_B": (cm.SeqFirst, cm.x_loss, cm.x_batches),
    "keyword_call": (cm.KeywordCall, cm.x_loss, cm.x_batches),
    "free_parameters": (cm.FreeParams, cm.x_loss, cm.x_batches),
    "custom_module": (cm.CustomLayer, cm.x_loss, cm.x_batches),
    "lstm": (lambda: cm.Recurrent("lstm"), cm.x_loss, cm.x_batches),
    "gru_seq_first": (lambda: cm.Recurrent("gru", batch_first=False), cm.x_loss, cm.x_batches),
    "lstm_packed": (lambda: cm.Recurrent("lstm", packed=True), cm.packed_loss, cm.x_batches),
    "param_read_by_loss": (cm.Tempered, cm.tempered_loss, cm.x_batches),
}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def build(case, seed):
    cls, loss, batches = CASES[case]
    torch.manual_seed(seed)
    model = cls().double()
    data = batches(seed=seed)
    names = [n for n, _ in model.named_parameters()]
    return model, loss, data, names


def quiet_run(ex, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ex.run(data)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_parameter_accounted_for_and_exact(case):
    """Self-check on (default): passes, and identity/dropout rows equal per-example autograd."""
    seed = torch.seed() % 10_000
    model, loss, data, names = build(case, seed)
    ref = reference_grads(model, loss, data, names)
    ex = Extractor(model, loss, "identity")
    got = quiet_run(ex, data)
    assert set(ex.plan.where) == set(names)  # every tracked parameter has a path
    assert rel_err(got, ref) < 1e-10, f"seed {seed}: {ex.plan.where}"
    drop = Extractor(model, loss, "dropout", r=17, seed=seed)
    got = quiet_run(drop, data)
    assert rel_err(got, ref[:, drop.compressor.indices]) < 1e-10, f"seed {seed}"


def plan_of(case, seed=0):
    model, loss, data, _ = build(case, seed)
    ex = Extractor(model, loss, "identity")
    quiet_run(ex, data)
    return model, ex.plan


def test_routing_functional_use_goes_to_the_enclosing_module():
    model, plan = plan_of("functional_tied")
    assert plan.where["emb.weight"] == "fallback at <model> (FunctionalTied)"
    assert plan.sites == {model: ["emb.weight"]} and plan.where["mix.weight"] == "fused: Linear"
    assert set(plan.hooked) == {model.mix}  # the embedding's own hook no longer emits emb.weight


def test_routing_attention_out_proj_never_fused_by_the_linear_handler():
    model, plan = plan_of("mha_seq_first")
    assert plan.where["att.out_proj.weight"] != "fused: Linear"  # read functionally by the attention


def test_routing_learned_query():
    model, plan = plan_of("query_squeeze")  # .squeeze(0): the output cannot be expanded
    assert plan.where["qproj.weight"].startswith("fallback at <model>")
    model, plan = plan_of("query_broadcast")  # broadcast only: expanded per example, fused
    assert plan.where["qproj.weight"] == "fused: Linear"
    assert plan.hooked[model.qproj][2] == [(selfcheck.EXPAND, selfcheck.EXPAND)]


def test_routing_sequence_first_batch_axis_is_found_not_guessed():
    model, plan = plan_of("seq_first_T_eq_B")
    assert all(w.startswith("fused") for w in plan.where.values())
    assert plan.hooked[model.fc][2] == [(selfcheck.Axis("batch", 1), selfcheck.Axis("batch", 1))]
    assert plan.hooked[model.head][2] == [(selfcheck.Axis("batch", 0), selfcheck.Axis("batch", 0))]


def test_routing_keyword_call_free_parameters_custom_and_recurrent_modules():
    model, plan = plan_of("keyword_call")
    assert all(w == "fused: Linear" for w in plan.where.values())
    model, plan = plan_of("free_parameters")
    assert plan.sites == {model: ["cls", "pos"]} and not plan.whole
    model, plan = plan_of("custom_module")
    assert plan.sites == {model.custom: ["custom.w", "custom.v", "custom.b"]}
    model, plan = plan_of("lstm")
    assert list(plan.sites) == [model.rnn]
    model, plan = plan_of("param_read_by_loss")  # no module call uses it: the whole model, only for it
    assert plan.whole == ["temp"] and list(plan.sites) == [model.net.rnn]


def test_first_batch_of_one_then_replanned():
    model, loss, data, names = build("seq_first_T_eq_B", 3)
    data = [{k: v[:1] for k, v in data[0].items()}] + data
    ref = reference_grads(model, loss, data, names)
    ex = Extractor(model, loss, "identity")
    got = quiet_run(ex, data)
    assert ex.plan.axes_known and rel_err(got, ref) < 1e-10


def test_forced_fallback_option():
    model, loss, data, names = build("keyword_call", 4)
    ref = reference_grads(model, loss, data, names)
    ex = Extractor(model, loss, "identity", fallback=["fc"])
    got = quiet_run(ex, data)
    assert ex.plan.where["fc.weight"] == "fallback at fc (Linear)" and ex.plan.where["head.weight"] == "fused: Linear"
    assert rel_err(got, ref) < 1e-10
    with pytest.raises(DropinfError, match="nope"):
        Extractor(model, loss, "identity", fallback=["nope"])


# ---- the self-check catches what coverage cannot see ---------------------------------------------
def text_setup(seed=0):
    torch.manual_seed(seed)
    return TextNet().double(), text_loss, text_batches(seed=seed)


def break_linear(monkeypatch, how):
    real = modules.LinearHandler.emit

    def broken(module, x, delta, slots, comp, out):
        delta = delta * 0 if how == "zero" else delta.flip(0)  # flip: swaps examples, keeps the batch sum
        real(module, x, delta, slots, comp, out)

    monkeypatch.setattr(modules.LinearHandler, "emit", staticmethod(broken))


# zeroed δ: every sum is wrong; δ of the examples swapped: the bias's batch sum is unchanged, only
# the per-example rows catch it
@pytest.mark.parametrize("how,what", [("zero", r"fc\.weight \[fused: Linear\]: sum over the batch"),
                                      ("flip", r"fc\.bias \[fused: Linear\]: example 0")])
@pytest.mark.parametrize("name,r", [("identity", None), ("dropout", 40), ("gaussian", 8), ("logra", 4), ("sjlt", 8)])
def test_broken_handler_is_caught_naming_the_parameter(monkeypatch, how, what, name, r):
    model, loss, data = text_setup(1)
    break_linear(monkeypatch, how)
    with pytest.raises(GradientCheckError, match=what) as err:
        dropinf.extract(model, loss, data, name, r=r)
    assert "params=" in str(err.value) and "fallback=" in str(err.value)
    assert "conv1d.weight" not in str(err.value)  # the correct layers are not blamed


@pytest.mark.parametrize("name,r", [("dropout", 40), ("sjlt", 8)])
def test_a_wrong_layer_launch_is_caught_by_the_whole_rows(monkeypatch, name, r):
    """`add_layer` adds a layer's tensors in one call (one kernel launch where dropout has it); the
    per-tensor records come from separate calls, so a combined call that loses a bias must be
    caught by the check of the whole rows against the matrix path."""
    from dropinf.compressors.base import add_layer_terms, layer_terms

    def loses_the_bias(self, out, rows, cols, **terms):
        add_layer_terms(self, out, rows, cols, [t for t in layer_terms(**terms) if t[0] != "row_sums"])

    model, loss, data = text_setup(4)
    monkeypatch.setattr(dropinf.compressors.dropout.Dropout, "add_layer", loses_the_bias)
    with pytest.raises(GradientCheckError, match="compressor matrix path"):
        dropinf.extract(model, loss, data, name, r=r)


def test_self_check_false_skips_it(monkeypatch):
    model, loss, data = text_setup(2)
    names = [n for n, _ in model.named_parameters()]
    ref = reference_grads(model, loss, data, names)
    break_linear(monkeypatch, "zero")
    got = dropinf.extract(model, loss, data, "identity", self_check=False)
    assert rel_err(got, ref) > 1e-3  # wrong, unchecked: what the check exists for


def test_unseen_functional_use_is_caught(monkeypatch):
    """If a use escaped the coverage plan, the fused embedding would miss the F.linear term."""
    monkeypatch.setattr(selfcheck._Uses, "__torch_function__",
                        lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})))
    model, loss, data, _ = build("functional_tied", 0)
    with pytest.raises(GradientCheckError, match=r"emb\.weight \[fused: Embedding\]"):
        quiet_run(Extractor(model, loss, "identity"), data)


def test_self_check_every_k_batches_and_state_restored(monkeypatch):
    model, loss, data = text_setup(3)
    data = data + text_batches(seed=4)  # 6 batches
    seen = []
    real = selfcheck.checked_step
    monkeypatch.setattr(selfcheck, "checked_step", lambda ex, batch, d, start, ref: seen.append(start) or
                        real(ex, batch, d, start, ref))
    model.train()
    model.ln.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    dropinf.extract(model, loss, data, "dropout", r=9, self_check=2)
    assert seen == [0, 6, 10]  # batches 0, 2, 4 (of sizes 3, 3, 1, 3, 3, 1)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    seen.clear()
    dropinf.extract(model, loss, data, "dropout", r=9)
    assert seen == [0]
    with pytest.raises(DropinfError, match="self_check"):
        dropinf.extract(model, loss, data, "dropout", r=9, self_check=-1)


def test_self_check_failure_restores_state(monkeypatch):
    model, loss, data = text_setup(5)
    model.train()
    break_linear(monkeypatch, "zero")
    with pytest.raises(GradientCheckError):
        dropinf.extract(model, loss, data, "identity")
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_self_check_once_per_extractor_over_several_runs(monkeypatch):
    """Recomputation calls `run` once per slice: the default check runs on the first batch only."""
    model, loss, data = text_setup(6)
    seen = []
    real = selfcheck.checked_step
    monkeypatch.setattr(selfcheck, "checked_step", lambda ex, batch, d, start, ref: seen.append(start) or
                        real(ex, batch, d, start, ref))
    ex = Extractor(model, loss, "dropout", r=9)
    first, again = ex.run(data), ex.run(data)
    assert seen == [0] and torch.equal(first, again)


def test_model_that_cannot_run_one_example_is_a_clear_error():
    torch.manual_seed(0)
    model = cm.FixedBatchNet().double()
    with pytest.raises(DropinfError, match="fails on one example of the batch alone"):
        quiet_run(Extractor(model, cm.x_loss, "identity"), cm.x_batches(0))


def test_packed_sequence_reason_is_given():
    model, loss, data, _ = build("lstm_packed", 0)
    with pytest.warns(UserWarning, match="LSTM's inputs or outputs have no batch axis"):
        Extractor(model, loss, "identity").run(data)


def test_self_check_records_only_the_columns_each_tensor_reaches(monkeypatch):
    """Raw gradients: the check's per-tensor records hold dim values in all (each tensor's own columns),
    not (number of tensors) x dim, which on a 135M-parameter model was hundreds of GiB."""
    model, loss, data = text_setup(3)
    seen = []
    real = selfcheck.checked_step

    def spy(ex, batch, out_dtype, start, ref):
        real_recorder = selfcheck.SlotRecorder

        class Keep(real_recorder):
            def __init__(self, comp, picks):
                super().__init__(comp, picks)
                seen.append(self)

        monkeypatch.setattr(selfcheck, "SlotRecorder", Keep)
        try:
            return real(ex, batch, out_dtype, start, ref)
        finally:
            monkeypatch.setattr(selfcheck, "SlotRecorder", real_recorder)

    monkeypatch.setattr(selfcheck, "checked_step", spy)
    ex = Extractor(model, loss, "identity")
    quiet_run(ex, data)
    (rec,) = seen
    dim = ex.layout.dim
    assert len(rec.sums) == len(ex.named) > 1
    assert sum(v.numel() for v in rec.sums.values()) == dim
    assert sum(v.shape[1] for v in rec.rows.values()) == dim


def test_write_outside_the_declared_columns_is_caught(monkeypatch):
    """A compressor whose tensor lands in another tensor's columns: the per-tensor records would not
    see it, so the recorder checks the rest of the row is untouched."""
    from dropinf.compressors.identity import Identity

    model, loss, data = text_setup(4)
    real = Identity.add_vector
    victim = "fc.bias"

    def misplaced(self, out, slot, values):
        if slot.name == victim:
            out[:, :slot.numel] += values.flatten(2).sum(1, dtype=out.dtype)  # the first tensor's columns
        else:
            real(self, out, slot, values)

    monkeypatch.setattr(Identity, "add_vector", misplaced)
    with pytest.raises(GradientCheckError, match=r"fc\.bias .*writes outside its columns"):
        dropinf.extract(model, loss, data, "identity")


@pytest.mark.parametrize("norm", ["layer", "batch", "rms"])
def test_norm_input_modified_in_place_after_the_forward_is_a_clear_error(norm):
    """Norm handlers keep the layer's input (autograd holds it anyway) and form x̂ in the backward
    hook; an input changed in place in between would give wrong rows, so it is refused by name.
    (With the self-check on, its autograd reference may trip over the same change first.)"""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = {"layer": lambda: torch.nn.LayerNorm(6), "batch": lambda: torch.nn.BatchNorm1d(6).eval(),
                         "rms": lambda: torch.nn.RMSNorm(6)}[norm]()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, x):
            x = x.clone()
            h = self.norm(x)
            x.mul_(2.0)  # the norm's input, changed after the norm read it
            return self.fc(h + x)

    torch.manual_seed(5)
    model = Net().double()
    data = [{"x": torch.randn(4, 6, dtype=torch.float64), "y": torch.randint(3, (4,))}]
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    with pytest.raises(DropinfError, match=r"input was modified in place"):
        dropinf.extract(model, loss, data, "identity", params=["norm.weight"], self_check=False)
    with pytest.raises((RuntimeError, DropinfError), match=r"modified (by an inplace operation|in place)"):
        dropinf.extract(model, loss, data, "identity", params=["norm.weight"])


class BatchMixing(torch.nn.Module):
    """Each example's hidden state is shifted by the batch's mean: its loss depends on the others."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h + h.mean(0, keepdim=True))


def mixing_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_example_references_per_precision(dtype):
    """float32/64: each checked example's reference is its own forward and backward at batch size 1;
    bfloat16: the gradient of its own loss through the batch's forward (a separate forward rounds
    differently in every layer, which over a deep bf16 model exceeds the tolerance)."""
    torch.manual_seed(7)
    model = TextNet().to(dtype)
    batch = text_batches(seed=7)[0]
    B = batch["ids"].shape[0]
    ex = Extractor(model, text_loss, "identity")
    ref = selfcheck.reference(ex, batch, [0, B - 1], None)
    params = [p for _, p in ex.named]
    for p in params:
        p.requires_grad_(True)
    losses = text_loss(model, batch)
    for i in (0, B - 1):
        if dtype == torch.bfloat16:
            want = torch.autograd.grad(losses[i], params, retain_graph=True)
        else:
            want = torch.autograd.grad(text_loss(model, selfcheck.example(batch, i, B))[0], params)
        assert all(torch.equal(a, b) for a, b in zip(ref.examples[i], want)), i
    assert selfcheck.batched_reference(ex) == (dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_examples_that_depend_on_each_other_are_caught_in_every_precision(dtype):
    """The fused row of an example holds its activations times the summed loss's output gradient;
    when its loss depends on the rest of the batch that is not its gradient, and the check says so
    with the batch-forward reference of bf16 as with the batch-size-1 one."""
    torch.manual_seed(8)
    model = BatchMixing().to(dtype)
    g = torch.Generator().manual_seed(8)
    data = [{"x": torch.randn(4, 6, generator=g).to(dtype), "y": torch.randint(3, (4,), generator=g)}]
    with pytest.raises(GradientCheckError, match=r"fc\.weight \[fused: Linear\]: example 0"):
        dropinf.extract(model, mixing_loss, data, "identity")


def test_swapped_examples_are_caught_in_bfloat16(monkeypatch):
    torch.manual_seed(9)
    model = TextNet().to(torch.bfloat16)
    break_linear(monkeypatch, "flip")
    with pytest.raises(GradientCheckError, match=r"fc\.bias \[fused: Linear\]: example 0"):
        dropinf.extract(model, text_loss, text_batches(seed=9), "dropout", r=40)
