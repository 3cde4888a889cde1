"""Stage `finetune`, and the training loop that the retraining evaluation reuses.

Training is deterministic for a given seed on a given device: the model is built from its seed,
and minibatch order comes from a seeded generator. Retraining after removing examples runs the
same loop with the same hyperparameters and seed on the remaining rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DropinfError
from ..progress import bar
from .commands import command, option
from .common import Stage, file_sha256, log, write_json
from .prepare import load_prepared, load_tensors, model_inputs, save_tensors, task_data


class Batches:
    """Minibatches (dicts of tensors) over rows of a split, in order unless `shuffle`.

    Usable as the `loader` of `dropinf.extract`: `len(batches.dataset)` is the number of rows."""

    def __init__(self, split: dict, batch_size: int, indices=None, shuffle: bool = False, seed: int = 0):
        self.split = split
        n = next(iter(split.values())).shape[0]
        self.indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(int(seed))
        self.dataset = range(len(self.indices))

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            # the permutation always comes from the CPU generator: the same order on every device
            order = order[torch.randperm(len(order), generator=self.generator)]
        where = next(iter(self.split.values())).device
        if order.device != where:  # data resident on a GPU: one index copy per epoch, not one per batch
            order = order.to(where)
        for i in range(0, len(order), self.batch_size):
            rows = order[i:i + self.batch_size]
            yield {k: v[rows] for k, v in self.split.items()}


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def build(blob: dict, model: str, model_options: dict | None, seed: int, init: dict | str | None = None):
    """The registered model, initialised from `seed` unless the options name an `init_seed`.

    `init`: start from the weights of another training run instead (the `pretrain` stage's model.pt):
    its path, or {"path", "sha256"} as recorded by `finetune` (the file must still match)."""
    from ..models import build_model

    spec = build_model(model, task_data(blob), **{"init_seed": int(seed), **(model_options or {})})
    if init is not None:
        load_init(spec, init)
    return spec


def init_record(path) -> dict:
    """What `finetune` records about the weights it started from."""
    return {"path": str(path), "sha256": file_sha256(path)}


def load_init(spec, init: dict | str) -> None:
    """Load the weights saved by an earlier `finetune` (e.g. the pretraining run) into `spec.module`."""
    rec = init if isinstance(init, dict) else {"path": str(init)}
    path = Path(rec["path"])
    if not path.is_file():
        raise DropinfError(f"initial weights {path} (from the pretrain stage) do not exist")
    if rec.get("sha256") and file_sha256(path) != rec["sha256"]:
        raise DropinfError(f"initial weights {path} changed since the model was fine-tuned from them (sha256 "
                           f"differs); rerun finetune")
    state = load_weights(path)[1]
    try:
        spec.module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DropinfError(f"initial weights {path} do not fit the model (pretrain and finetune must build the "
                           f"same architecture and vocabulary): {' '.join(first[:3])}") from None


class _Optimizer:
    """Adam / AdamW / SGD with momentum, the textbook updates (PyTorch's defaults: betas (0.9, 0.999),
    eps 1e-8, Adam's weight decay added to the gradient, AdamW's decoupled).

    Why not torch.optim: constructing any torch.optim optimizer imports torch._dynamo (about 1.5 s
    on a laptop CPU), paid by every finetune and retraining job; these updates cost nothing to load."""

    def __init__(self, params, kind: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        if kind not in ("adam", "adamw", "sgd"):
            raise DropinfError(f"finetune.optimizer must be adam, adamw or sgd, got {kind!r}")
        self.params, self.kind, self.lr, self.wd = list(params), kind, float(lr), float(weight_decay)
        self.momentum, self.betas, self.eps, self.t = momentum, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params] if kind != "sgd" else None

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        """One update of every parameter that has a gradient, as multi-tensor (foreach) operations:
        a handful of kernel launches per step on a GPU instead of several per parameter."""
        self.t += 1
        b1, b2 = self.betas
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        ps = [self.params[i] for i in live]
        gs = [p.grad for p in ps]
        ms = [self.m[i] for i in live]
        if self.kind == "adamw":
            torch._foreach_mul_(ps, 1 - self.lr * self.wd)
        elif self.wd:
            gs = torch._foreach_add(gs, ps, alpha=self.wd)
        if self.kind == "sgd":
            torch._foreach_mul_(ms, self.momentum)
            torch._foreach_add_(ms, gs)
            torch._foreach_add_(ps, ms, alpha=-self.lr)
            return
        vs = [self.v[i] for i in live]
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        denom = torch._foreach_div(vs, 1 - b2 ** self.t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, ms, denom, value=-self.lr / (1 - b1 ** self.t))


def lr_factor(step: int, total: int, schedule: str = "constant", warmup_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based) of `total`.

    "constant": 1, after a linear warmup over the first `warmup_ratio` of the steps when > 0.
    "linear": the same warmup, then linear decay to 0 at the last step (the schedule of
    transformers' `get_linear_schedule_with_warmup`, which DataInf's GLUE fine-tuning uses)."""
    if schedule not in ("constant", "linear"):
        raise DropinfError(f"finetune.schedule must be 'constant' or 'linear', got {schedule!r}")
    warm = float(warmup_ratio) * total
    if step < warm:
        return step / warm
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1.0, total - warm))


