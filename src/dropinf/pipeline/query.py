"""`dropinf query` and stage `attribute`: which training examples explain one prediction.

    dropinf query results/digits-mlp --method dropout --r 64 --seed 0 --test-index 5 --k 5
    dropinf query results/<exp> --method dropout --r 16 --text "tasty and fresh" --csv out.csv
    dropinf query results/<exp> --method orig --image digit.png --json out.json

A query example q gets the score of every training example z_k,

    I(z_k, q) = -g_q^T (H + lambda I)^{-1} g_k        (positive = harmful, negative = helpful)

with the stored training arrays of one finished extraction (method, r, seed), the curvature blocks
(`score.curvature`) and damping of the score stage. The training side of that product does not
depend on the query: the rows P = G (H + lambda I)^{-1} (n x k, block-diagonal, dense blocks by
Cholesky of the k_b x k_b system, blocks wider than n by Woodbury: P_b = n (n lambda I + G_b G_b^T)^{-1}
G_b) are computed once and cached beside the arrays (`grads/<compressor>/<rtag>/preconditioned/`),
so a query costs its own gradient (one forward+backward through the same model, compressor and
extraction code as the stored arrays; none for a test-split index, whose row is stored) and one
matrix-vector product. Scores equal column j of `dropinf.influence(train, test, "exact",
reduce=False)` on the same arrays (tests/pipeline/test_query.py).

Cache: one directory per (seed, settings) named by a hash of everything it depends on (the
extraction's manifest, which changes whenever its arrays are rewritten, the array, method, blocks,
damping, Woodbury mode, dtype, this module's format version); `rows.npy` plus `cache.json` (the key,
shape, dtype, crc32 of the bytes), written under a temporary name and renamed into place. A read
checks the key and the checksum; a stale or damaged cache is rebuilt. (Plain .npy, not Zarr: the
query benchmark reads 10,000 x 4,096 float64 rows in well under a second.)

Stage `attribute` (workflow target `attribute`): every test example's top-k helpful and harmful
training examples, `attributions/<method>/<rtag>/<seed<s>|unseeded>/topk.csv`.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DropinfError
from .commands import DAMPING, INT, RSIZE, command, option
from .common import atomic_path, file_sha256, jsonable, log, read_json, write_json
from .methods import COMPRESSED, extraction_of, rtag, solver_of

#: methods a query can answer: the exact r-space solve of every compressed method, and `orig`
QUERYABLE = COMPRESSED + ("orig",)
CACHE_DIR = "preconditioned"
CACHE_FORMAT = 1
#: compressor attributes that describe the run, not the compression (compared loosely or not at all)
VOLATILE_ATTRS = ("probe_seconds",)
DIRECTIONS = ("helpful", "harmful")
QUERY_SIGN = ("score = -g_query^T (H + lambda I)^-1 g_train: positive = up-weighting the training example "
              "raises the query's loss (harmful), negative = lowers it (helpful)")


class QueryError(DropinfError, ValueError):
    """A query that cannot be answered as asked (method, inputs, stored arrays)."""


def seed_tag(method: str, seed) -> str:
    """Path segment of an attribution: 'seed<s>' for seeded methods, 'unseeded' for orig."""
    return "unseeded" if method not in COMPRESSED else f"seed{int(seed)}"


def _crc32(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


# ---- the preconditioned training rows -------------------------------------------------------------

def preconditioned_rows(train, blocks, damping="paper", woodbury="auto", dtype=torch.float64,
                        chunk_rows: int | None = None) -> tuple[np.ndarray, list[float]]:
    """(P, lambdas): P = G (H + lambda I)^{-1} (n, k) in train's column order, block-diagonal over
    `blocks` (as `dropinf.influence`), so that -P @ q is the exact solver's scores of query row q."""

    from ..influence import Exact, Problem, _cholesky, _setup

    rows, blk, damp, _ = _setup(train, blocks, damping, chunk_rows, "cpu", dtype)
    n = rows.n
    G = torch.empty(n, rows.k, dtype=dtype)
    for a, b, c in rows.chunks():  # checked for NaN/inf as read; columns permuted so blocks are contiguous
        G[a:b] = c
    which = list(range(len(blk)))
    lams = Exact(Problem(rows, blk, damp))._lambda(which, [G[:, lo:hi].square().sum().item() for lo, hi in blk.bounds])
    for b, ((lo, hi), lam) in enumerate(zip(blk.bounds, lams)):
        Gb = G[:, lo:hi]
        if woodbury is True or (woodbury == "auto" and n < hi - lo):
            K = Gb @ Gb.T
            K.diagonal().add_(n * lam)
            L = _cholesky(K, blk.labels[b] + " (Woodbury n x n system)", lam)
            G[:, lo:hi] = n * torch.cholesky_solve(Gb, L)
        else:
            H = Gb.T @ Gb / n
            H.diagonal().add_(lam)
            L = _cholesky(H, blk.labels[b], lam)
            G[:, lo:hi] = torch.cholesky_solve(Gb.T.contiguous(), L).T
    P = G.numpy()
    if blk.perm is not None:
        out = np.empty_like(P)
        out[:, blk.perm.numpy()] = P
        P = out
    return P, [float(x) for x in lams]


