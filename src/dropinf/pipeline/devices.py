"""One free GPU per job on a node shared by concurrent jobs (Snakemake's local executor).

Snakemake's local executor counts `--resources gpu=N` but tells no job which device to use, so
every job would take `cuda:0`. A GPU stage therefore binds its process to a device of its own:

* The candidates are the devices this process can see (`torch.cuda.device_count()`, which honours
  `CUDA_VISIBLE_DEVICES`); each is named by its UUID, so processes that number the devices
  differently (other `CUDA_VISIBLE_DEVICES`, a scheduler's cgroup) agree on which one is taken.
* Each device has `jobs_per_gpu` slots; a slot is an exclusive `flock` on the file
  `<lock_dir>/<uuid>.slot<k>.lock`, taken when the stage starts and kept until the process exits.
  The kernel releases a flock when its holder dies however it dies (SIGKILL included), so a killed
  job frees its device at once and no stale lock is ever left to clean up.
* Slots are filled device by device (every device's first slot before any second one), lowest
  index first.
* When every slot is held the job waits, logging every minute who holds them, up to
  `wait_minutes` (default a day), then stops with `DeviceBusyError`. With `--resources gpu=N` and
  N <= devices x jobs_per_gpu no job of a run waits (Snakemake starts at most N GPU jobs at once);
  a wait means more GPU jobs were started than there are slots (no `--resources gpu`, or another
  run on the node), and queueing for a device is then what the job should do: failing would lose
  work that succeeds a little later. The bound catches a holder that never ends (the log line
  names its pid).
* It is on in the workflow's jobs (the Snakefile sets it from the config's `device_binding`,
  default on) and off elsewhere unless `DROPINF_DEVICE_BINDING=on`: a Python session that ran a
  stage would otherwise hold its device until it exits.

The lock directory must be local to the node (a lock on a network file system may not be released
with its holder, or may not be a lock at all): by default `$TMPDIR/dropinf-devices-<uid>` (or
`/tmp/...`), the same for every job a Snakemake process starts, since jobs inherit its environment.

Settings come from the environment (the Snakefile sets them from the config's `device_binding`):
`DROPINF_DEVICE_BINDING` (`on`/`off`, default off), `DROPINF_DEVICE_LOCK_DIR`, `DROPINF_JOBS_PER_GPU`,
`DROPINF_DEVICE_WAIT_MINUTES`. `DROPINF_FAKE_DEVICES=N` makes a machine without GPUs pretend to
have N devices named `fake0..` (the binding is taken and recorded; computation stays on the CPU),
with `CUDA_VISIBLE_DEVICES` applied to them as CUDA applies it: that is how the binding is tested
on CPUs.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DropinfError, InvalidValueError

log = logging.getLogger("dropinf")

ENV_BINDING = "DROPINF_DEVICE_BINDING"
ENV_LOCK_DIR = "DROPINF_DEVICE_LOCK_DIR"
ENV_JOBS_PER_GPU = "DROPINF_JOBS_PER_GPU"
ENV_WAIT_MINUTES = "DROPINF_DEVICE_WAIT_MINUTES"
ENV_FAKE = "DROPINF_FAKE_DEVICES"
DEFAULT_WAIT_MINUTES = 1440.0
#: seconds between attempts while every slot is held, and between the log lines of a wait
POLL_SECONDS = 0.5
LOG_EVERY_SECONDS = 60.0


class DeviceBusyError(DropinfError):
    """Every slot of every visible device stayed held for the configured wait."""


@dataclass(frozen=True)
class Candidate:
    """A device this process can use: its index here (`cuda:<index>`) and the name all processes share."""

    index: int
    ident: str


@dataclass(frozen=True)
class Settings:
    enabled: bool = False
    lock_dir: Path | None = None
    jobs_per_gpu: int = 1
    wait_minutes: float = DEFAULT_WAIT_MINUTES

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        flag = env.get(ENV_BINDING, "off").strip().lower()
        if flag not in ("on", "off", "1", "0", "true", "false"):
            raise InvalidValueError(f"{ENV_BINDING}={flag!r}: expected on or off (config: device_binding.enabled)")
        lock_dir = env.get(ENV_LOCK_DIR) or None
        return cls(enabled=flag in ("on", "1", "true"), lock_dir=Path(lock_dir) if lock_dir else None,
                   jobs_per_gpu=_number(env, ENV_JOBS_PER_GPU, 1, int, "device_binding.jobs_per_gpu", minimum=1),
                   wait_minutes=_number(env, ENV_WAIT_MINUTES, DEFAULT_WAIT_MINUTES, float,
                                        "device_binding.wait_minutes", minimum=0))

    def directory(self) -> Path:
        if self.lock_dir is not None:
            return Path(self.lock_dir)
        return Path(tempfile.gettempdir()) / f"dropinf-devices-{os.getuid()}"


def _number(env, key, default, kind, config_key, minimum):
    raw = env.get(key)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value != value or value < minimum:  # value != value: NaN
        raise InvalidValueError(f"{key}={raw!r}: expected a number >= {minimum} (config: {config_key})")
    return value


@dataclass
class Binding:
    """The slot this process holds; the lock lasts as long as the open file (or the process)."""

    index: int
    ident: str
    slot: int
    lock: Path
    waited_seconds: float
    bound_at: float
    fake: bool = False
    _file: object = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"index": self.index, "id": self.ident, "slot": self.slot, "lock": str(self.lock),
                "waited_seconds": round(self.waited_seconds, 3), "bound_at": self.bound_at, "fake": self.fake}

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


# ---- the candidates ---------------------------------------------------------------------------------

def visible(physical: list[str], cuda_visible_devices: str | None) -> list[str]:
    """The devices of `physical` that CUDA_VISIBLE_DEVICES lets a process see, in its order.

    As CUDA reads it: indices or (prefixes of) names separated by commas; the list stops at the
    first entry that names no device or repeats one; unset means all, empty means none."""
    if cuda_visible_devices is None:
        return list(physical)
    out: list[str] = []
    for token in cuda_visible_devices.split(","):
        token = token.strip()
        if re.fullmatch(r"[0-9]+", token):
            found = physical[int(token)] if int(token) < len(physical) else None
        else:
            matches = [p for p in physical if token and p.startswith(token)]
            found = matches[0] if len(matches) == 1 else None
        if found is None or found in out:
            break
        out.append(found)
    return out


def fake_candidates(env=None) -> list[Candidate] | None:
    """The pretend devices of DROPINF_FAKE_DEVICES (None when unset)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_FAKE)
    if raw in (None, ""):
        return None
    if not re.fullmatch(r"[0-9]+", raw.strip()):
        raise InvalidValueError(f"{ENV_FAKE}={raw!r}: expected a number of devices")
    names = visible([f"fake{i}" for i in range(int(raw))], env.get("CUDA_VISIBLE_DEVICES"))
    return [Candidate(i, name) for i, name in enumerate(names)]


