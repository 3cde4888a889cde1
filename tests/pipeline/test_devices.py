"""Device binding (`dropinf.pipeline.devices`): concurrent jobs of one node take distinct devices
(per-device flock slots), a killed job frees its device, CUDA_VISIBLE_DEVICES is honoured, and a
job finding every slot held waits for one, then fails naming the setting.

On CPUs the devices are pretended (DROPINF_FAKE_DEVICES) or torch.cuda is replaced; the processes
and the locks are real. `test_processes_share_one_real_gpu` runs on a machine with CUDA."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
import torch

from dropinf.errors import InvalidValueError
from dropinf.pipeline import common, devices
from dropinf.pipeline.devices import Candidate, DeviceBusyError, Settings

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV_KEYS = (devices.ENV_BINDING, devices.ENV_LOCK_DIR, devices.ENV_JOBS_PER_GPU, devices.ENV_WAIT_MINUTES,
            devices.ENV_FAKE, "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def locks(tmp_path, monkeypatch):
    """A fresh lock directory in the environment, no binding held by this process before or after."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    d = tmp_path / "locks"
    monkeypatch.setenv(devices.ENV_LOCK_DIR, str(d))
    monkeypatch.setenv(devices.ENV_BINDING, "on")
    devices.release()
    yield d
    devices.release()


def _fakes(n):
    return [Candidate(i, f"fake{i}") for i in range(n)]


# ---- rules, in one process (flock locks of two open files conflict within a process too) ---------------

@pytest.mark.parametrize("cvd,expected", [
    (None, ["a0", "b1", "c2", "d3"]), ("2,0", ["c2", "a0"]), ("1,7,0", ["b1"]), ("", []), ("-1", []),
    ("c,a", ["c2", "a0"]), ("1,1,2", ["b1"]), (" 3 , 2", ["d3", "c2"]), ("x", [])])
def test_visible_reads_cuda_visible_devices_as_cuda_does(cvd, expected):
    assert devices.visible(["a0", "b1", "c2", "d3"], cvd) == expected


def test_slots_fill_device_by_device_then_busy_fails_naming_the_settings(locks):
    settings = Settings(lock_dir=locks, jobs_per_gpu=2, wait_minutes=0)
    held = [devices.acquire(_fakes(3), settings, job=f"j{k}") for k in range(6)]
    assert [(b.ident, b.slot) for b in held] == [("fake0", 0), ("fake1", 0), ("fake2", 0),
                                                  ("fake0", 1), ("fake1", 1), ("fake2", 1)]
    assert json.loads(held[4].lock.read_text())["job"] == "j4" and json.loads(held[4].lock.read_text())["pid"]
    with pytest.raises(DeviceBusyError, match=r"all 6 slot\(s\) \(3 device\(s\) x 2\).*fake1 slot 1: pid "
                                              r"\d+ on .* \(j4\).*device_binding\.wait_minutes.*jobs_per_gpu"):
        devices.acquire(_fakes(3), settings)
    held[4].release()
    again = devices.acquire(_fakes(3), settings)
    assert (again.ident, again.slot) == ("fake1", 1)  # the freed slot, and no other
    for b in [*held, again]:
        b.release()
    assert devices.acquire(_fakes(3), settings).ident == "fake0"  # all free again: lowest first


def test_no_visible_device_is_an_error(locks):
    with pytest.raises(devices.DropinfError, match="no visible device"):
        devices.acquire([], Settings(lock_dir=locks))


@pytest.mark.parametrize("key,value,config_key", [
    (devices.ENV_JOBS_PER_GPU, "0", "jobs_per_gpu"), (devices.ENV_JOBS_PER_GPU, "two", "jobs_per_gpu"),
    (devices.ENV_WAIT_MINUTES, "-1", "wait_minutes"), (devices.ENV_WAIT_MINUTES, "nan", "wait_minutes"),
    (devices.ENV_BINDING, "maybe", "enabled")])
def test_bad_settings_name_their_config_key(key, value, config_key):
    with pytest.raises(InvalidValueError, match=rf"{key}=.*device_binding\.{config_key}"):
        Settings.from_env({key: value})


