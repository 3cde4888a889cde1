"""Real architectures, each from a tiny seeded config in float64, against batch-size-1 autograd.

Every case runs padded variable-length batches (-100 labels where the task has them) split into a
full batch, a short one and one of size 1. `identity` must equal the per-example gradients and
`dropout` their sampled columns to 1e-10, or extraction must refuse with a DropinfError naming
the module. A case waiting on the extraction engine goes into WAITING as a strict xfail naming the
missing piece (none today): it turns into a failure the moment that piece lands.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropinf
from dropinf.modules import handler_for

from . import models as M


@dataclass
class Case:
    model: nn.Module
    loss: Callable
    batches: list
    names: list[str]          # tracked parameters (all trainable ones unless the case says otherwise)
    refused: str | None = None  # regex the DropinfError must match, for a case that must be refused


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def _random_vectors(model, seed):
    """Norm weights and biases away from their 1/0 init so every role is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _finish(model, loss, data, seed, names=None, refused=None):
    model = _random_vectors(M.randomize(model, seed), seed).double()
    data = {k: (v.double() if v.is_floating_point() else v) for k, v in data.items()}
    names = names or [n for n, p in model.named_parameters() if p.requires_grad]
    return Case(model, loss, M.split(data), names, refused)


def _cls_loss(model, batch):
    return F.cross_entropy(model(batch["ids"], batch["mask"]), batch["y"], reduction="none")


def _text_data(seed, vocab=11, T=6, classes=3):
    ids, mask = M.padded_tokens(vocab, T=T, seed=seed)
    y = torch.randint(classes, (ids.shape[0],), generator=torch.Generator().manual_seed(seed + 1))
    return {"ids": ids, "mask": mask, "y": y}


def _image_loss(model, batch):
    out = model(batch["x"])
    out = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(out, batch["y"], reduction="none")


def _images(seed, shape, classes=3, n=6):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, *shape, generator=g), "y": torch.randint(classes, (n,), generator=g)}


# ---- Hugging Face ------------------------------------------------------------------------------
VOCAB, T_TEXT = 23, 7


def _causal_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return M.token_loss(logits[:, :-1], batch["labels"][:, 1:])


def _mlm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return M.token_loss(logits, batch["labels"])


def _causal_data(seed):
    ids, mask = M.padded_tokens(VOCAB, T=T_TEXT, seed=seed)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _mlm_data(seed, mask_id=2):
    ids, mask = M.padded_tokens(VOCAB, T=T_TEXT, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (mask == 1)
    chosen[:, 0] = True  # every example has a label
    return {"input_ids": ids.masked_fill(chosen, mask_id), "attention_mask": mask,
            "labels": ids.masked_fill(~chosen, -100)}


def _tf():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def _hf_text(kind, seed):
    tf = _tf()
    torch.manual_seed(seed)
    small = dict(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=16, attn_implementation="eager")
    if kind == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(intermediate_size=12, pad_token_id=0, **small))
    elif kind == "roberta":
        model = tf.RobertaForMaskedLM(tf.RobertaConfig(intermediate_size=12, pad_token_id=0, **small))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2,
                                                 n_head=2, attn_implementation="eager"))
    elif kind == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(intermediate_size=12, **small))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=12, num_key_value_heads=1, **small))
    elif kind == "opt":
        small.pop("hidden_size")
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=8, ffn_dim=12, word_embed_proj_dim=8, **small))
    else:
        raise KeyError(kind)
    mlm = kind in ("bert", "roberta")
    return _finish(model, _mlm_loss if mlm else _causal_loss, (_mlm_data if mlm else _causal_data)(seed), seed)


def _vit(seed):
    tf = _tf()
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
                       image_size=8, patch_size=4, num_channels=3, num_labels=3, attn_implementation="eager")
    return _finish(tf.ViTForImageClassification(cfg), _image_loss, _images(seed, (3, 8, 8)), seed)


