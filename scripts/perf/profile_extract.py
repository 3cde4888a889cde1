"""Where does fused extraction spend its time? torch.profiler over floor vs fused dropout.

    python scripts/perf/profile_extract.py --arch gpt2 --dtype float32 --r 512
Prints per path: wall ms per batch, summed CUDA kernel ms, kernel count, top kernels.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dropinf.bench import build_arch, floor_step
from dropinf.extraction import Extractor
from dropinf.layout import select_parameters

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="gpt2")
ap.add_argument("--dtype", default="float32")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--r", type=int, default=512)
ap.add_argument("--top", type=int, default=18)
a = ap.parse_args()

dev = torch.device("cuda")
torch.manual_seed(0)
model, loss_fn, make = build_arch(a.arch, getattr(torch, a.dtype), dev)
model.eval()
batch = make(a.batch, torch.Generator().manual_seed(1))
params = [p for _, p in select_parameters(model, None)]
ex = Extractor(model, loss_fn, "dropout", r=a.r, seed=0)


def fused():
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(False)
        try:
            ex._fused(batch, torch.float32)
        finally:
            for p in params:
                p.requires_grad_(True)


paths = {"floor": lambda: floor_step(model, loss_fn, batch, params), "fused_dropout": fused}
for name, fn in paths.items():
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 3
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kern = sum(e.self_device_time_total for e in events) / 3 / 1e3
    count = sum(e.count for e in events) / 3
    print(f"\n=== {name}: wall {wall*1e3:.1f} ms/batch, CUDA kernels {kern:.1f} ms/batch, {count:.0f} kernels/batch")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: a.top]:
        print(f"  {e.self_device_time_total/3/1e3:8.2f} ms  x{e.count/3:6.0f}  {e.key[:110]}")