def test_settings_default_to_a_node_local_directory_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(devices.tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    s = Settings.from_env({})
    assert not s.enabled and s.jobs_per_gpu == 1 and s.wait_minutes == devices.DEFAULT_WAIT_MINUTES
    assert s.directory() == tmp_path / f"dropinf-devices-{os.getuid()}"
    assert Settings.from_env({devices.ENV_BINDING: "on"}).enabled  # as the Snakefile sets it


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda of a node with two GPUs (UUIDs u0, u1); records set_device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=f"u{i}"))
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_resolve_device_binds_a_free_cuda_device_named_by_uuid(locks, fake_cuda):
    other_job = devices.acquire(devices.cuda_candidates(), Settings(lock_dir=locks))  # another process's
    assert other_job.ident == "GPU-u0" and other_job.lock == locks / "GPU-u0.slot0.lock"
    assert common.resolve_device("auto", job="score") == torch.device("cuda", 1)
    assert fake_cuda == [1]  # plain "cuda" in this process now means cuda:1
    b = devices.bound()
    assert (b.index, b.ident, b.slot, b.fake) == (1, "GPU-u1", 0, False)
    assert common.resolve_device("cuda") == torch.device("cuda", 1)  # one process, one device
    other_job.release()


@pytest.mark.parametrize("off", ["off", None])
def test_explicit_index_cpu_and_binding_off_take_no_device(locks, fake_cuda, monkeypatch, off):
    assert common.resolve_device("cuda:0") == torch.device("cuda:0")
    assert common.resolve_device("cpu") == torch.device("cpu")
    if off is None:  # off by default outside the workflow's jobs
        monkeypatch.delenv(devices.ENV_BINDING)
    else:
        monkeypatch.setenv(devices.ENV_BINDING, off)
    assert common.resolve_device("auto") == torch.device("cuda")
    assert devices.bound() is None and not list(locks.glob("*")) and fake_cuda == []


