"""Benchmark of `dropinf query`: n training rows at compressed size r, one query, on the CPU it runs on.

    python -m dropinf.bench query --n 10000 --r 4096 --out results/reference/bench/query_cpu.csv

The experiment is built by the workflow's own stages in a temporary results folder: prepared data
(n + m synthetic examples of `features` Gaussian inputs labelled by a random linear teacher: sizes,
not values, set the cost), an MLP fine-tuned on it (`hidden` units, so d >= r), the dropout
extraction at r (the stored arrays a query reads). Then, timed:

* `query_first`: the first query, which computes the preconditioned training rows and caches them;
* `query_cached_test_index`: a fresh `Attribution` (the cache read and checked) and one test row;
* `query_cached_new_input`: a fresh `Attribution`, the model and compressor loaded and checked, one
  new input's gradient (one forward+backward) and the product;
* `query_warm_new_input`: a new input in a process that has already answered one (`dropinf.query`
  keeps the loaded rows and model), i.e. one forward+backward plus the matrix-vector product.

Median of `repeats`; each query is checked against the cached rows' product. CSV with provenance.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(root: Path, n: int, m: int, features: int, hidden: int, r: int, seed: int = 0) -> None:
    """results/<experiment> with prepared data, a fine-tuned MLP and its dropout extraction at r."""
    from . import extract as ex
    from .common import Stage
    from .prepare import save_tensors
    from .train import finetune

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, features, generator=g)
    labels = (x @ torch.randn(features, 10, generator=g)).argmax(1)
    split = lambda a, b: {"x": x[a:b].contiguous(), "labels": labels[a:b].contiguous(),  # noqa: E731
                          "labels_clean": labels[a:b].contiguous(), "flipped": torch.zeros(b - a, dtype=torch.bool)}
    header = {"name": "synthetic", "task": "classification", "num_classes": 10, "meta": {"n_features": features},
              "label_noise": 0.0, "noise_seed": 0, "dataset_options": {},
              "provenance": Stage("prepare_data").provenance()}
    save_tensors(root / "data/dataset.pt", {"train": split(0, n), "test": split(n, n + m)}, header)
    finetune(data=root / "data/dataset.pt", out=root / "model/model.pt", metrics_out=root / "model/metrics.json",
             model="mlp", model_options={"hidden": [hidden]}, device="cpu", settings={"epochs": 1, "batch_size": 256})
    job = ex.ExtractJob(data=root / "data/dataset.pt", model=root / "model/model.pt",
                        out_dir=root / "grads/dropout" / f"r{r}", compressor="dropout", r=r, seeds=(0,), device="cpu",
                        experiment=root.name, batch_size=256)
    ex.extract(job=job)


def main(argv=None) -> None:
    from ..bench import provenance, write_csv
    from . import query as Q
    from .common import device_name

    ap = argparse.ArgumentParser(prog="python -m dropinf.bench query", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="training rows")
    ap.add_argument("--m", type=int, default=100, help="test rows")
    ap.add_argument("--r", type=int, default=4096)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128,
                    help="MLP width: d = (features + 1) * hidden + (hidden + 1) * 10")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="results/bench/query_cpu.csv")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="dropinf-query-bench-"))
    try:
        root = tmp / "results" / "query-bench"
        t0 = time.perf_counter()
        build(root, a.n, a.m, a.features, a.hidden, a.r)
        build_s = time.perf_counter() - t0
        np.save(tmp / "x.npy", np.random.default_rng(1).standard_normal(a.features).astype(np.float32))
        rows = []
        base = {"n_train": a.n, "r": a.r, "method": "dropout", "curvature": "layer", "damping": "paper",
                **provenance("cpu"), "device": device_name("cpu"), "cpu_model": cpu_model(),
                "torch_threads": torch.get_num_threads(), "python": platform.python_version()}

        def fresh(kind):
            att = Q.Attribution(root, "dropout", a.r, 0)
            if kind == "test_index":
                return att, att.scores(att.test_rows([0]))
            G = att.engine().gradients({"x": torch.from_numpy(np.load(tmp / "x.npy"))[None],
                                        "labels": torch.tensor([0])})
            return att, att.scores(G)

        t0 = time.perf_counter()
        att, first = fresh("test_index")
        first_s = time.perf_counter() - t0
        P = att.preconditioned()
        assert np.allclose(first[:, 0], -(P @ np.asarray(att.test[0:1], dtype=np.float64)[0]))
        dim = int(att.manifest["dim"])
        rows.append({**base, "path": "query_first", "dim": dim, "seconds": first_s,
                     "note": "computes and caches the preconditioned rows"})
        print(f"query first (cache built)       {first_s:8.3f} s", flush=True)
        for kind in ("test_index", "new_input"):
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                _, s = fresh(kind)
                times.append(time.perf_counter() - t0)
                assert np.isfinite(s).all() and s.shape == (a.n, 1)
            rows.append({**base, "path": f"query_cached_{kind}", "dim": dim, "seconds": statistics.median(times),
                         "seconds_max": max(times), "repeats": a.repeats})
            print(f"query cached, {kind:18s}{statistics.median(times):8.3f} s (max {max(times):.3f})", flush=True)
        import dropinf

        dropinf.query(root, "dropout", a.r, 0, image=tmp / "x.npy", label=0, k=10)  # loads rows and model once
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            df = dropinf.query(root, "dropout", a.r, 0, image=tmp / "x.npy", label=0, k=10)
            times.append(time.perf_counter() - t0)
        assert len(df) == 20
        rows.append({**base, "path": "query_warm_new_input", "dim": dim, "seconds": statistics.median(times),
                     "seconds_max": max(times), "repeats": a.repeats})
        print(f"query warm, new input           {statistics.median(times):8.3f} s (max {max(times):.3f})", flush=True)
        rows.append({**base, "path": "build_experiment", "dim": dim, "seconds": build_s,
                     "note": "prepare + 1-epoch finetune + dropout extraction (not part of a query)"})
        write_csv(rows, a.out)
        print(f"wrote {a.out}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