# ---- one finished extraction, ready to answer queries ----------------------------------------------

@dataclass(frozen=True)
class Settings:
    """How the score stage solved: curvature blocks, damping and the exact solver's Woodbury mode."""

    curvature: str = "layer"
    damping: object = "paper"
    woodbury: object = "auto"

    @classmethod
    def of_score_stage(cls, results_dir, method: str, r, curvature=None, damping=None, options=None) -> "Settings":
        """The settings the score stage recorded for (method, r) when it has run, else the defaults;
        explicit arguments win."""
        path = Path(results_dir) / "scores" / method / rtag(r) / "manifest.json"
        rec = read_json(path) if path.exists() else {}
        # of dropinf.influence's options only `woodbury` changes the exact solve (the others are LiSSA's)
        opts = options if options is not None else rec.get("options") or {}
        return cls(curvature=curvature or rec.get("curvature") or "layer",
                   damping=damping if damping is not None else rec.get("damping", "paper"),
                   woodbury=opts.get("woodbury", "auto"))


class Attribution:
    """The stored arrays of one (experiment, method, r, seed), their cached preconditioned rows, and
    (loaded on first use) the model and compressor that compute a new query's gradient."""

    def __init__(self, results_dir, method: str, r=None, seed=0, *, settings: Settings | None = None,
                 device: str | None = None):
        from ..layout import check_curvature
        from .extract import load_split
        from .storage import read_manifest

        if method not in QUERYABLE:
            raise QueryError(f"query: method {method!r} is not supported; queries use the exact solve of "
                             f"{', '.join(QUERYABLE)} (lissa, datainf and tracin approximate the solve per "
                             f"test set; random has no gradients)")
        self.root = Path(results_dir)
        if not self.root.is_dir():
            raise QueryError(f"query: {self.root} is not a results directory (expected results/<experiment>)")
        self.method, self.settings = method, settings or Settings()
        check_curvature(self.settings.curvature, "score.curvature")
        self.compressor = extraction_of(method)
        self.r = None if method == "orig" else (None if r is None else int(r))
        if method != "orig" and self.r is None:
            raise QueryError(f"query: method {method!r} needs --r (one of the compressed sizes that ran)")
        self.grads_dir = self.root / "grads" / self.compressor / rtag(self.r)
        try:
            self.manifest = read_manifest(self.grads_dir)
        except (OSError, ValueError):
            raise QueryError(f"query: no finished extraction at {self.grads_dir} (manifest.json missing or "
                             f"unreadable); run the workflow for {method} {rtag(self.r)} first") from None
        if self.manifest.get("status") != "complete":
            raise QueryError(f"query: the {self.compressor} extraction in {self.grads_dir} was skipped "
                             f"({self.manifest.get('reason', 'unknown reason')}); its arrays do not exist")
        self.seed = None if method == "orig" else int(seed)
        if str(self.seed) not in self.manifest["arrays"]:
            raise QueryError(f"query: {self.grads_dir} holds seeds {self.manifest.get('seeds')}, not {self.seed}")
        self.train = load_split(self.grads_dir, self.manifest, self.seed, "train")
        self.test = load_split(self.grads_dir, self.manifest, self.seed, "test")
        self.n, self.k = (int(s) for s in self.train.shape)
        self.device = device
        self.data_path, self.model_path = self.root / "data" / "dataset.pt", self.root / "model" / "model.pt"
        self._P = None
        self._blob = None
        self._engine = None

    # ---- the cached training side ------------------------------------------------------------
    def blocks(self) -> dict:
        from .score import solve_blocks

        return solve_blocks(self.method, self.manifest, self.train, self.settings.curvature)

    def cache_key(self) -> dict:
        s = self.settings
        return {"format": CACHE_FORMAT, "method": self.method, "solver": solver_of(self.method),
                "seed": self.seed, "array": self.manifest["arrays"][str(self.seed)]["train"],
                "manifest_sha256": file_sha256(self.grads_dir / "manifest.json"), "shape": [self.n, self.k],
                "curvature": s.curvature, "damping": s.damping, "woodbury": s.woodbury, "dtype": "float64"}

    def cache_path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.grads_dir / CACHE_DIR / f"{seed_tag(self.method, self.seed)}-{digest}"

    def preconditioned(self) -> np.ndarray:
        """P (n, k) float64, read from the cache when it is valid, else computed and cached."""
        if self._P is not None:
            return self._P
        key = jsonable(self.cache_key())
        path = self.cache_path(key)
        why = _cache_problem(path, key)
        if why is None:
            try:  # mapped, not copied: the checksum and the product read the pages
                rows = np.load(path / "rows.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                why = f"its rows are unreadable ({e})"
            else:
                if rows.shape == (self.n, self.k) and _crc32(rows) == read_json(path / "cache.json")["crc32"]:
                    log.info("query: preconditioned rows from the cache %s", path)
                    self._P = rows
                    return rows
                why = "its rows do not match their checksum"
        if path.exists():
            log.warning("query: rebuilding the cache %s: %s", path, why)
        t0 = time.perf_counter()
        P, lams = preconditioned_rows(self.train, self.blocks(), self.settings.damping, self.settings.woodbury)
        secs = time.perf_counter() - t0
        stale = [p for p in (path.parent.glob(f"{seed_tag(self.method, self.seed)}-*") if path.parent.is_dir()
                             else []) if p != path and not p.name.startswith(".")]
        with atomic_path(path) as tmp:
            tmp.mkdir()
            np.save(tmp / "rows.npy", P)
            write_json(tmp / "cache.json", {"key": key, "crc32": _crc32(P), "lambdas": lams, "seconds": secs,
                                            "what": "P = G (H + lambda I)^-1 of the training rows; scores = -P q"})
        for p in stale:  # caches of arrays that no longer exist are never read again
            if _cache_problem(p, key) == "the arrays changed":
                shutil.rmtree(p, ignore_errors=True)
        log.info("query: preconditioned %d x %d training rows in %.2fs (cached in %s)", self.n, self.k, secs, path)
        self._P = P
        return P

    def scores(self, G: np.ndarray) -> np.ndarray:
        """(n, q) scores of the query rows G (q, k) (positive = harmful)."""
        G = np.asarray(G, dtype=np.float64)
        if G.ndim != 2 or G.shape[1] != self.k:
            raise QueryError(f"query rows have shape {G.shape}; the stored arrays have {self.k} columns")
        return -(self.preconditioned() @ G.T)

    # ---- query rows ----------------------------------------------------------------------------
    def test_rows(self, indices) -> np.ndarray:
        m = int(self.test.shape[0])
        for i in indices:
            if not 0 <= int(i) < m:
                raise QueryError(f"query: test index {i} is outside the test split (0..{m - 1})")
        return np.stack([np.asarray(self.test[int(i):int(i) + 1])[0] for i in indices])

    def blob(self) -> dict:
        if self._blob is None:
            from .prepare import load_prepared

            self._blob = load_prepared(self.data_path)
        return self._blob

    def engine(self) -> "_Engine":
        if self._engine is None:
            self._engine = _Engine(self)
        return self._engine


def _cache_problem(path: Path, key: dict) -> str | None:
    """Why the cache at `path` cannot serve `key` (None: it can, checksum aside)."""
    try:
        rec = read_json(path / "cache.json")
    except (OSError, ValueError):
        return "it is absent or unreadable"
    old = rec.get("key") or {}
    if old.get("manifest_sha256") != key.get("manifest_sha256"):
        return "the arrays changed"
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    return f"its key differs in {diff}" if diff else None


def _same(stored, rebuilt, where: str = "") -> str | None:
    """The first place where two JSON-like compressor descriptions differ (floats to 1e-6)."""
    if isinstance(stored, dict) and isinstance(rebuilt, dict):
        for k in sorted(set(stored) | set(rebuilt)):
            if k in VOLATILE_ATTRS:
                continue
            if k not in stored or k not in rebuilt:
                return f"{where}{k} (present in only one)"
            d = _same(stored[k], rebuilt[k], f"{where}{k}.")
            if d:
                return d
        return None
    if isinstance(stored, list) and isinstance(rebuilt, list):
        if len(stored) != len(rebuilt):
            return f"{where.rstrip('.')} (length {len(stored)} vs {len(rebuilt)})"
        for i, (a, b) in enumerate(zip(stored, rebuilt)):
            d = _same(a, b, f"{where}{i}.")
            if d:
                return d
        return None
    if isinstance(stored, float) or isinstance(rebuilt, float):
        ok = isinstance(stored, (int, float)) and isinstance(rebuilt, (int, float)) and \
            math.isclose(stored, rebuilt, rel_tol=1e-6, abs_tol=1e-12)
        return None if ok else f"{where.rstrip('.')} ({stored!r} vs {rebuilt!r})"
    return None if stored == rebuilt else f"{where.rstrip('.')} ({stored!r} vs {rebuilt!r})"


class _Engine:
    """The fine-tuned model and the compressor of the stored arrays, checked against them."""

    def __init__(self, att: Attribution):
        from ..compressors import COMPRESSORS, compressor
        from ..layout import Layout, select_parameters
        from .common import resolve_device
        from .prepare import model_inputs
        from .train import Batches, load_trained

        fp = att.manifest.get("fingerprint") or {}
        for what, path, key in (("model", att.model_path, "model_sha256"), ("prepared data", att.data_path,
                                                                              "data_sha256")):
            if not path.is_file():
                raise QueryError(f"query: the {what} {path} does not exist")
            if fp.get(key) != file_sha256(path):
                raise QueryError(f"query: the {what} {path} is not the one the arrays in {att.grads_dir} were "
                                 f"extracted from ({key} differs); rerun the extraction")
        stored_type = fp.get("device_type", "cpu")
        if att.device is None:
            att.device = "cuda" if stored_type == "cuda" and torch.cuda.is_available() else "cpu"
        self.device = resolve_device(att.device)
        if att.compressor == "gaussian" and self.device.type != stored_type:
            raise QueryError(f"query: the gaussian projection of {att.grads_dir} was drawn on {stored_type} and "
                             f"is reproducible only there (this query runs on {self.device.type}); pass "
                             f"--device {stored_type}")
        blob = att.blob()
        self.spec, _ = load_trained(att.model_path, blob, self.device)
        m = self.spec
        layout = Layout.from_shapes((n, p.shape) for n, p in select_parameters(m.module, m.params))
        if layout.to_json() != att.manifest.get("layout"):
            raise QueryError(f"query: the model's tracked parameters differ from those of the arrays in "
                             f"{att.grads_dir} (layout mismatch)")
        batch_size = 256
        parts = att.manifest.get("parts") or []
        if parts and (att.grads_dir / parts[0]).exists():
            batch_size = int(read_json(att.grads_dir / parts[0]).get("batch_size") or batch_size)
        prepared = COMPRESSORS[att.compressor].prepare_options(
            dict(fp.get("options") or {}), model=m.module, loss_fn=m.loss_fn,
            train_loader=Batches(model_inputs(blob["train"]), batch_size), params=m.params, device=self.device)
        r = layout.dim if att.r is None else att.r
        self.comp = compressor(att.compressor, dim=layout.dim, r=r, seed=0 if att.seed is None else att.seed,
                               layout=layout, **prepared)
        diff = _same(dict(att.train.attrs).get("compressor_attrs") or {}, jsonable(self.comp.attrs()))
        if diff:
            raise QueryError(f"query: the {att.compressor} compressor rebuilt from {att.grads_dir}'s manifest does "
                             f"not reproduce its stored arrays: compressor_attrs differ at {diff}")

    def gradients(self, batch: dict) -> np.ndarray:
        from ..extraction import Extractor
        from .train import Batches

        n = next(iter(batch.values())).shape[0]
        ex = Extractor(self.spec.module, self.spec.loss_fn, self.comp, params=self.spec.params, device=self.device)
        return ex.run(Batches(batch, max(1, n))).double().cpu().numpy()

    def predict(self, batch: dict) -> list[int] | None:

        if self.spec.logits_fn is None:
            return None
        was = self.spec.module.training
        self.spec.module.eval()
        try:
            with torch.no_grad():
                logits = self.spec.logits_fn(self.spec.module, {k: v.to(self.device) for k, v in batch.items()})
        finally:
            self.spec.module.train(was)
        return logits.argmax(-1).cpu().tolist()


# ---- query inputs ----------------------------------------------------------------------------------

#: dataset name -> (PIL image -> one example's `x`), the dataset's own preprocessing of its pixels
IMAGE_INPUTS = {}


def image_input(*names):
    def deco(fn):
        for name in names:
            IMAGE_INPUTS[name] = fn
        return fn
    return deco


@image_input("digits")
def _digits_image(img, meta):
    side = int(round(math.sqrt(int(meta.get("n_features", 64)))))
    a = np.asarray(img.convert("L").resize((side, side)), dtype=np.float32) / 255.0  # digits: intensity in [0, 1]
    return torch.from_numpy(a.reshape(-1))


@image_input("fashion_mnist")
def _fashion_image(img, meta):
    from ..data.fashion_mnist import to_tensor

    a = np.asarray(img.convert("L").resize((28, 28)), dtype=np.uint8)
    return to_tensor(a[None], int(meta.get("size", 32)), bool(meta.get("normalize", True)))[0]


@image_input("cifar10")
def _cifar_image(img, meta):
    from ..data.cifar10 import to_tensor

    a = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.uint8).transpose(2, 0, 1)
    return to_tensor(np.ascontiguousarray(a)[None], bool(meta.get("normalize", True)))[0]


