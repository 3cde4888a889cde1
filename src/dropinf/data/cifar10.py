"""CIFAR-10 (the paper's ResNet-9 retraining setup): a seeded `n_train` subset (10,000) of the
50,000 training images and `n_test` (default: all 10,000) test images.

Reads the standard "python version" layout directly: a folder `cifar-10-batches-py/` holding
pickled `data_batch_1..5` and `test_batch` (dicts with b"data": uint8 (N, 3072), b"labels").
Those pickles are read by a restricted unpickler (`SafeUnpickler`) that can only rebuild plain
numpy arrays, dtypes and builtin containers: a file that names any other callable is refused
(a tampered batch cannot run code), as is an object-dtype array.
`root` may be that folder or its parent. With `download=True` and the folder missing, it is
fetched through torchvision (imported only then; torchvision is an optional extra). Images are
float32 (N, 3, 32, 32) in [0, 1], normalized with the usual per-channel CIFAR-10 mean/std.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DropinfError
from . import TaskData, register_dataset
from .cache import data_home, sha256_file, subsample

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
FOLDER = "cifar-10-batches-py"


def _find(root: Path) -> Path | None:
    for cand in (root, root / FOLDER):
        if (cand / "test_batch").exists():
            return cand
    return None


def locate(root=None, download: bool = False) -> Path:
    root = Path(root).expanduser() if root is not None else data_home() / "cifar10"
    found = _find(root)
    if found is not None:
        return found
    if not download:
        raise DropinfError(f"CIFAR-10 not found under {root} (expected {FOLDER}/data_batch_1..5 and test_batch); "
                           f"pass download=True (needs torchvision and internet) or root=<folder>")
    try:
        import torchvision
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise DropinfError(f"downloading CIFAR-10 needs torchvision (`pip install torchvision` matching your "
                           f"torch), which failed to import: {e}; or download cifar-10-python.tar.gz yourself "
                           f"and pass root=<folder holding {FOLDER}>") from None
    torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    found = _find(root)
    if found is None:
        raise DropinfError(f"torchvision downloaded CIFAR-10 but {root}/{FOLDER} is still incomplete")
    return found


#: the only globals a CIFAR-10 batch pickle needs: numpy's array reconstruction (numpy 1 and 2 names)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, bytes, str, numbers, lists and dicts only. Every other global (the
    way a pickle runs code: os.system, builtins.eval, ...) raises UnpicklingError."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DropinfError(f"{path} is not a plain CIFAR-10 batch ({e}); it is refused rather than unpickled "
                           f"freely (a pickle can run code). Use the official cifar-10-python.tar.gz, or convert "
                           f"your copy to that layout (dicts of a uint8 'data' array and a 'labels' list)") from None
    if not isinstance(d, dict):
        raise DropinfError(f"{path} is not a CIFAR-10 batch (a {type(d).__name__}, not a dict)")
    for v in d.values():
        if isinstance(v, np.ndarray) and v.dtype.hasobject:
            raise DropinfError(f"{path}: an object-dtype array is refused in a CIFAR-10 batch")
    return d


def read_batches(folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        path = folder / name
        if not path.exists():
            raise DropinfError(f"CIFAR-10 batch {path} is missing")
        d = load_batch(path)
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        if data is None or labels is None:
            raise DropinfError(f"{path} is not a CIFAR-10 batch (no data/labels)")
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
            raise DropinfError(f"{path}: data {data.shape} / {len(labels)} labels, expected (N, 3072) / N")
        xs.append(data)
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def to_tensor(data: np.ndarray, normalize: bool = True) -> torch.Tensor:
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float().div_(255.0)
    if normalize:
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous()


@register_dataset("cifar10")
def cifar10(n_train: int | None = 10000, n_test: int | None = None, seed: int = 0, normalize: bool = True,
            root=None, download: bool = False) -> TaskData:
    """Classification TaskData: x float32 (N, 3, 32, 32), labels int64 in 0..9."""
    folder = locate(root, download)
    splits, index = {}, {}
    for split, files, k, off in (("train", TRAIN_FILES, n_train, 0), ("test", TEST_FILES, n_test, 1)):
        data, labels = read_batches(folder, files)
        idx = subsample(len(labels), k, int(seed) + off, f"cifar10 {split}")
        splits[split] = {"x": to_tensor(data[idx], normalize), "labels": torch.from_numpy(labels[idx])}
        index[split] = idx.tolist()
    meta = {"source": {"path": str(folder), "sha256": {f: sha256_file(folder / f) for f in TRAIN_FILES + TEST_FILES}},
            "classes": CLASSES, "channels": 3, "size": 32, "normalize": bool(normalize), "mean": MEAN, "std": STD,
            "seed": int(seed), "source_index": index}
    return TaskData("cifar10", "classification", splits["train"], splits["test"], num_classes=10, meta=meta)
