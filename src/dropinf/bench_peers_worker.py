"""One peer of `python -m dropinf.bench peers`, alone in this process: its floor, then its extraction.

    python -m dropinf.bench_peers_worker --peer dattri-logra --opts '{"proj_dim": 64}' --out rows.json

Builds the workload (a language model from its config with random weights, seeded random token
ids), times on the same batches (a) the floor: batched forward + backward with every weight
gradient, no optimizer, and (b) the peer's per-example gradient compression of all the examples
through the peer's own public API, each as a whole pass over the examples (warm-up, then the median
of repeats; CUDA events) and its peak GPU memory. The output of the last pass is checked for its
shape and finiteness; dropinf's rows are also checked against per-example autograd. Writes one row
(a JSON object) to --out; a peer that cannot run here writes a row whose `status` says why.

The registry `PEERS` is read by the harness (`dropinf.bench_peers`) to check imports before any
process is started; the peers themselves are imported only inside their setup functions.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import bench
from .layout import select_parameters
from .models.lm import per_example_lm_loss


@dataclass
class Peer:
    package: str  # the distribution whose version is recorded
    modules: tuple[str, ...]  # importable modules it needs (checked before a process is started)
    method: str  # what is run, in words
    # (workload, opts) -> (compress_all, settings, extra columns); compress_all() -> (examples, width)
    setup: Callable = field(repr=False)
    linear: bool = False  # needs nn.Linear layers (transformers' Conv1D converted first)
    missing: Callable | None = None  # device -> why a part it needs on this device is absent, or None


@dataclass
class Workload:
    model: nn.Module
    loss_fn: Callable  # (model, batch) -> per-example losses [B]
    batches: list  # dicts {"input_ids": (B, T)} on the device
    device: torch.device
    tmp: Path  # scratch directory for peers that write files

    @property
    def ids(self) -> torch.Tensor:
        return torch.cat([b["input_ids"] for b in self.batches])


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers Conv1D (GPT-2's projections, weight stored (in, out)) with the
    nn.Linear computing the same function, in place: the hook-based peers only handle nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                w = child.weight
                lin = nn.Linear(w.shape[0], w.shape[1], bias=child.bias is not None, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return model


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _linear_scope(model) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))


# ---- dropinf ------------------------------------------------------------------------------------


def _dropinf(name, linear_only=False):
    def setup(w: Workload, opts):
        from .extraction import Extractor

        # linear_only: the weights and biases of the nn.Linear layers, the scope of dattri and LogIX
        # (GPT-2's lm_head weight is the tied input embedding: tracked whole)
        chosen = ([p for m in w.model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)]
                  if linear_only else None)
        names = [n for n, _ in select_parameters(w.model, chosen)]
        ex = Extractor(w.model, w.loss_fn, name, r=int(opts["r"]), seed=0, params=names)  # self-check as default
        err = bench.check_against_autograd(w.model, w.loss_fn, w.batches[0], names, {name: ex}, w.device)[name]

        def compress_all():
            rows = []
            ex.run(w.batches, sink=lambda start, x: rows.append(x), progress=False)
            return torch.cat(rows)
        settings = {"compressor": name, "r": int(opts["r"]), "params": "nn.Linear layers" if linear_only else "all"}
        return compress_all, settings, {"rel_err_vs_autograd": err, "tracked_params": ex.layout.dim}
    return setup


# ---- dattri -------------------------------------------------------------------------------------


def _dattri_task(w: Workload):
    from dattri.task import AttributionTask

    def loss_func(model, batch, device):
        # the batch mean, as dattri expects: its hooks scale by the batch size to get each
        # example's gradient of its own loss
        ids = batch["input_ids"].to(device)
        return per_example_lm_loss(model(input_ids=ids, use_cache=False).logits, ids).mean()

    # the checkpoint is the model's own weights (random init): dattri loads it before caching
    return AttributionTask(loss_func=loss_func, model=w.model, checkpoints=w.model.state_dict())


def _dattri_loader(w: Workload):
    from torch.utils.data import DataLoader

    # dict examples: dattri runs its setup forward as model(**batch) on a whole batch of them
    B = w.batches[0]["input_ids"].shape[0]
    return DataLoader([{"input_ids": x} for x in w.ids.cpu()], batch_size=B, shuffle=False)


def _dattri_cached(attributor, w: Workload, loader):
    def compress_all():
        attributor.cache(loader)
        cached = attributor.offload_manager.cached_gradients
        return torch.cat([cached[i] for i in range(len(loader))])
    return compress_all


def _sjlt_missing(device: torch.device) -> str | None:
    """dattri's FactGraSS projects with SJLT on CUDA: the `sjlt` package with its compiled extension."""
    if device.type != "cuda":
        return None
    try:
        import sjlt
    except ImportError as e:
        return f"sjlt (dattri's FactGraSS on CUDA needs it): {e}"
    return None if sjlt.EXTENSION_AVAILABLE else "sjlt without its CUDA extension (dattri's FactGraSS on CUDA needs it)"