def load_image(path, blob: dict) -> torch.Tensor:
    """One example's `x` from an image file: .npy / .pt hold the model input as the dataset stores it;
    other files are decoded by PIL and preprocessed as the dataset does (IMAGE_INPUTS)."""
    path = Path(path)
    shape = tuple(blob["train"]["x"].shape[1:])
    if not path.is_file():
        raise QueryError(f"query: image {path} does not exist")
    if path.suffix in (".npy", ".pt"):
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            x = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(x, torch.Tensor):
                raise QueryError(f"query: {path} holds a {type(x).__name__}, not a tensor")
        if x.numel() != int(np.prod(shape)):
            raise QueryError(f"query: {path} has {x.numel()} values (shape {tuple(x.shape)}); the model's input is "
                             f"{shape}")
        return x.reshape(shape).to(blob["train"]["x"].dtype)
    fn = IMAGE_INPUTS.get(blob["name"])
    if fn is None:
        raise QueryError(f"query: no image preprocessing is known for dataset {blob['name']!r} (known: "
                         f"{', '.join(sorted(IMAGE_INPUTS))}); pass the model input as a .npy or .pt file")
    try:
        from PIL import Image
    except ImportError:
        raise QueryError("query: reading image files needs Pillow (pip install pillow); or pass a .npy/.pt "
                         "tensor") from None
    try:
        with Image.open(path) as img:
            return fn(img, blob["meta"]).reshape(shape).to(blob["train"]["x"].dtype)
    except OSError as e:
        raise QueryError(f"query: {path} is not a readable image ({e})") from None