def fit(spec, split: dict, *, epochs: int, batch_size: int, lr: float, weight_decay: float = 0.0,
        optimizer: str = "adam", seed: int = 0, device=torch.device("cpu"), indices=None, log_every: int = 0,
        schedule: str = "constant", warmup_ratio: float = 0.0):
    """Train `spec.module` in place on rows `indices` of `split`; returns the per-epoch mean losses.

    `schedule`/`warmup_ratio`: the learning-rate schedule over all steps (see `lr_factor`).

    On a GPU the split is moved there once (a no-op when it already is), convolutional models run
    channels-last with cuDNN autotuning, and the loss is summed on the device and read once per
    epoch, so the host never waits on the device inside an epoch."""
    device = torch.device(device)
    module = spec.module.to(device)
    split = _to(split, device)
    channels_last = device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    if channels_last:
        torch.backends.cudnn.benchmark = True
        module.to(memory_format=torch.channels_last)
        split = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and v.is_floating_point() else v
                 for k, v in split.items()}
    opt = _Optimizer([p for p in module.parameters() if p.requires_grad], optimizer, lr, weight_decay)
    batches = Batches(split, batch_size, indices=indices, shuffle=True, seed=seed)
    total_steps, step = int(epochs) * len(batches), 0
    scheduled = schedule != "constant" or float(warmup_ratio) > 0
    history = []
    module.train()
    shown = bar(total=total_steps, desc="train", unit="step")
    for epoch in range(int(epochs)):
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in batches:
            loss = spec.loss_fn(module, batch)
            opt.zero_grad()
            loss.mean().backward()
            if scheduled:
                opt.lr = float(lr) * lr_factor(step, total_steps, schedule, warmup_ratio)
            opt.step()
            step += 1
            total += loss.detach().sum()
            count += loss.shape[0]
            shown.update()
        history.append(float(total) / max(1, count))
        shown.set_postfix_str(f"epoch {epoch + 1}/{epochs}, train loss {history[-1]:.4f}", refresh=False)
        if not math.isfinite(history[-1]):
            raise DropinfError(f"training diverged at epoch {epoch + 1} (loss {history[-1]}); lower the learning rate")
        if log_every and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
            log.info("epoch %d/%d: train loss %.4f", epoch + 1, epochs, history[-1])
    shown.close()
    if channels_last:
        module.to(memory_format=torch.contiguous_format)
    module.eval()
    return history


@torch.no_grad()
def accuracy(spec, split: dict, device, labels=None, batch_size: int = 1024) -> float:
    """Fraction of rows whose argmax prediction equals `labels` (default: the split's labels)."""
    if spec.logits_fn is None:
        raise DropinfError("accuracy needs a classification model (ModelSpec.logits_fn)")
    module = spec.module.to(device).eval()
    preds = []
    for batch in Batches(split, batch_size):
        preds.append(spec.logits_fn(module, _to(batch, device)).argmax(-1))
    preds = torch.cat(preds)
    labels = (split["labels"] if labels is None else labels).to(preds.device)
    return float((preds == labels).float().mean())


@torch.no_grad()
def mean_loss(spec, split: dict, device, batch_size: int = 1024) -> float:
    module = spec.module.to(device).eval()
    total, count = 0.0, 0
    for batch in Batches(split, batch_size):
        loss = spec.loss_fn(module, _to(batch, device))
        total += float(loss.sum())
        count += loss.shape[0]
    return total / max(1, count)


def n_rows(split: dict) -> int:
    return int(next(iter(split.values())).shape[0])


def train_settings(finetune: dict) -> dict:
    keys = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "seed", "schedule", "warmup_ratio")
    return {k: finetune[k] for k in keys if k in finetune}


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    data: Path = option("prepared data")
    out: Path = option("model.pt to write")
    metrics_out: Path = option("metrics JSON to write", flag="--metrics")
    model: str = option("registered model name")
    model_options: dict | None = option("JSON keyword options of the model builder", default=None)
    settings: dict | None = option("JSON: epochs, batch_size, lr, weight_decay, optimizer, seed, schedule, "
                                   "warmup_ratio", default=None, flag="--train")
    init: Path | None = option("start from this model.pt of an earlier run (the pretrain stage)", default=None)
    device: str = option("torch device, or 'auto'", default="auto")
    threads: int | None = option("torch CPU threads", default=None)