def _dattri(kind):
    def setup(w: Workload, opts):
        from dattri.algorithm import BlockProjectedIFAttributor, FactGraSSAttributor, LoGraAttributor

        dev = w.device.type
        common = {"task": _dattri_task(w), "device": dev, "hessian": "Identity", "offload": "none",
                  "cache_dir": str(w.tmp)}
        if kind == "bpif-random-mask":
            k = int(opts["k"])
            attributor = BlockProjectedIFAttributor(
                **common, sparsifier_kwargs={"device": dev, "proj_dim": k, "proj_max_batch_size": 64,
                                             "proj_type": "random_mask"}, projector_kwargs=None)
            settings = {"sparsifier": f"random_mask {k}x{k} per layer", "projector": "identity"}
        elif kind == "logra":
            attributor = LoGraAttributor(**common, proj_dim=int(opts["proj_dim"]))
            k = math.isqrt(int(opts["proj_dim"]))
            settings = {"sparsifier": f"normal {k}x{k} per layer", "projector": "identity"}
        else:  # FactGraSS: random mask, then SJLT (a CUDA extension) on CUDA, a Gaussian on the CPU
            p, b = int(opts["proj_dim"]), int(opts["blowup"])
            attributor = FactGraSSAttributor(**common, proj_dim=p, blowup_factor=b)
            k = math.isqrt(p * b)
            settings = {"sparsifier": f"random_mask {k}x{k} per layer",
                        "projector": f"{'sjlt' if dev == 'cuda' else 'normal'} {p} per layer"}
        settings.update(hessian="Identity", offload="none", layers=len(attributor.layer_names))
        return _dattri_cached(attributor, w, _dattri_loader(w)), settings, {"tracked_params": _linear_scope(w.model)}
    return setup


# ---- traker -------------------------------------------------------------------------------------


def _traker(w: Workload, opts):
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput

    class LMLoss(AbstractModelOutput):
        """Model output f = the example's causal-LM loss, so the out-to-loss gradient Q is 1."""

        def __init__(self):
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, input_ids):
            ids = input_ids.unsqueeze(0)
            logits = torch.func.functional_call(model, (weights, buffers), args=(),
                                                kwargs={"input_ids": ids, "use_cache": False}).logits
            return per_example_lm_loss(logits, ids).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    n = sum(b["input_ids"].shape[0] for b in w.batches)
    B = w.batches[0]["input_ids"].shape[0]
    traker = TRAKer(model=w.model, task=LMLoss(), train_set_size=n, save_dir=str(w.tmp / "trak"),
                    load_from_save_dir=False, device=w.device.type, proj_dim=int(opts["proj_dim"]),
                    use_half_precision=w.model.dtype == torch.float16, proj_max_batch_size=min(32, B),
                    logging_level=40)
    checkpoint = w.model.state_dict()  # the model's own weights (random init), as for dattri
    model_id = [0]

    def compress_all():
        # a fresh model id per pass: TRAK skips examples already featurized for a model id
        traker.load_checkpoint(checkpoint, model_id=model_id[0])
        model_id[0] += 1
        for b in w.batches:
            traker.featurize(batch=[b["input_ids"]], num_samples=b["input_ids"].shape[0])
        return torch.from_numpy(traker.saver.current_store["grads"][:]).float()
    settings = {"projector": type(traker.projector).__name__, "proj_type": str(traker.projector.proj_type.value)
                if hasattr(traker.projector.proj_type, "value") else str(traker.projector.proj_type),
                "proj_dim": traker.proj_dim, "gradient_computer": "FunctionalGradientComputer (vmap)",
                "half_precision": traker.dtype == torch.float16}
    return compress_all, settings, {"tracked_params": traker.num_params_for_grad}


