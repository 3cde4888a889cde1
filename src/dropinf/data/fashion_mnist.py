"""Fashion-MNIST, offline: Debian `dataset-fashion-mnist` (MIT; 60,000 train / 10,000 test 28x28
grey images, 10 classes) under `/usr/share/datasets/fashion-mnist/*.gz` (IDX format).

`fashion_mnist` draws a seeded `n_train` subset (10,000) of the training images and a seeded
`n_test` subset (256) of the test images, the stand-in for the paper's CIFAR-10 retraining setup.
Images are float32 (N, 1, size, size): pixels scaled to [0, 1], zero-padded from 28 to `size`
(default 32, the CIFAR geometry ResNet-9 expects; `size=28` keeps them as they are), then
normalized with the training set's mean and std (0.2860, 0.3530, over all 60,000 images).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import DropinfError
from . import TaskData, register_dataset
from .cache import debian_data_dir, source_info, subsample

PACKAGE = "dataset-fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images, pixels in [0, 1]


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (uint8 data: images or labels)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DropinfError(f"{path} is not an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DropinfError(f"{path}: IDX type 0x{dtype_code:02x} is not unsigned bytes")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DropinfError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_file, lab_file = FILES[split]
    images, labels = read_idx(folder / img_file), read_idx(folder / lab_file)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DropinfError(f"fashion-mnist {split}: images {images.shape} and labels {labels.shape} disagree")
    return images, labels


def to_tensor(images: np.ndarray, size: int = 32, normalize: bool = True) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, size, size), zero-padded (before normalizing)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    h = x.shape[-1]
    if size != h:
        if size < h or (size - h) % 2:
            raise DropinfError(f"fashion_mnist: size must be {h} or {h} + an even number, got {size}")
        p = (size - h) // 2
        x = torch.nn.functional.pad(x, (p, p, p, p))
    if normalize:
        x = (x - MEAN) / STD
    return x.contiguous()


@register_dataset("fashion_mnist")
def fashion_mnist(n_train: int | None = 10000, n_test: int | None = 256, seed: int = 0, size: int = 32,
                  normalize: bool = True, root=None, fetch: bool | None = None) -> TaskData:
    """Classification TaskData: x float32 (N, 1, size, size), labels int64 in 0..9."""
    folder = debian_data_dir(PACKAGE, root=root, fetch=fetch)
    splits, index = {}, {}
    for split, k, off in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = read_split(folder, split)
        idx = subsample(len(labels), k, int(seed) + off, f"fashion_mnist {split}")
        splits[split] = {"x": to_tensor(images[idx], size, normalize),
                         "labels": torch.from_numpy(labels[idx].astype(np.int64))}
        index[split] = idx.tolist()
    meta = {"source": source_info(PACKAGE, folder, [f for pair in FILES.values() for f in pair]),
            "classes": CLASSES, "size": int(size), "channels": 1, "normalize": bool(normalize),
            "mean": MEAN, "std": STD, "seed": int(seed), "source_index": index}
    return TaskData("fashion_mnist", "classification", splits["train"], splits["test"], num_classes=10, meta=meta)
