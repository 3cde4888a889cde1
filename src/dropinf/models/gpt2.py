"""GPT-2 architecture (transformers `GPT2LMHeadModel`) for the language-model experiments.

`build_model("gpt2", data, config="small")` builds from a config: "small" is GPT-2 small (12
layers, 768 wide, 12 heads: 124M parameters with GPT-2's vocabulary), "mini" (4 x 256, 4 heads)
and "tiny" (2 x 64, 2 heads) are for offline work and tests; a dict overrides any GPT2Config
field. The vocabulary size comes from `data.meta["vocab_size"]` (e.g. the Austen BPE) unless given.
Weights: `pretrained=` a hub id ("gpt2") or a `save_pretrained` folder (e.g. the model pretrained
on the Austen novels), else random init under `init_seed`.

Per-example loss: mean next-token cross-entropy over the example's real tokens; position ids are
counted over real tokens, so padding on either side leaves each example's loss unchanged.
Dropout is GPT-2's 0.1 unless `dropout=` says otherwise; gradient extraction must run the model
in eval mode (then dropout is off).
"""
from __future__ import annotations

from . import ModelSpec, register_model
from ..errors import DropinfError
from .lm import causal_lm_loss, data_meta, hf, parse_dtype, seeded

CONFIGS = {
    "small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
    "mini": {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 512},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 256},
}
CONFIGS["gpt2"] = CONFIGS["small"]
GPT2_VOCAB = 50257


def gpt2_config(config="small", vocab_size: int | None = None, dropout: float | None = None, meta=None, **overrides):
    transformers = hf()
    if isinstance(config, str):
        if config not in CONFIGS:
            raise DropinfError(f"gpt2 config must be one of {sorted(CONFIGS)} or a dict, got {config!r}")
        fields = dict(CONFIGS[config])
    elif isinstance(config, dict):
        fields = dict(CONFIGS["small"], **config)
    else:
        raise DropinfError(f"gpt2 config must be a name or a dict, got {type(config).__name__}")
    meta = meta or {}
    fields["vocab_size"] = int(vocab_size or meta.get("vocab_size") or fields.get("vocab_size") or GPT2_VOCAB)
    seq_len = meta.get("seq_len")
    if seq_len and int(seq_len) > fields.get("n_positions", 1024):
        fields["n_positions"] = int(seq_len)
    for key in ("eos_token_id", "pad_token_id"):
        if meta.get(key) is not None:
            fields.setdefault(key, int(meta[key]))
    if "eos_token_id" in fields:
        fields.setdefault("bos_token_id", fields["eos_token_id"])
    if dropout is not None:
        fields.update(resid_pdrop=float(dropout), embd_pdrop=float(dropout), attn_pdrop=float(dropout))
    fields.update(overrides)
    return transformers.GPT2Config(**fields)


@register_model("gpt2")
def gpt2(data=None, config="small", pretrained: str | None = None, vocab_size: int | None = None,
         dropout: float | None = None, init_seed: int = 0, dtype="float32", attn_implementation: str = "sdpa",
         params: list[str] | None = None, **overrides) -> ModelSpec:
    transformers = hf()
    meta = data_meta(data)
    torch_dtype = parse_dtype(dtype)
    if pretrained:
        try:
            model = transformers.GPT2LMHeadModel.from_pretrained(str(pretrained), dtype=torch_dtype,
                                                                 attn_implementation=attn_implementation)
        except OSError as e:
            raise DropinfError(f"could not load GPT-2 weights {pretrained!r} (not a local folder, and the hub "
                               f"is unreachable or has no such repo): {e}") from None
        if dropout is not None:
            for m in model.modules():
                if type(m).__name__ == "Dropout":
                    m.p = float(dropout)
    else:
        cfg = gpt2_config(config, vocab_size, dropout, meta, **overrides)
        cfg._attn_implementation = attn_implementation
        with seeded(init_seed):
            model = transformers.GPT2LMHeadModel(cfg)
        model = model.to(torch_dtype)
    need = meta.get("vocab_size")
    if need and int(need) > model.config.vocab_size:
        raise DropinfError(f"data vocabulary ({need}) exceeds the model's ({model.config.vocab_size}): "
                           f"the data was tokenized for another model")
    return ModelSpec(module=model, loss_fn=causal_lm_loss, logits_fn=None, params=params)