def _lora_bert(seed):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    case = _hf_text("bert", seed)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.1)
    model = peft.get_peft_model(case.model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    return Case(model, _mlm_loss, case.batches, names)


# ---- torch-native and hand-written models ----------------------------------------------------
def _lm_loss(model, batch):
    return M.token_loss(model(batch["ids"])[:, :-1], batch["labels"][:, 1:])


def _lm_data(seed, vocab=11):
    ids, mask = M.padded_tokens(vocab, T=6, seed=seed)
    return {"ids": ids, "labels": ids.masked_fill(mask == 0, -100)}


def _seq_first_loss(model, batch):
    return F.cross_entropy(model(batch["x"].transpose(0, 1)), batch["y"], reduction="none")


def _vector_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _text(cls, refused=None, **kw):
    return lambda seed: _finish(cls(**kw), _cls_loss, _text_data(seed), seed, refused=refused)


def _image(cls, shape):
    return lambda seed: _finish(cls(), _image_loss, _images(seed, shape), seed)


def _opt_positions(seed):
    _tf()
    return _finish(M.OPTPositions(), _cls_loss, _text_data(seed), seed)


BUILDERS: dict[str, Callable[[int], Case]] = {
    **{k: (lambda seed, k=k: _hf_text(k, seed)) for k in ("bert", "roberta", "gpt2", "gpt_neox", "llama", "opt")},
    "vit": _vit,
    "lora_bert": _lora_bert,
    "mha_batch_first": _text(M.MHANet),
    "mha_seq_first_causal_weights": _text(M.MHANet, batch_first=False, need_weights=True, causal_mask=True),
    "mha_cross_kdim": _text(M.MHANet, cross_kdim=4),
    "mha_cross_packed_no_bias": _text(M.MHANet, cross=True, bias=False, batch_first=False),
    "mha_weights_in_loss": _text(M.MHANet, need_weights=True, use_weights=True,
                                 refused="MultiheadAttention.*attention weights"),
    "transformer_encoder_layer": _text(M.EncoderLayerNet),
    "transformer_encoder_layer_norm_first": _text(M.EncoderLayerNet, norm_first=True),
    "lstm": _text(M.RecurrentNet, kind="lstm"),
    "lstm_packed": _text(M.RecurrentNet, kind="lstm", packed=True),
    "gru": _text(M.RecurrentNet, kind="gru"),
    "gru_packed": _text(M.RecurrentNet, kind="gru", packed=True),
    "conv1d": _image(M.Conv1dNet, (3, 11)),
    "grouped_conv2d": _image(M.GroupedConvNet, (2, 7, 8)),
    "resnet": _image(M.TinyResNet, (3, 8, 8)),
    "functional_tied_output": lambda seed: _finish(M.FunctionalTiedLM(), _lm_loss, _lm_data(seed), seed),
    "learned_query": _text(M.LearnedQueryPool),
    "learned_query_squeezed": _text(M.LearnedQueryPool, squeeze=True),
    # T == 3 == the first batch's size: the batch axis cannot be told from shapes
    "sequence_first_T_eq_B": lambda seed: _finish(M.SequenceFirst(), _seq_first_loss, _images(seed, (3, 4)), seed),
    "keyword_call": lambda seed: _finish(M.KeywordCall(), _vector_loss, _images(seed, (4,)), seed),
    "opt_learned_positions": _opt_positions,
    "batchnorm_batch_statistics": lambda seed: _finish(M.BatchStatsNet(), _image_loss, _images(seed, (2, 5, 5)), seed,
                                                       refused="BatchNorm2d"),
}

# Cases that need work in the extraction engine (src/dropinf/extraction.py), by missing piece.
WAITING: dict[str, str] = {}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="extraction.py: " + WAITING[n]))
            if n in WAITING else n for n in names]