def image_paths(spec) -> list[Path]:
    """A directory (its .png/.jpg/.npy/.pt files, sorted) or a text file listing one path per line."""
    p = Path(spec)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".npy", ".pt"))
    if not p.is_file():
        raise QueryError(f"query: {p} is neither a directory of images nor a file listing them")
    return [Path(line.strip()) if Path(line.strip()).is_absolute() else p.parent / line.strip()
            for line in p.read_text().splitlines() if line.strip()]


def text_batch(texts: list[str], blob: dict) -> dict:
    """Tokenized like the dataset's splits (its tokenizer and max_length), with only the keys its
    model inputs have."""
    from ..data.text import encode_splits, load_tokenizer

    meta = blob["meta"]
    keys = [k for k in blob["test"] if k in ("input_ids", "attention_mask", "token_type_ids")]
    if "input_ids" not in keys or not meta.get("tokenizer"):
        raise QueryError(f"query: dataset {blob['name']!r} is not tokenized text; pass --test-index or --image")
    pairs = [t.split("\t", 1) for t in texts]
    if _pair_task(blob["name"]) != all(len(p) == 2 for p in pairs):
        raise QueryError(f"query: dataset {blob['name']!r} takes " + (
            "sentence pairs: give each text as 'first sentence<TAB>second sentence'" if _pair_task(blob["name"])
            else "single texts: a text contains a TAB"))
    tok = load_tokenizer(meta["tokenizer"])
    width = int(blob["train"]["input_ids"].shape[1])
    first, second = ([p[0] for p in pairs], [p[1] for p in pairs]) if _pair_task(blob["name"]) else (texts, None)
    enc = encode_splits(tok, {"q": (first, second)}, int(meta.get("max_length") or width))["q"]
    return {k: enc[k] for k in keys if k in enc}


