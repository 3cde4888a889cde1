"""Shared helpers of the workflow stages: logging, provenance, atomic outputs, devices.

Outputs are complete or absent: every file or directory a stage produces is first written under
a temporary name beside its final path (`.NAME.tmp-PID`) and renamed into place only once
complete, so a stage killed midway leaves nothing that looks finished.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import devices

log = logging.getLogger("dropinf")

#: Environment variables the Snakefile sets for every job (plain CLI use works without them):
#: the config's hash, and the workflow's directory, whose git state the provenance records.
ENV_CONFIG_SHA = "DROPINF_CONFIG_SHA256"
ENV_REPO = "DROPINF_REPO"


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dropinf")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# ---- atomic outputs ---------------------------------------------------------------------------

def tmp_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def remove(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path to write (a file or a directory); on success it replaces `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def jsonable(obj):
    return json.loads(json.dumps(obj, default=_json_default))


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def clean_stale(directory: str | os.PathLike, keep: set[str] = frozenset()) -> None:
    """Remove leftovers of killed runs (`.*.tmp-*`) and entries not in `keep` from `directory`."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name in keep:
            continue
        remove(p)


# ---- provenance -------------------------------------------------------------------------------

def _git(repo: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_GIT_CACHE: dict[str, tuple[str, str]] = {}


def git_state(repo: str | None = None) -> tuple[str, str]:
    """(commit, dirty) of the source tree the code runs from; ('unknown', '') when git cannot tell.

    Read from git itself, never from an override: a value that cannot be checked would be stamped on
    every output as if it were true. dirty = a tracked file outside results/ differs from the commit."""
    repo = repo or os.environ.get(ENV_REPO) or str(Path(__file__).resolve().parents[3])
    if repo not in _GIT_CACHE:
        commit = _git(repo, "rev-parse", "HEAD")
        if commit is None:
            _GIT_CACHE[repo] = ("unknown", "")
        else:
            # results/ holds outputs (committed reference tables among them), not code: an updated
            # table must not mark the runs that follow it as made from modified code
            status = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
            _GIT_CACHE[repo] = (commit, "" if status is None else str(bool(status)).lower())
    return _GIT_CACHE[repo]


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return str(device)


def resolve_device(spec: str | None, job: str = ""):
    """`auto`, `cuda`, `cpu` or `cuda:N` as a torch device. With device binding on (the workflow's
    jobs), `auto`/`cuda` on a machine with CUDA bind this process to a free device of the node
    (`devices.bind`; an explicit `cuda:N` is taken as given), so that concurrent jobs do not all
    land on `cuda:0`."""
    import torch

    spec = spec or "auto"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import DropinfError
        raise DropinfError(f"device {spec!r} requested but CUDA is not available (use device: auto or cpu)")
    if spec not in BINDABLE:
        return torch.device(spec)
    binding = devices.bind(job)  # None when off, or without CUDA (and without DROPINF_FAKE_DEVICES)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if binding is None or binding.fake:
        return torch.device("cuda")
    torch.cuda.set_device(binding.index)  # code that says plain "cuda" means this device too
    return torch.device("cuda", binding.index)


#: device settings that let the job bind to a free device (an explicit cuda:N or cpu does not)
BINDABLE = ("auto", "cuda")


# ---- deterministic gradient passes ------------------------------------------------------------

#: the cuBLAS variable, and the values under which cuBLAS is deterministic (torch's reproducibility notes)
ENV_CUBLAS = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, *, key: str = "extract.deterministic (--deterministic)"):
    """Within the block, torch uses deterministic kernels only (`torch.use_deterministic_algorithms(True)`),
    with `CUBLAS_WORKSPACE_CONFIG=:4096:8` unless the user set a deterministic value; off: nothing changes.

    Without it a gradient pass on a GPU is repeatable only up to rounding: e.g. the memory-efficient
    attention backward accumulates in a varying order. cuBLAS reads its workspace setting when CUDA
    first uses it, so this must come before the process touches CUDA (or with the variable already set).
    torch's flag is restored when the block ends; the variable stays (a workspace made under it stays
    too). An op without a deterministic implementation becomes one DropinfError naming `key`."""
    if not enabled:
        yield
        return
    import torch

    from ..errors import DropinfError

    given = os.environ.get(ENV_CUBLAS)
    if given is not None and given not in CUBLAS_DETERMINISTIC:
        raise DropinfError(f"{key}: {ENV_CUBLAS}={given!r} makes cuBLAS non-deterministic; unset it or set it to "
                           f"{' or '.join(CUBLAS_DETERMINISTIC)}")
    if given is None:
        if torch.cuda.is_initialized():
            raise DropinfError(f"{key}: CUDA is already initialised in this process, so cuBLAS may have made its "
                               f"workspace without {ENV_CUBLAS}; set {ENV_CUBLAS}=:4096:8 before the process "
                               "first uses CUDA (or turn the option on in a fresh process)")
        os.environ[ENV_CUBLAS] = CUBLAS_DETERMINISTIC[0]
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, DropinfError) or "deterministic" not in str(e):
            raise
        raise DropinfError(f"{key}: an operation of the gradient pass has no deterministic implementation "
                           f"({str(e).splitlines()[0]}); turn {key} off to run it") from e
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


class Stage:
    """Context of one stage run: wall-clock timing and the provenance stamped on its outputs."""

    def __init__(self, name: str, device=None, threads: int | None = None):
        import torch

        import dropinf

        self.name = name
        if threads:
            torch.set_num_threads(int(threads))
        # before the clock starts: a wait for a free device is not the stage's time
        self.device = resolve_device(device, job=name) if device is not None else torch.device("cpu")
        binding = devices.bound() if device is not None and (device or "auto") in BINDABLE else None
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._t0 = time.perf_counter()
        commit, dirty = git_state()
        self.base = {
            "stage": name,
            "git_commit": commit,
            "git_dirty": dirty,
            "config_sha256": os.environ.get(ENV_CONFIG_SHA, ""),
            "dropinf_version": dropinf.__version__,
            "torch_version": torch.__version__,
            "device": device_name(self.device),
            "device_binding": binding.to_json() if binding is not None else None,
            "started_at": self.started_at,
            "host": os.uname().nodename,
        }
        log.info("stage %s on %s, %s (torch %s, %d threads)", name, self.device, self.base["device"],
                 torch.__version__, torch.get_num_threads())

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def provenance(self, **extra) -> dict:
        return {**self.base, "stage_seconds": round(self.seconds, 4), **extra}