def _extract(case, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notices; correctness is what is checked here
        return dropinf.extract(case.model, case.loss, case.batches, name, params=case.names, **kw)


@pytest.mark.parametrize("arch", _params(sorted(BUILDERS)))
def test_architecture_matches_batch_size_1_autograd(arch):
    seed = 1234
    case = BUILDERS[arch](seed)
    if case.refused:
        with pytest.raises(dropinf.DropinfError, match=case.refused):
            _extract(case, "identity")
        return
    ref = M.reference_bs1(case.model, case.loss, case.batches, case.names)
    assert ref.shape[0] == 6 and ref.norm() > 0
    got = _extract(case, "identity")
    assert got.shape == ref.shape and got.dtype == torch.float64
    assert rel_err(got, ref) < 1e-10
    r = max(1, ref.shape[1] // 3)
    drop = _extract(case, "dropout", r=r, seed=seed)
    idx = dropinf.compressor("dropout", dim=ref.shape[1], r=r, seed=seed).indices
    assert rel_err(drop, ref[:, idx]) < 1e-10


# ---- the handlers alone: the contract in dropinf.modules, driven without the extraction engine ---
NEW_HANDLER_CASES = ["conv1d", "grouped_conv2d", "mha_batch_first", "mha_seq_first_causal_weights", "mha_cross_kdim",
                     "mha_cross_packed_no_bias", "opt_learned_positions", "transformer_encoder_layer", "transformer_encoder_layer_norm_first"]


def handler_rows(case, comp):
    """Compressed per-example rows of every parameter in `case`, formed only through
    claims → capture_call → output_tensor/replace_output → emit of each module's handler."""
    model, named = case.model, dict(case.model.named_parameters())
    slot_of = {id(named[n]): comp.layout[n] for n in case.names}
    claimed, hooks, rows = set(), [], []
    for module in model.modules():  # parents first: a parent's claim on a sub-module's parameter wins
        h = handler_for(module)
        mine = {} if h is None else {r: p for r, p in h.claims(module).items() if id(p) not in claimed}
        claimed.update(id(p) for p in mine.values())
        slots = {r: slot_of[id(p)] for r, p in mine.items()}
        if slots:
            assert h.supports(module) is None and h.couples_examples(module) is None
            hooks.append((module, h, slots))
    assert claimed >= set(slot_of), "a parameter of this case has no handler"
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for batch in case.batches:
            B = next(iter(batch.values())).shape[0]
            out, leaves = torch.zeros(B, comp.out_dim, dtype=torch.float64), []

            def hook(module, args, kwargs, output, h, slots):
                saved = h.capture_call(module, args, kwargs, output)
                t = h.output_tensor(module, output)
                if not t.requires_grad:
                    leaves.append(t.detach().requires_grad_())
                    t = leaves[-1].clone()
                    output = h.replace_output(module, output, t)
                t.register_hook(lambda d: h.emit(module, saved, d, slots, comp, out))
                return output

            handles = [m.register_forward_hook(lambda *a, h=h, s=s: hook(*a, h, s), with_kwargs=True)
                       for m, h, s in hooks]
            try:
                torch.autograd.grad(case.loss(model, batch).sum(), leaves)
            finally:
                for hd in handles:
                    hd.remove()
            rows.append(out)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.cat(rows)


@pytest.mark.parametrize("name,r", [("identity", None), ("dropout", 40), ("gaussian", 12), ("logra", 4), ("sjlt", 13)])
@pytest.mark.parametrize("arch", NEW_HANDLER_CASES)
def test_new_handlers_equal_every_compressors_matrix_path(arch, name, r):
    case = BUILDERS[arch](99)
    ref = M.reference_bs1(case.model, case.loss, case.batches, case.names)
    layout = dropinf.layout.Layout.from_model(case.model, case.names)
    comp = dropinf.compressor(name, dim=layout.dim, r=layout.dim if r is None else min(r, layout.dim), seed=5,
                              layout=layout)
    got, want = handler_rows(case, comp), comp.compress(ref)
    assert rel_err(got, want) < 1e-10
    if name == "identity":  # every parameter on its own, so a small one cannot hide behind a large one
        for slot in layout.slots:
            block = want[:, slot.offset:slot.stop]
            assert block.norm() > 0 and rel_err(got[:, slot.offset:slot.stop], block) < 1e-10, slot.name


def test_mha_weights_feeding_the_loss_are_refused_naming_the_module():
    case = BUILDERS["mha_weights_in_loss"](3)
    layout = dropinf.layout.Layout.from_model(case.model, case.names)
    with pytest.raises(dropinf.DropinfError, match="MultiheadAttention.*attention weights"):
        handler_rows(case, dropinf.compressor("identity", dim=layout.dim, r=layout.dim, layout=layout))


class _Scaled(nn.Embedding):
    """Rows times a factor, and zero at padded positions (Bart-style scaled word embedding)."""

    def forward(self, ids):
        return super().forward(ids) * 2.5 * (ids != 0).unsqueeze(-1)


class _Shifted(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) + 1.0


class _EmbeddingHead(nn.Module):
    def __init__(self, emb_cls):
        super().__init__()
        self.emb, self.head = emb_cls(11, 4), nn.Linear(4, 3)

    def forward(self, ids, mask):
        return self.head(torch.tanh(self.emb(ids)).sum(1))


def _embedding_case(cls):
    return _finish(_EmbeddingHead(cls), _cls_loss, _text_data(0), 0)


def test_scaled_embedding_subclass_is_exact():
    case = _embedding_case(_Scaled)
    layout = dropinf.layout.Layout.from_model(case.model, case.names)
    comp = dropinf.compressor("identity", dim=layout.dim, r=layout.dim, layout=layout)
    ref = M.reference_bs1(case.model, case.loss, case.batches, case.names)
    assert rel_err(handler_rows(case, comp), ref) < 1e-10


def test_embedding_whose_forward_adds_is_refused_naming_it():
    case = _embedding_case(_Shifted)
    layout = dropinf.layout.Layout.from_model(case.model, case.names)
    with pytest.raises(dropinf.DropinfError, match="_Shifted: its forward does more than look up"):
        handler_rows(case, dropinf.compressor("identity", dim=layout.dim, r=layout.dim, layout=layout))


def test_whole_call_handlers_refuse_an_engine_that_passes_only_the_first_input():
    mha = nn.MultiheadAttention(4, 2)
    with pytest.raises(dropinf.DropinfError, match="MultiheadAttention.*whole call"):
        handler_for(mha).capture(mha, torch.zeros(3, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_embedding_lookup_is_recognised_in_low_precision(dtype):
    emb = _Scaled(11, 4).to(dtype)
    ids = torch.tensor([[3, 0, 7], [10, 1, 1]])
    h = handler_for(emb)
    got_ids, scale = h.capture_call(emb, (ids,), {}, emb(ids))
    assert torch.equal(got_ids[ids != 0], ids[ids != 0])
    assert torch.equal(scale.float(), 2.5 * (ids != 0).float())
