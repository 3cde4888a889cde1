"""`python -m dropinf verify RESULTS_DIR`: check every stored output of an experiment.

For every `manifest.json` below RESULTS_DIR (an experiment's folder, or a results folder holding
several): the manifest parses, and each array it records exists with that shape and chunk count.
For every Zarr array: its metadata parses, it is marked complete, every chunk file is present,
every chunk decodes and passes its crc32c checksum, and its values are finite. For every `.pt`
or `.safetensors` file (prepared data, model weights): it is a safetensors file (never a pickle)
whose header and tensors load. One line per
problem, each naming the file and the command that recomputes it; exit status 0 when there is
none, 2 otherwise.
"""
from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .commands import command, option
from .storage import (MANIFEST, array_problems, arrays_under, chunk_error, chunk_grid, chunk_key, has_checksum,
                      producing_manifest, recover_command)


def _rerun(path: Path) -> str:
    return f"snakemake --forcerun {shlex.quote(str(path))}"


def check_manifest(path: Path) -> list[str]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{path}: unreadable manifest ({type(e).__name__}: {e}); recover with: {_rerun(path)}"]
    problems = []
    for rel, rec in (manifest.get("integrity") or {}).items():
        if not (path.parent / rel / "zarr.json").exists():
            problems.append(f"{path.parent / rel}: recorded by {path} ({rec.get('rows')} rows, {rec.get('chunks')} "
                            f"chunks) but missing; recover with: {_rerun(path)}")
    return problems


def check_array(path: Path) -> tuple[list[str], int]:
    """(problems, number of chunks decoded) of the array at `path`."""
    import zarr

    fix = recover_command(path)
    try:
        arr = zarr.open_array(store=str(path), mode="r")
    except Exception as e:
        return [f"{path}: unreadable array metadata ({type(e).__name__}: {e}); recover with: {fix}"], 0
    files = [f"{path}: {p}; recover with: {fix}" for p in array_problems(path, arr)]
    notes = []
    if not producing_manifest(path).exists():
        notes.append(f"{path}: its directory has no {MANIFEST} (the job writing it did not finish, or failed); "
                     f"recover with: {fix}")
    if not arr.attrs.get("complete", False):
        notes.append(f"{path}: not marked complete (a killed or running job wrote it); recover with: {fix}")
    if not has_checksum(arr):
        notes.append(f"{path}: its chunks carry no checksum (written by an older dropinf), so damage cannot be "
                     f"detected; recompute with: {fix}")
    if files:  # missing chunks would read as NaN: already said
        return files + notes, 0
    found, decoded = check_array_chunks(path, arr, fix)
    return notes + found, decoded


def check_array_chunks(path: Path, arr, fix: str) -> tuple[list[str], int]:
    """Decode every row band of chunks (checksum, decompression; every tile of a tiled array) and look
    for NaN/inf rows."""
    problems: list[str] = []
    c = int(arr.chunks[0])
    n = int(arr.shape[0])
    decoded = 0
    for i in range(math.ceil(n / c)):
        a, b = i * c, min((i + 1) * c, n)
        try:
            block = arr[a:b]
        except Exception:
            problems.append(f"{path}: {chunk_error(arr, path, a, b)}; recover with: {fix}")
            continue
        decoded += int(np.prod(chunk_grid(arr)[1:]))  # the band's chunks (tiles across the columns)
        if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
            flat = ~np.isfinite(block.reshape(block.shape[0], -1))
            rows = (np.flatnonzero(flat.any(axis=1))[:5] + a).tolist()
            # the first bad tile of a row band (column chunks: a pairwise array's square tiles)
            tile = (int(np.flatnonzero(flat.any(axis=0))[0]) // int(arr.chunks[1]),) if arr.ndim == 2 else ()
            key = chunk_key((i,) + tile)
            problems.append(f"{path}: chunk {key} holds NaN/inf at rows {rows}; recover with: {fix}")
    return problems, decoded


def check_tensor_file(path: Path) -> list[str]:
    """Prepared data or weights (`dataset.pt`, `model.pt`: safetensors + JSON) load, or one line."""
    from ..errors import DropinfError
    from .prepare import load_tensors

    try:
        load_tensors(path, "file")
    except DropinfError as e:
        return [str(e)]
    return []


def verify(results_dir) -> tuple[list[str], dict]:
    """(problems, counts) for everything stored below `results_dir`."""
    root = Path(results_dir)
    if not root.is_dir():
        return [f"{root}: no such directory"], {}
    problems: list[str] = []
    counts = {"manifests": 0, "arrays": 0, "chunks": 0, "files": 0}
    for m in sorted(root.rglob(MANIFEST)):
        if any(part.startswith(".") for part in m.relative_to(root).parts):
            continue
        counts["manifests"] += 1
        problems += check_manifest(m)
    for a in arrays_under(root):
        counts["arrays"] += 1
        found, decoded = check_array(a)
        problems += found
        counts["chunks"] += decoded
    for f in sorted([*root.rglob("*.pt"), *root.rglob("*.safetensors")]):
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        counts["files"] += 1
        problems += check_tensor_file(f)
    return problems, counts


@dataclass(frozen=True, kw_only=True)
class VerifyOptions:
    results_dir: Path = option("an experiment's folder (results/<experiment>) or a results folder", positional=True)


@command("verify", VerifyOptions, help="check every manifest, array and chunk of an experiment's results",
         description="check every manifest, array and chunk of an experiment's results; one line per problem with "
                     "the command that recomputes it; exit 0 (none) or 2", exit_status=True, threads_flag=False)
def main(*, results_dir) -> int:
    problems, counts = verify(results_dir)
    for line in problems:
        print(line)
    if counts:
        print(f"verify {results_dir}: {counts['manifests']} manifests, {counts['arrays']} arrays "
              f"({counts['chunks']} chunks decoded), {counts['files']} weight/data files; "
              f"{len(problems)} problem(s)")
    return 2 if problems else 0