def _pair_task(name: str) -> bool:
    """Whether the dataset's examples are sentence pairs (GLUE's two-sentence tasks)."""
    from ..data.hf import GLUE_KEYS

    task = name.removeprefix("glue_")
    return name.startswith("glue_") and bool(GLUE_KEYS.get(task, (None, None))[1])


# ---- describing examples -----------------------------------------------------------------------------

class _Describer:
    """What a training (or test) example is: its label (and name), flipped flag, text or image index."""

    def __init__(self, blob: dict):
        self.blob, self.meta = blob, blob["meta"]
        self.names = self.meta.get("label_names") or self.meta.get("classes")
        self._tok = None

    def label_name(self, y) -> str:
        if y is None:
            return ""
        return str(self.names[int(y)]) if self.names and 0 <= int(y) < len(self.names) else str(int(y))

    def text(self, split: str, i: int) -> str:
        kept = (self.meta.get("text") or {}).get(split)
        if kept is not None:
            return str(kept[i])
        if "input_ids" in self.blob[split]:
            if self._tok is None:
                from ..data.text import load_tokenizer
                self._tok = load_tokenizer(self.meta["tokenizer"])
            ids = self.blob[split]["input_ids"][i]
            mask = self.blob[split].get("attention_mask")
            ids = ids[mask[i].bool()] if mask is not None else ids
            return self._tok.decode(ids.tolist(), skip_special_tokens=True)
        src = self.meta.get(f"{split}_index") or (self.meta.get("source_index") or {}).get(split)
        return f"{self.blob['name']} image {int(src[i])}" if src is not None else f"{split} image {i}"

    def train_rows(self, idx) -> list[dict]:
        tr = self.blob["train"]
        out = []
        for i in idx:
            i = int(i)
            y = int(tr["labels"][i]) if "labels" in tr else None
            row = {"train_index": i, "train_label": y, "train_label_name": self.label_name(y)}
            if "labels_clean" in tr:
                row["train_label_clean"] = int(tr["labels_clean"][i])
                row["train_label_clean_name"] = self.label_name(row["train_label_clean"])
            if "flipped" in tr:
                row["flipped"] = bool(tr["flipped"][i])
            row["example"] = self.text("train", i)
            out.append(row)
        return out