def test_without_cuda_auto_is_the_cpu_and_binds_nothing(locks, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.resolve_device("auto") == torch.device("cpu") and devices.bound() is None


def test_stage_records_the_binding_in_its_provenance(locks, monkeypatch):
    monkeypatch.setenv(devices.ENV_FAKE, "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage = common.Stage("extract", device="auto", threads=1)
    rec = stage.provenance()["device_binding"]
    assert rec["id"] == "fake0" and rec["slot"] == 0 and rec["fake"] is True and stage.device.type == "cpu"
    assert common.Stage("extract_finalize").provenance()["device_binding"] is None  # not a GPU stage
    assert common.Stage("score", device="cpu").provenance()["device_binding"] is None


# ---- real concurrent processes ---------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    # A GPU stage that prints its binding, computes on its device, then holds it until `go` exists.
    import json, sys, time
    from pathlib import Path
    import torch
    from dropinf.pipeline.common import Stage, setup_logging
    setup_logging()
    stage = Stage(sys.argv[1], device="auto", threads=1)
    x = torch.randn(256, 256, device=stage.device)
    (x @ x).sum().item()
    print(json.dumps({"binding": stage.base["device_binding"], "device": str(stage.device)}), flush=True)
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.05)
""")


class Worker:
    """A started worker process; its output lines are read by threads, so a test never hangs on them."""

    def __init__(self, cmd, env):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        self.lines = {"out": queue.Queue(), "err": queue.Queue()}
        self.err_text = []
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    def _pump(self, name, stream):
        for line in stream:
            if name == "err":
                self.err_text.append(line)
            self.lines[name].put(line)
        self.lines[name].put("")  # end of output

    def readline(self, name="out", timeout=120.0) -> str:
        try:
            return self.lines[name].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker {self.pid}: no output within {timeout} s") from None

    def stderr(self, timeout=120.0) -> str:
        """All of stderr, once the worker has exited."""
        self.proc.wait(timeout=timeout)
        while self.readline("err", timeout):
            pass
        return "".join(self.err_text)

    def wait(self, timeout=120.0) -> int:
        return self.proc.wait(timeout=timeout)


class Workers:
    def __init__(self, tmp_path, env):
        self.go = tmp_path / "go"
        self.env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **env}
        self.procs = []

    def start(self, name, **env):
        w = Worker([sys.executable, "-c", WORKER, name, str(self.go)], {**self.env, **env})
        self.procs.append(w)
        return w

    @staticmethod
    def bound(w):
        """The binding a started worker reports."""
        line = w.readline()
        assert line, f"worker exited {w.wait()}: {w.stderr()[-3000:]}"
        return json.loads(line)

    def finish(self):
        self.go.touch()
        for w in self.procs:
            try:
                w.wait(timeout=120)
            finally:
                if w.proc.poll() is None:
                    w.proc.kill()


@pytest.fixture
def workers(tmp_path, locks):
    w = Workers(tmp_path, {devices.ENV_LOCK_DIR: str(locks), devices.ENV_FAKE: "4", devices.ENV_WAIT_MINUTES: "0"})
    yield w
    w.finish()


@pytest.mark.slow
def test_concurrent_processes_get_distinct_devices_and_a_killed_one_frees_its_own(workers):
    procs = [workers.start(f"job{k}") for k in range(4)]
    got = [workers.bound(p)["binding"] for p in procs]
    assert sorted(b["id"] for b in got) == ["fake0", "fake1", "fake2", "fake3"]
    assert len({b["lock"] for b in got}) == 4
    # a fifth job finds all four held and, with no wait allowed, stops naming the holders and the setting
    fifth = workers.start("job4")
    assert fifth.wait(timeout=120) != 0
    err = fifth.stderr()
    assert "DeviceBusyError" in err or "all 4 slot(s)" in err, err[-3000:]
    assert "device_binding.wait_minutes" in err and f"pid {procs[2].pid}" in err, err[-3000:]
    # SIGKILL the holder of one device: the kernel drops its lock, the next job gets exactly that device
    victim = next(p for p, b in zip(procs, got) if b["id"] == "fake2")
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert workers.bound(workers.start("job5"))["binding"]["id"] == "fake2"


@pytest.mark.slow
def test_a_job_waits_for_a_free_device_with_a_log_line(workers, locks):
    held = [devices.acquire(_fakes(2), Settings(lock_dir=locks), job="holder") for _ in range(2)]
    p = workers.start("waiter", **{devices.ENV_FAKE: "2", devices.ENV_WAIT_MINUTES: "2"})
    line = ""
    while "waiting up to" not in line:  # it says so, and who holds what
        line = p.readline("err")
        assert line, f"worker exited {p.proc.poll()} before waiting: {''.join(p.err_text)[-3000:]}"
    assert "fake1 slot 0: pid" in line and "(holder)" in line and "device_binding.wait_minutes" in line
    held[1].release()
    b = workers.bound(p)["binding"]
    assert b["id"] == "fake1" and b["waited_seconds"] > 0
    held[0].release()


@pytest.mark.slow
def test_cuda_visible_devices_restricts_the_choice_and_devices_are_shared_by_name(workers):
    # CUDA_VISIBLE_DEVICES=2,3: this job sees two devices; its cuda index 0 is the node's fake2
    a = workers.bound(workers.start("a", CUDA_VISIBLE_DEVICES="2,3"))["binding"]
    assert (a["index"], a["id"]) == (0, "fake2")
    # another job numbers them the other way round: fake2 is taken, so its index 1 (fake2) is skipped
    b = workers.bound(workers.start("b", CUDA_VISIBLE_DEVICES="2,3,1"))["binding"]
    assert (b["index"], b["id"]) == (1, "fake3")
    # a job that may see only fake2 cannot have it
    c = workers.start("c", CUDA_VISIBLE_DEVICES="2")
    assert c.wait(timeout=120) != 0 and "all 1 slot(s)" in c.stderr()
    # a job that sees everything takes what is left, lowest first
    assert workers.bound(workers.start("d"))["binding"]["id"] == "fake0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_processes_share_one_real_gpu(tmp_path, locks):
    """jobs_per_gpu=k on a machine with CUDA: k processes compute at once on the visible GPUs, each
    in its own slot; with one GPU they all use cuda:0 in slots 0..k-1, and one more is refused."""
    k = int(os.environ.get("DROPINF_TEST_JOBS", "3"))
    n_dev = torch.cuda.device_count()
    w = Workers(tmp_path, {devices.ENV_LOCK_DIR: str(locks), devices.ENV_JOBS_PER_GPU: str(k),
                           devices.ENV_WAIT_MINUTES: "0"})
    try:
        procs = [w.start(f"job{i}") for i in range(k * n_dev)]
        got = [w.bound(p) for p in procs]
        assert len({(g["binding"]["id"], g["binding"]["slot"]) for g in got}) == k * n_dev
        assert all(g["device"] == f"cuda:{g['binding']['index']}" and not g["binding"]["fake"] for g in got)
        if n_dev == 1:
            assert sorted(g["binding"]["slot"] for g in got) == list(range(k))
        extra = w.start("one-too-many")
        assert extra.wait(timeout=300) != 0 and "device_binding.wait_minutes" in extra.stderr()
    finally:
        w.finish()