# ---- logix --------------------------------------------------------------------------------------


def _logix(w: Workload, opts):
    import yaml
    from logix import LogIX
    from logix.config import LoRAConfig

    config = w.tmp / "logix.yaml"
    config.write_text(yaml.safe_dump({"root_dir": str(w.tmp / "logix")}))
    rank = int(opts["rank"])
    run = LogIX(project="bench", config=str(config))
    run.watch(w.model)
    run.add_lora(lora_config=LoRAConfig(rank=rank))  # LoGra: random encoder/decoder, zero bottleneck
    run.setup({"grad": ["log"]})
    names = list(run.logger.modules_to_name.values())

    def compress_all():
        rows = []
        for i, b in enumerate(w.batches):
            ids = b["input_ids"]
            with run(data_id=list(range(i * ids.shape[0], (i + 1) * ids.shape[0]))):
                w.model.zero_grad(set_to_none=True)
                w.loss_fn(w.model, b).sum().backward()
            _, log = run.get_log()
            rows.append(torch.cat([log[m]["grad"].reshape(ids.shape[0], -1) for m in names], dim=1))
        return torch.cat(rows)
    settings = {"lora_rank": rank, "per_layer": f"{rank}x{rank}", "layers": len(names)}
    tracked = sum(p.numel() for n, p in w.model.named_parameters() if "logix_lora_B" in n)
    return compress_all, settings, {"tracked_params": tracked}


PEERS: dict[str, Peer] = {
    "dropinf-dropout": Peer("dropinf", ("dropinf",), "dropinf dropout (fused, all parameters)", _dropinf("dropout")),
    "dropinf-dropout-linear": Peer("dropinf", ("dropinf",), "dropinf dropout (fused, nn.Linear layers only)",
                                   _dropinf("dropout", linear_only=True), linear=True),
    "dropinf-sjlt": Peer("dropinf", ("dropinf",), "dropinf SJLT (fused, all parameters)", _dropinf("sjlt")),
    "dropinf-logra": Peer("dropinf", ("dropinf",), "dropinf LoGra (fused, all parameters)", _dropinf("logra")),
    "dropinf-logra-linear": Peer("dropinf", ("dropinf",), "dropinf LoGra (fused, nn.Linear layers only)",
                                 _dropinf("logra", linear_only=True), linear=True),
    "dattri-bpif-random-mask": Peer("dattri", ("dattri",), "dattri BlockProjectedIF, random-mask sparsifier, "
                                    "Linear layers", _dattri("bpif-random-mask"), linear=True),
    "dattri-logra": Peer("dattri", ("dattri",), "dattri LoGra, Linear layers", _dattri("logra"), linear=True),
    "dattri-factgrass": Peer("dattri", ("dattri",), "dattri FactGraSS, Linear layers", _dattri("factgrass"),
                             linear=True, missing=_sjlt_missing),
    "traker": Peer("traker", ("trak",), "TRAK featurize (vmap per-example gradients + JL projector), "
                   "all parameters", _traker),
    "logix-logra": Peer("logix-ai", ("logix", "einops"), "LogIX LoGra (LoRA bottleneck gradients), Linear layers",
                        _logix, linear=True),
}