def top_k(scores: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Indices of the k most helpful (most negative) and k most harmful (most positive) scores."""
    k = min(int(k), scores.shape[0])
    order = np.argsort(scores, kind="stable")
    return {"helpful": order[:k], "harmful": order[::-1][:k]}


# ---- the query ------------------------------------------------------------------------------------

@dataclass
class _Query:
    source: str          # what the user asked: "test[5]", a text, an image path
    label: int | None    # the label whose loss is differentiated (None: language model)
    predicted: int | None = None


_OPEN: dict = {}


def open_attribution(results_dir, method: str, r=None, seed=0, *, curvature=None, damping=None, options=None,
                     device=None) -> Attribution:
    """An `Attribution` for (results_dir, method, r, seed), kept for the process so that repeated
    queries reuse the loaded rows and model (reloaded when the extraction's manifest changes)."""
    settings = Settings.of_score_stage(results_dir, method, r, curvature, damping, options)
    key = (str(Path(results_dir).resolve()), method, r, seed, json.dumps(jsonable(settings.__dict__), sort_keys=True),
           device)
    att = _OPEN.get(key)
    manifest = Path(results_dir) / "grads" / (extraction_of(method) or "") / rtag(None if method == "orig" else r) \
        / "manifest.json"
    stamp = manifest.stat().st_mtime_ns if manifest.exists() else None
    if att is None or att[1] != stamp:
        _OPEN[key] = (Attribution(results_dir, method, r, seed, settings=settings, device=device), stamp)
    return _OPEN[key][0]


def query(results_dir, method: str, r=None, seed=0, *, test_index=None, text=None, image=None, label=None,
          k: int = 10, curvature=None, damping=None, options=None, device=None):
    """The top-k most helpful and most harmful training examples for each query example, as a pandas
    DataFrame (one row per (query, direction, rank)); `score` follows the sign convention: positive =
    up-weighting the training example raises the query's loss (harmful), negative = helpful.

    Query examples: `test_index` (int or list: rows of the test split, whose gradients are stored),
    `text` (str or list, text models), `image` (path or list: .png/.jpg via Pillow, .npy/.pt tensors,
    image models). A new input's loss is taken at `label` (an int or a label name; default: the
    model's prediction, the question being "why this prediction"). The result's `attrs` hold the
    settings and the sign convention.
    """
    import pandas as pd

    att = open_attribution(results_dir, method, r, seed, curvature=curvature, damping=damping, options=options,
                           device=device)
    queries, rows = [], []
    if test_index is not None:
        idx = [int(i) for i in np.atleast_1d(test_index)]
        rows.append(att.test_rows(idx))
        te = att.blob()["test"]
        queries += [_Query(f"test[{i}]", int(te["labels"][i]) if "labels" in te else None) for i in idx]
    new = []
    if text is not None:
        texts = [text] if isinstance(text, str) else list(text)
        new.append((text_batch(texts, att.blob()), texts))
    if image is not None:
        paths = [image] if isinstance(image, (str, Path)) else list(image)
        new.append(({"x": torch.stack([load_image(p, att.blob()) for p in paths])}, [str(p) for p in paths]))
    for batch, sources in new:
        eng = att.engine()
        pred = eng.predict(batch)
        if pred is not None:
            labels = [_label(label, att.blob(), p) for p in pred]
            batch = {**batch, "labels": torch.tensor(labels, dtype=torch.long)}
        else:
            labels = [None] * len(sources)
        rows.append(eng.gradients(batch))
        queries += [_Query(s, y, p) for s, y, p in zip(sources, labels, pred or [None] * len(sources))]
    if not queries:
        raise QueryError("query: no query examples; give test_index, text or image")
    S = att.scores(np.concatenate(rows))
    desc = _Describer(att.blob())
    out = []
    for j, q in enumerate(queries):
        for direction, idx in top_k(S[:, j], k).items():
            for rank, (i, info) in enumerate(zip(idx, desc.train_rows(idx)), 1):
                out.append({"query": j, "query_source": q.source, "query_label": q.label,
                            "query_label_name": desc.label_name(q.label),
                            "query_predicted": q.predicted, "query_predicted_name": desc.label_name(q.predicted),
                            "direction": direction, "rank": rank,
                            "score": float(S[i, j]), **info})
    df = pd.DataFrame(out)
    df.attrs.update(experiment=att.root.name, method=method, r=att.r, seed=att.seed, n_train=att.n, k=int(k),
                    curvature=att.settings.curvature, damping=att.settings.damping, sign_convention=QUERY_SIGN)
    return df


def _label(label, blob: dict, predicted: int) -> int:
    if label is None:
        return int(predicted)
    names = blob["meta"].get("label_names") or blob["meta"].get("classes") or []
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if label not in names:
            raise QueryError(f"query: label {label!r} is not a class name of {blob['name']} ({', '.join(names)})")
        return names.index(label)
    y = int(label)
    if blob.get("num_classes") and not 0 <= y < int(blob["num_classes"]):
        raise QueryError(f"query: label {y} is outside 0..{int(blob['num_classes']) - 1}")
    return y


# ---- printing and writing ------------------------------------------------------------------------------

def format_table(df, width: int = 70) -> str:
    a = df.attrs
    what = f"{a['method']}" + ("" if a["r"] is None else f" r={a['r']}") + \
        ("" if a["seed"] is None else f" seed {a['seed']}")
    lines = [f"{a['experiment']}: {what}; curvature {a['curvature']}, damping {a['damping']}; "
             f"{a['n_train']} training examples", a["sign_convention"]]
    for j, q in df.groupby("query", sort=True):
        head = q.iloc[0]
        pred = "" if head["query_predicted"] is None or (isinstance(head["query_predicted"], float)
                                                         and math.isnan(head["query_predicted"])) \
            else f", predicted {head['query_predicted_name']}"
        label = "" if head["query_label_name"] == "" else f" (loss at label {head['query_label_name']}{pred})"
        lines += ["", f"query {j}: {_short(str(head['query_source']), width)}{label}"]
        for direction in DIRECTIONS:
            part = q[q["direction"] == direction]
            lines.append(f"  most {direction} ({'most negative' if direction == 'helpful' else 'most positive'} "
                         f"scores)")
            lines.append(f"  {'rank':>4} {'train':>6} {'score':>11} {'label':>8} {'flipped (clean)':>15}  example")
            for _, row in part.iterrows():
                flipped = ""
                if row.get("flipped") is True:  # the label it was trained with is not its clean one
                    flipped = f"yes ({_short(str(row['train_label_clean_name']), 8)})"
                elif row.get("flipped") is False:
                    flipped = "no"
                lines.append(f"  {row['rank']:>4} {row['train_index']:>6} {row['score']:>11.4g} "
                             f"{_short(str(row['train_label_name']), 8):>8} {flipped:>15}  "
                             f"{_short(str(row['example']), width)}")
    return "\n".join(lines)


def _short(s: str, width: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= width else s[:width - 3] + "..."


def write_outputs(df, csv=None, json_path=None) -> None:
    if csv:
        with atomic_path(csv) as tmp:
            df.to_csv(tmp, index=False)
    if json_path:
        queries = []
        for j, q in df.groupby("query", sort=True):
            head = q.iloc[0]
            entry = {"query": int(j), "source": head["query_source"], "label": _plain(head["query_label"]),
                     "label_name": head["query_label_name"], "predicted": _plain(head["query_predicted"]),
                     "predicted_name": head["query_predicted_name"]}
            cols = [c for c in q.columns if not c.startswith("query") and c != "direction"]
            for direction in DIRECTIONS:
                entry[direction] = [{c: _plain(v) for c, v in row.items()}
                                    for row in q[q["direction"] == direction][cols].to_dict("records")]
            queries.append(entry)
        write_json(json_path, jsonable({**df.attrs, "queries": queries}))


def _plain(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


# ---- stage `attribute` ----------------------------------------------------------------------------------

def attribute(results_dir, method: str, r=None, seed=0, *, k: int = 10, out=None, curvature: str = "layer",
              damping="paper", options=None, threads: int | None = None, chunk: int = 256):
    """Every test example's top-k helpful and harmful training examples (a CSV at `out`, written
    atomically; default `attributions/<method>/<rtag>/<seedtag>/topk.csv` under `results_dir`)."""
    import pandas as pd

    from .common import Stage

    stage = Stage("attribute", threads=threads)
    settings = Settings.of_score_stage(results_dir, method, r, curvature, damping, options or {})
    att = Attribution(results_dir, method, r, seed, settings=settings)
    out = Path(out) if out else att.root / "attributions" / method / rtag(att.r) / seed_tag(method, seed) / "topk.csv"
    P = att.preconditioned()
    desc = _Describer(att.blob())
    te = att.blob()["test"]
    m = int(att.test.shape[0])
    rows = []
    for a in range(0, m, chunk):
        b = min(m, a + chunk)
        S = -(P @ np.asarray(att.test[a:b], dtype=np.float64).T)
        for j in range(b - a):
            i_test = a + j
            y = int(te["labels"][i_test]) if "labels" in te else None
            for direction, idx in top_k(S[:, j], k).items():
                for rank, (i, info) in enumerate(zip(idx, desc.train_rows(idx)), 1):
                    info.pop("example")
                    rows.append({"test_index": i_test, "test_label": y, "direction": direction, "rank": rank,
                                 "score": float(S[i, j]), **info})
    df = pd.DataFrame(rows)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    prov = stage.provenance()
    log.info("attribute %s %s %s: top %d of %d training examples for %d test examples in %.2fs -> %s (%s)",
             method, rtag(att.r), seed_tag(method, seed), k, att.n, m, prov["stage_seconds"], out, QUERY_SIGN)
    return df


# ---- command line ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ArraysOptions:
    """Which stored arrays a query or an attribution reads."""
    results_dir: Path = option("the experiment's results folder (results/<experiment>)", positional=True)
    method: str = option(f"one of {', '.join(QUERYABLE)}")
    r: int | None = option("compressed size (not for orig)", default=None, codec=RSIZE)
    seed: int = option("compressor seed (not for orig)", default=0)


@dataclass(frozen=True, kw_only=True)
class QueryOptions(ArraysOptions):
    test_index: tuple[int, ...] | None = option("rows of the test split", default=None, codec=INT)
    text: tuple[str, ...] | None = option("new texts (text models)", default=None)
    text_file: Path | None = option("a file of new texts, one per line", default=None)
    image: tuple[Path, ...] | None = option("new images: .png/.jpg (Pillow) or .npy/.pt model inputs (image models)",
                                            default=None)
    images: Path | None = option("a directory of images, or a file listing one path per line", default=None)
    label: str | None = option("new inputs: the label whose loss is explained (default: the predicted one)",
                               default=None)
    k: int = option("how many training examples in each direction", default=10)
    csv: Path | None = option("write the table as CSV", default=None)
    json: Path | None = option("write the table as JSON", default=None)
    curvature: str | None = option("default: as the score stage ran (its manifest), else layer", default=None,
                                   choices=("layer", "tensor", "global"))
    damping: str | float | list | None = option("default: as the score stage ran, else paper", default=None,
                                                codec=DAMPING)
    device: str | None = option("where a new input's gradient is computed (default: the extraction's device type)",
                                default=None)
    threads: int | None = option("torch CPU threads", default=None)


@command("query", QueryOptions, help="top-k helpful and harmful training examples for test examples or new "
                                     "inputs, from a finished experiment's stored arrays. " + QUERY_SIGN)
def query_command(*, results_dir, method, r=None, seed=0, test_index=None, text=None, text_file=None, image=None,
                  images=None, label=None, k=10, csv=None, json=None, curvature=None, damping=None, device=None,
                  threads=None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
    texts = list(text or [])
    if text_file:
        texts += [line for line in Path(text_file).read_text().splitlines() if line.strip()]
    paths = list(image or []) + (image_paths(images) if images else [])
    df = query(results_dir, method, r, seed, test_index=list(test_index) if test_index else None,
               text=texts or None, image=paths or None, label=label, k=k, curvature=curvature, damping=damping,
               device=device)
    print(format_table(df))
    write_outputs(df, csv, json)


@dataclass(frozen=True, kw_only=True)
class AttributeOptions(ArraysOptions):
    k: int = option("how many training examples in each direction", default=10)
    curvature: str = option("curvature blocks (docs/curvature.md)", default="layer",
                            choices=("layer", "tensor", "global"))
    damping: str | float | list = option("'paper', a number, or a JSON list (one per block)", default="paper",
                                         codec=DAMPING)
    options: dict | None = option("JSON options of the exact solver (woodbury)", default=None)
    threads: int | None = option("torch CPU threads", default=None)
    out: Path | None = option("the topk.csv to write (default: under results_dir/attributions)", default=None)


@command("attribute", AttributeOptions, help="every test example's top-k training examples (topk.csv)")
def attribute_command(*, results_dir, method, r=None, seed=0, k=10, curvature="layer", damping="paper",
                      options=None, threads=None, out=None) -> None:
    attribute(results_dir, method, r, seed, k=k, out=out, curvature=curvature, damping=damping, options=options,
              threads=threads)