def cuda_candidates() -> list[Candidate]:
    """The CUDA devices this process sees, each named by its UUID (its index where there is none)."""
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        uuid = "" if uuid is None else str(uuid)
        out.append(Candidate(i, uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}" if uuid else f"cuda{i}"))
    return out


# ---- taking a slot ---------------------------------------------------------------------------------

def lock_path(directory: Path, ident: str, slot: int) -> Path:
    return Path(directory) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', ident)}.slot{slot}.lock"


def _try_lock(path: Path):
    try:
        f = open(path, "a+")
    except OSError as e:
        raise DropinfError(f"device binding: cannot open the lock file {path} ({e}); set device_binding.lock_dir "
                           f"({ENV_LOCK_DIR}) to a node-local directory of your own") from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return f


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('job', '?')})"


def acquire(candidates: list[Candidate], settings: Settings, job: str = "", fake: bool = False) -> Binding:
    """Take the first free slot (device by device), waiting up to `settings.wait_minutes`."""
    if not candidates:
        raise DropinfError("device binding: no visible device to bind to (CUDA_VISIBLE_DEVICES hides them all?)")
    directory = settings.directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DropinfError(f"device binding: cannot create the lock directory {directory} ({e}); "
                           f"set device_binding.lock_dir ({ENV_LOCK_DIR}) to a node-local directory") from e
    order = [(c, slot) for slot in range(settings.jobs_per_gpu) for c in candidates]
    t0 = time.monotonic()
    deadline = t0 + 60.0 * settings.wait_minutes
    next_log = t0
    while True:
        for cand, slot in order:
            path = lock_path(directory, cand.ident, slot)
            f = _try_lock(path)
            if f is None:
                continue
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job or _job_name(),
                                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}))
            f.flush()
            waited = time.monotonic() - t0
            if waited >= 1.0:
                log.info("device binding: slot free after waiting %.0f s", waited)
            return Binding(cand.index, cand.ident, slot, path, waited, time.time(), fake, f)
        now = time.monotonic()
        if now >= deadline:
            raise DeviceBusyError(
                f"device binding: all {len(order)} slot(s) ({len(candidates)} device(s) x {settings.jobs_per_gpu}) "
                f"stayed held for {settings.wait_minutes:g} min: {_holders(order, directory)}. Run fewer GPU jobs "
                f"at once (--resources gpu=N), wait longer (device_binding.wait_minutes, {ENV_WAIT_MINUTES}), "
                f"allow more jobs per device (device_binding.jobs_per_gpu, {ENV_JOBS_PER_GPU}) or turn the "
                f"binding off (device_binding.enabled: false, {ENV_BINDING}=off)")
        if now >= next_log:
            log.info("device binding: all %d slot(s) of %d device(s) are held (%s); waiting up to %g min "
                     "(device_binding.wait_minutes) for one", len(order), len(candidates),
                     _holders(order, directory), settings.wait_minutes)
            next_log = now + LOG_EVERY_SECONDS
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - now)))


def _holders(order, directory) -> str:
    return "; ".join(f"{c.ident} slot {s}: {_holder(lock_path(directory, c.ident, s))}" for c, s in order)


def _job_name() -> str:
    return " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:3]])


# ---- the process's binding -----------------------------------------------------------------------

_BOUND: Binding | None = None


def bind(job: str = "", settings: Settings | None = None) -> Binding | None:
    """This process's device slot, taken on first call (a process is one job: later stages reuse it).

    None when the binding is off, or when there is neither CUDA nor DROPINF_FAKE_DEVICES."""
    global _BOUND
    if _BOUND is not None:
        return _BOUND
    settings = Settings.from_env() if settings is None else settings
    if not settings.enabled:
        return None
    candidates = fake_candidates()
    fake = candidates is not None
    if not fake:
        import torch

        if not torch.cuda.is_available():
            return None
        candidates = cuda_candidates()
    _BOUND = acquire(candidates, settings, job=job, fake=fake)
    where = f"pretends to use {_BOUND.ident}" if fake else f"uses cuda:{_BOUND.index} ({_BOUND.ident})"
    log.info("device binding: %s %s, slot %d of %d (lock %s)", job or "this job", where, _BOUND.slot,
             settings.jobs_per_gpu, _BOUND.lock)
    return _BOUND


def bound() -> Binding | None:
    return _BOUND


def release() -> None:
    """Give this process's slot back (the process's exit does the same)."""
    global _BOUND
    if _BOUND is not None:
        _BOUND.release()
        _BOUND = None