# ---- the measurement ----------------------------------------------------------------------------


def measure(args) -> dict:
    peer = PEERS[args.peer]
    opts = json.loads(args.opts)
    if args.examples % args.batch:
        raise ValueError(f"--examples {args.examples} is not a multiple of --batch {args.batch}")
    device = torch.device(args.device)
    row = {"peer": args.peer, "path": args.peer, "package": peer.package, "package_version": _version(peer.package),
           "method": peer.method, "arch": args.arch, "dtype": args.dtype, "examples": args.examples,
           "batch": args.batch, "seq_len": args.seq, "worker_pid": os.getpid(),
           "model_layers": "nn.Linear" if peer.linear else "as built",
           "torch_compile": "off" if os.environ.get("TORCHDYNAMO_DISABLE") == "1" else "on"}
    why = peer.missing(device) if peer.missing else None
    if why:
        return {**row, "status": f"not installed: {why}"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, loss_fn, _ = bench.build_arch(args.arch, dtype, device)
    model.eval()
    if peer.linear:
        conv1d_to_linear(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(vocab, (args.batch, args.seq), generator=g).to(device)}
               for _ in range(args.examples // args.batch)]
    n = args.examples
    row.update(bench.provenance(device))
    params = list(model.parameters())

    def floor_pass():
        for b in batches:
            bench.floor_step(model, loss_fn, b, params)
    floor = bench.cuda_time(floor_pass, args.warmup, args.repeats)
    floor_mem, floor_reserved = bench.peak_mem(floor_pass, reserved=True)
    for p in params:
        p.grad = None
    row.update(floor_ms_per_example=1e3 * floor / n, floor_peak_gib=floor_mem, floor_reserved_gib=floor_reserved,
               floor_params=sum(p.numel() for p in params))
    with tempfile.TemporaryDirectory(prefix="dropinf-peer-") as tmp:
        w = Workload(model, loss_fn, batches, device, Path(tmp))
        compress_all, settings, extra = peer.setup(w, opts)
        row.update(settings=json.dumps(settings, sort_keys=True), **extra)
        held = []

        def timed():
            held[:] = [compress_all()]
        seconds = bench.cuda_time(timed, args.warmup, args.repeats)
        mem, reserved = bench.peak_mem(timed, reserved=True)
        out = held[0]
    finite = bool(torch.isfinite(out).all())
    shape_ok = out.dim() == 2 and out.shape[0] == n and out.shape[1] > 0
    # the columns of dropinf.bench's rows (`seconds` per batch, `r` the output width), so its table reads them
    row.update(seconds=seconds / len(batches), ms_per_example=1e3 * seconds / n, ratio_floor=seconds / floor,
               peak_gib=mem, mem_ratio_to_floor=mem / floor_mem if floor_mem == floor_mem else "",
               reserved_gib=reserved, reserved_ratio_to_floor=reserved / floor_reserved if reserved == reserved else "",
               r=out.shape[1] if out.dim() == 2 else "", out_shape="x".join(map(str, out.shape)), out_finite=finite)
    row["status"] = "ok" if finite and shape_ok else f"bad output: shape {tuple(out.shape)}, finite {finite}"
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dropinf.bench_peers_worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", required=True, choices=sorted(PEERS))
    ap.add_argument("--opts", default="{}", help="the peer's settings, a JSON object")
    ap.add_argument("--arch", default="gpt2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True, help="JSON file for the row")
    args = ap.parse_args(argv)
    try:
        row = measure(args)
    except Exception as e:  # the harness records it as this peer's row; the others still run
        traceback.print_exc()
        row = {"peer": args.peer, "status": f"error: {type(e).__name__}: {e}"[:300], "worker_pid": os.getpid()}
    tmp = args.out + ".tmp"
    Path(tmp).write_text(json.dumps(row, default=str))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
