"""Fused extraction against per-example autograd, for every supported layer type and compressor."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropinf
from dropinf.extraction import Extractor

from .models import (ConvNet, TextNet, TiedLM, conv_batches, conv_loss, lm_batches, lm_loss, randomize,
                     reference_grads, text_batches, text_loss)

CASES = {
    "text": (TextNet, text_loss, text_batches),
    "conv": (ConvNet, conv_loss, conv_batches),
    "tied": (TiedLM, lm_loss, lm_batches),
}


def rel_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()  # extract returns rows on the CPU
    return ((a - b).norm() / b.norm()).item()


# DROPINF_TEST_DEVICE=cuda runs the same checks on a GPU (done once per release on an H100).
DEVICE = torch.device(os.environ.get("DROPINF_TEST_DEVICE", "cpu"))


def setup(case, dtype, seed):
    cls, loss, batches = CASES[case]
    torch.manual_seed(seed)
    model = randomize(cls(), seed).to(DEVICE, dtype)
    data = batches(seed=seed)
    data = [{k: (v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)) for k, v in b.items()}
            for b in data]
    names = [n for n, p in model.named_parameters()]
    return model, loss, data, names


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_identity_matches_autograd(case, dtype, tol):
    seed = torch.seed() % 10_000
    model, loss, data, names = setup(case, dtype, seed)
    ref = reference_grads(model, loss, data, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dropinf.extract(model, loss, data, "identity")
    assert got.shape == ref.shape and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(got.double(), ref.double()) < tol, f"seed {seed}"


def test_fallback_warns_once_naming_module_type():
    """Coverage is planned on the first batch: the free Parameter `scale` (used in TiedLM.forward)
    takes the per-module fallback at the model; the tied weight stays fused in both modules."""
    model, loss, data, _ = setup("tied", torch.float64, 0)
    ex = Extractor(model, loss, "identity")
    with pytest.warns(UserWarning, match="TiedLM") as rec:
        ex.run(data)
    assert len(rec) == 1
    assert ex.fallback == ["scale"]
    assert set(ex.hooked) == {model.emb, model.mix, model.out}  # tied weight: both usages hooked
    assert ex.plan.sites == {model: ["scale"]} and not ex.plan.whole


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name,r", [("dropout", 9), ("gaussian", 7), ("logra", 4), ("sjlt", 6)])  # r >= 6 layers: per-layer projections
def test_fused_path_equals_matrix_path(case, name, r):
    seed = torch.seed() % 10_000
    model, loss, data, names = setup(case, torch.float64, seed)
    ref = reference_grads(model, loss, data, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = Extractor(model, loss, name, r=r, seed=seed)
        got = ex.run(data)
    want = ex.compressor.compress(ref)  # on ref's device: Gaussian tiles are drawn per device type
    assert got.shape == want.shape == (ref.shape[0], ex.compressor.out_dim)
    assert rel_err(got, want) < 1e-10, f"seed {seed}"


def test_extract_dropout_keeps_exactly_the_public_indices():
    model, loss, data, names = setup("text", torch.float64, 3)
    ref = reference_grads(model, loss, data, names)
    got = dropinf.extract(model, loss, data, "dropout", r=11, seed=42)
    comp = dropinf.compressor("dropout", dim=ref.shape[1], r=11, seed=42)
    assert rel_err(got, ref[:, comp.indices.to(ref.device)]) < 1e-12


def test_params_selection_explicit_list():
    model, loss, data, _ = setup("text", torch.float64, 1)
    names = ["fc.weight", "head.bias"]
    ref = reference_grads(model, loss, data, names)
    got = dropinf.extract(model, loss, data, "identity", params=names)
    assert rel_err(got, ref) < 1e-10
    with pytest.raises(dropinf.DropinfError, match="nope"):
        dropinf.extract(model, loss, data, "identity", params=["nope"])


def test_lora_parameters_tracked_by_default_for_peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TextNet().double()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc", "head"], lora_dropout=0.1)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # lora_B starts at zero; make the test non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    data = text_batches(seed=5)
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    assert len(names) == 4
    ref = reference_grads(model, text_loss, data, names)
    got = dropinf.extract(model, text_loss, data, "identity")
    assert rel_err(got, ref) < 1e-10
    model.train()
    assert model.training  # restored after extraction


def test_model_state_restored():
    model, loss, data, _ = setup("conv", torch.float64, 2)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    dropinf.extract(model, loss, data, "dropout", r=3)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_nan_gradient_names_example_index():
    model, loss, data, names = setup("conv", torch.float64, 0)
    data[1]["x"][1, 0, 0, 0] = float("nan")  # batch 1 row 1 = example 3
    with pytest.raises(dropinf.errors.NonFiniteError, match=r"\[3\]"):
        dropinf.extract(model, loss, data, "dropout", r=4)


def test_sink_streams_rows_in_order():
    model, loss, data, _ = setup("text", torch.float64, 4)
    whole = dropinf.extract(model, loss, data, "gaussian", r=6, seed=1)
    parts = {}
    assert dropinf.extract(model, loss, data, "gaussian", r=6, seed=1, sink=lambda s, x: parts.__setitem__(s, x)) is None
    assert torch.equal(torch.cat([parts[k] for k in sorted(parts)]).cpu(), whole)  # sink sees device rows


def test_loss_must_be_per_example():
    model, _, data, _ = setup("conv", torch.float64, 0)
    with pytest.raises(dropinf.errors.ShapeError, match=r"\[B\]"):
        dropinf.extract(model, lambda m, b: conv_loss(m, b).mean(), data, "dropout", r=3)


def _hf_lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["attention_mask"][:, 1:].to(logits.dtype)
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return (tok * mask).sum(1) / mask.sum(1)


def _padded_lm_batches(vocab, n=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 3, 5, 2])[:n]
    ids = torch.randint(vocab, (n, T), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return [{"input_ids": ids[s:s + 2], "attention_mask": mask[s:s + 2]} for s in range(0, n, 2)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_causal_lm_padded_batches(arch):
    """GPT-2 (Conv1D, LayerNorm, tied embeddings) and Llama (RMSNorm, rotary) with right padding:
    the fused path covers every parameter and equals per-example autograd."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                      attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=17, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                                       attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    model = model.double()
    for p in model.parameters():  # random norms too
        if p.dim() == 1:
            torch.nn.init.normal_(p, 1.0, 0.3)
    data = _padded_lm_batches(17)
    names = [n for n, _ in model.named_parameters()]
    ex = Extractor(model, _hf_lm_loss, "identity")
    ref = reference_grads(model, _hf_lm_loss, data, names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback allowed
        got = ex.run(data)
    assert rel_err(got, ref) < 1e-10
    drop = Extractor(model, _hf_lm_loss, "dropout", r=50, seed=1).run(data)
    assert rel_err(drop, ref[:, dropinf.compressor("dropout", dim=ref.shape[1], r=50, seed=1).indices]) < 1e-10


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (run with DROPINF_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("name", ["dropout", "sjlt", "logra"])
def test_cuda_graph_replay_equals_eager(name):
    model, loss, data, _ = setup("text", torch.float32, 11)
    eager = dropinf.extract(model, loss, data, name, r=9, seed=3)
    graphed = dropinf.extract(model, loss, data, name, r=9, seed=3, cuda_graph=True)
    assert rel_err(graphed, eager) < 1e-6


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (run with DROPINF_TEST_DEVICE=cuda)")
def test_graph_captures_leave_no_memory_behind():
    """Every capture warms up on one side stream per device: a new stream per capture would leave a
    cuBLAS workspace allocated for each graph ever captured, long after its extractor is gone."""
    import gc

    from dropinf.extraction import capture_stream

    model, loss, data, _ = setup("text", torch.float32, 11)
    assert capture_stream(DEVICE) is capture_stream(DEVICE)
    after = []
    for seed in range(4):
        dropinf.extract(model, loss, data, "dropout", r=9, seed=seed, cuda_graph=True)
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[-1] - after[1] <= 2**20, after  # the first capture may create the stream's workspace


def _many_text_batches(n=62, batch_size=4, seed=11):
    """Enough batches of one shape for cuda_graph='auto' to time, capture and decide (and a last,
    partial batch of another shape)."""
    return [{k: (v.to(DEVICE, torch.float32) if v.is_floating_point() else v.to(DEVICE)) for k, v in b.items()}
            for b in text_batches(n=n, batch_size=batch_size, seed=seed)]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (run with DROPINF_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("name", ["dropout", "sjlt", "logra", "identity"])
def test_cuda_graph_auto_equals_eager(name):
    model, loss, _, _ = setup("text", torch.float32, 11)
    data = _many_text_batches()
    r = None if name == "identity" else 9
    eager = dropinf.extract(model, loss, data, name, r=r, seed=3, cuda_graph=False)
    ex = Extractor(model, loss, name, r=r, seed=3)  # auto: the default
    auto = ex.run(data)
    assert rel_err(auto, eager) < 1e-6
    rep = ex.timings["cuda_graph"]
    full = next(s for s in rep["shapes"] if s["shape"].startswith("ids 4x"))
    assert full["decision"] in ("graph", "eager") and full["captures"] == 1 and full["graph_ms"] > 0
    assert rep["used"] is True and full["batches_graph"] >= 4  # the timed replays (and all after, if kept)
    print(name, rep)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (run with DROPINF_TEST_DEVICE=cuda)")
def test_cuda_graphs_of_many_shapes_and_seeds_share_a_pool():
    """Bucketed variable-length batches give several graph shapes (one memory pool); `use` moves to
    the next seed's compressor with new graphs: every row equals the eager step's."""
    model, loss, _, _ = setup("text", torch.float32, 5)
    data = _many_text_batches(n=41, batch_size=3, seed=5)
    opts = dict(bucket=2, bucket_mask="mask")
    dim = sum(p.numel() for p in model.parameters())
    comps = [dropinf.compressor("dropout", dim=dim, r=9, seed=s) for s in (0, 1)]
    ex = Extractor(model, loss, comps[0], cuda_graph=True, **opts)
    for comp in comps:
        got = ex.use(comp).run(data)
        want = dropinf.extract(model, loss, data, comp, cuda_graph=False, **opts)
        assert rel_err(got, want) < 1e-6
    shapes = ex.timings["cuda_graph"]["shapes"]
    assert len(shapes) >= 3 and all(s["decision"] == "graph" for s in shapes)
    assert sum(g.comp is comps[1] for g in ex._graphs.values()) == len(shapes)  # the last seed's, all kept


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (run with DROPINF_TEST_DEVICE=cuda)")
def test_cuda_graph_auto_with_buckets_equals_eager_without():
    model, loss, _, _ = setup("text", torch.float32, 7)
    data = _many_text_batches(n=80, batch_size=4, seed=7)
    eager = dropinf.extract(model, loss, data, "dropout", r=9, seed=1, cuda_graph=False)
    auto = dropinf.extract(model, loss, data, "dropout", r=9, seed=1, bucket=4, bucket_mask="mask")
    assert rel_err(auto, eager) < 1e-5


class _InPlaceAfterFirst(nn.Module):
    """The first tracked layer's output is changed in place at once (as `x += pos` or relu_ do)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        seen["start"] = h
        h.mul_(2.0).relu_()
        return self.b(h)


seen: dict = {}


def test_graph_start_is_the_first_layers_own_output_and_in_place_ops_on_it_stay_exact():
    """The activation graph starts at the first tracked layer's output without a copy (a clone
    there is one activation at the peak), and in-place ops on that output give the gradients of
    plain per-example autograd."""
    g = torch.Generator().manual_seed(torch.seed() % 10_000)
    model = _InPlaceAfterFirst().double().to(DEVICE)
    data = [{"x": torch.randn(3, 4, generator=g, dtype=torch.float64).to(DEVICE),
             "y": torch.randint(0, 3, (3,), generator=g).to(DEVICE)} for _ in range(2)]

    def loss(m, batch):
        return F.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    names = [n for n, _ in model.named_parameters()]
    ref = reference_grads(model, loss, data, names)
    ex = Extractor(model, loss, "identity", self_check=False)
    outputs = {}

    def keep(module, args, output):
        outputs["a"] = output  # returns None: the output is not replaced

    hook = model.a.register_forward_hook(keep)
    got = ex.run(data)
    hook.remove()
    assert rel_err(got, ref) < 1e-10
    # the model went on with a tensor on the layer's own storage: nothing was copied
    assert seen["start"].data_ptr() == outputs["a"].data_ptr()