@command("finetune", FinetuneOptions, help="train the model on the prepared training split")
def finetune(*, data, out, metrics_out, model: str, model_options: dict | None = None, settings: dict | None = None,
             init=None, device: str = "auto", threads: int | None = None) -> dict:
    """Train `model` on the prepared data with `settings` (fit's keywords: epochs, lr, ...); `init`:
    start from another run's saved weights (pretraining)."""
    stage = Stage("finetune", device=device, threads=threads)
    blob = load_prepared(data)
    settings = {"epochs": 30, "batch_size": 64, "lr": 1e-2, "weight_decay": 0.0, "optimizer": "adam", "seed": 0,
                **(settings or {})}
    init = None if init is None else init_record(init)
    spec = build(blob, model, model_options, settings["seed"], init)
    train, test = model_inputs(blob["train"]), model_inputs(blob["test"])
    n_params = sum(p.numel() for p in spec.module.parameters() if p.requires_grad)
    log.info("model %s (%d trainable parameters) on %d examples: %s", model, n_params,
             train["labels"].shape[0] if "labels" in train else -1, settings)
    check_planned_extractions(spec)
    # where training starts (the pretrained model's loss on this test split, when there is one)
    start = {} if init is None else {"initial_test_loss": mean_loss(spec, test, stage.device)}
    history = fit(spec, train, device=stage.device, log_every=max(1, settings["epochs"] // 5), **settings)
    metrics = {"final_train_loss": history[-1], "test_loss": mean_loss(spec, test, stage.device), **start,
               "n_train": n_rows(train), "n_test": n_rows(test)}
    if spec.logits_fn is not None:
        metrics["test_accuracy"] = accuracy(spec, test, stage.device)
        metrics["train_accuracy"] = accuracy(spec, train, stage.device)
        if "labels_clean" in blob["train"]:
            metrics["train_accuracy_clean_labels"] = accuracy(spec, train, stage.device, blob["train"]["labels_clean"])
    log.info("finetune done: %s", {k: round(v, 4) for k, v in metrics.items()})
    if init is not None:
        log.info("started from the weights in %s", init["path"])
    record = {"model": model, "model_options": dict(model_options or {}), "train": settings, "init": init,
              "n_params": n_params, "metrics": metrics, "history": history}
    save_weights(out, spec.module, {**record, "provenance": stage.provenance()})
    write_json(metrics_out, {**record, "provenance": stage.provenance()})
    return metrics


#: Set by the workflow for `finetune`: the compressed extractions the config plans, as JSON
#: {compressor: {"r": [...], "options": {...}}}, checked against the model before training (not a
#: rule parameter: changing r must not rerun fine-tuning).
ENV_PLANNED = "DROPINF_PLANNED_EXTRACTIONS"


def check_planned_extractions(spec, planned: dict | None = None) -> None:
    """Build every planned compressor for the model's tracked parameters (cheap: index draws, no
    projection matrices) so that an r the model cannot take (r > d, ...) fails now, not after
    training."""
    import json
    import os

    from ..compressors import COMPRESSORS, Compressor, compressor
    from ..layout import Layout

    if planned is None:
        planned = json.loads(os.environ.get(ENV_PLANNED) or "{}")
    if not planned:
        return
    layout = Layout.from_model(spec.module, spec.params)
    for name, plan in planned.items():
        for r in plan.get("r", []):
            if int(r) > layout.dim:
                raise DropinfError(f"config 'r' = {r} exceeds d = {layout.dim}, the number of tracked parameters of "
                                   f"this model ({name} compresses d coordinates to r): choose r <= {layout.dim}")
            if COMPRESSORS[name].prepare_options.__func__ is not Compressor.prepare_options.__func__:
                continue  # its options come from the data (a probe) at extraction: r <= d is all to check now
            try:
                compressor(name, dim=layout.dim, r=r, seed=0, layout=layout, **plan.get("options", {}))
            except (DropinfError, TypeError) as e:
                raise DropinfError(f"config 'r' = {r} does not fit compressor {name} on this model (d = {layout.dim} "
                                   f"tracked parameters): {e}") from None


def save_weights(path, module: torch.nn.Module, record: dict) -> None:
    """The module's state dict as safetensors (no pickle), with `record` (what built and trained it)
    as JSON in the header. Tied parameters are stored once per name (safetensors refuses shared
    storage); loading copies the same values into both."""
    save_tensors(path, {"state_dict": module.state_dict()}, record)


def load_weights(path) -> tuple[dict, dict]:
    """(record, state dict) of weights written by `save_weights`."""
    record, groups = load_tensors(path, "model weights")
    return record, groups["state_dict"]


def load_saved(path) -> dict:
    """The record of a `finetune` run with its "state_dict"."""
    record, state = load_weights(path)
    return {**record, "state_dict": state}


def load_trained(model_path, blob: dict, device=torch.device("cpu")):
    """Rebuild the fine-tuned model (ModelSpec) saved by `finetune`."""
    saved = load_saved(model_path)
    spec = build(blob, saved["model"], saved["model_options"], saved["train"].get("seed", 0))
    spec.module.load_state_dict(saved["state_dict"])
    spec.module.to(device).eval()
    return spec, saved
