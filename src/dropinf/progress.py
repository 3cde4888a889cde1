"""Progress bars of the long loops (extraction batches, solver passes, training steps, subset models).

One policy for every loop, through `bar(...)` (a `tqdm` bar):

* On a terminal: an ordinary tqdm bar, drawn once the loop has run `DELAY` seconds (loops shorter
  than that draw nothing).
* Anywhere else (a job's log file, a pipe, a notebook's captured stderr): whole lines, no carriage
  returns: one when the loop has run `DELAY` seconds, one as it passes 25, 50 and 75 %, one every
  `LOG_INTERVAL` seconds in between at most, and one when it ends. A loop of any length writes at
  most 5 + its duration / `LOG_INTERVAL` lines, e.g.
  ``12:01:07 PROGRESS extract dropout r=64 seed 0 train:  50% 5000/10000 ex [0:41 elapsed, ~0:41 left, 122 ex/s]``
* Off: `progress=False` (Python API: `dropinf.extract(..., progress=False)`,
  `dropinf.influence(..., progress=False)`), or the environment variable ``DROPINF_PROGRESS=0``
  (what `dropinf --no-progress` and the workflow's config ``progress: false`` set).
  `progress=True` shows bars whatever the environment says; `None` (the default) follows it.

Bars never change what a loop computes: they only count.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

#: environment variable that turns every bar off when set to 0 / false / no / off
ENV = "DROPINF_PROGRESS"
#: seconds a loop runs before its bar shows (shorter loops stay silent)
DELAY = 2.0
#: log mode: at most one time-based line per this many seconds (besides the 25/50/75 % lines)
LOG_INTERVAL = 60.0
_OFF = ("0", "false", "no", "off")


def enabled(progress: bool | None = None) -> bool:
    """Whether a bar shows: `progress` when given, else the environment (`ENV`, default on)."""
    if progress is not None:
        return bool(progress)
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


def set_enabled(on: bool) -> None:
    """Default for every later bar of this process and of the processes it starts."""
    os.environ[ENV] = "1" if on else "0"


def bar(iterable=None, *, total=None, desc: str | None = None, unit: str = "it", progress: bool | None = None,
        leave: bool | None = None, file=None, delay: float | None = None, interval: float | None = None) -> tqdm:
    """A progress bar over `iterable` (or updated by hand with `.update(k)` up to `total`).

    Terminal: tqdm's bar; otherwise `LogBar` lines (see the module doc). `progress`: True, False
    or None (the environment decides). `delay`, `interval`: override `DELAY`, `LOG_INTERVAL`."""
    file = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    kw = dict(total=total, desc=desc, unit=unit, leave=leave, file=file, disable=not enabled(progress),
              delay=DELAY if delay is None else float(delay))
    isatty = getattr(file, "isatty", None)
    if callable(isatty) and isatty():
        return tqdm(iterable, dynamic_ncols=True, **kw)
    return LogBar(iterable, interval=LOG_INTERVAL if interval is None else float(interval), **kw)


def _number(x: float) -> str:
    return tqdm.format_sizeof(x) if x >= 1000 else f"{x:.3g}"


class LogBar(tqdm):
    """tqdm writing whole lines at a bounded rate (for log files): see the module doc."""

    MARKS = (25.0, 50.0, 75.0)
    monitor_interval = 0  # no tqdm monitor thread: lines come only from the loop's own updates

    def __init__(self, *args, interval: float = LOG_INTERVAL, **kwargs):
        self._interval, self._lines, self._next_mark, self._last_line, self._last_n = interval, 0, 0, None, None
        kwargs.setdefault("mininterval", min(0.5, interval))  # how often tqdm asks to redraw; `display` decides
        super().__init__(*args, **kwargs)

    def _percent(self) -> float | None:
        return 100.0 * self.n / self.total if self.total else None

    def display(self, msg=None, pos=None):
        if msg is not None:  # tqdm clearing or overwriting the line: nothing to do in a log
            return False
        now = time.monotonic()
        pct = self._percent()
        passed = 0
        while pct is not None and self._next_mark < len(self.MARKS) and pct >= self.MARKS[self._next_mark]:
            self._next_mark += 1
            passed += 1
        due = self._last_line is None or passed or now - self._last_line >= self._interval
        if due:
            self._write(now)
        return True

    def _write(self, now: float) -> None:
        self._last_line, self._lines, self._last_n = now, self._lines + 1, self.n
        self.fp.write(f"{time.strftime('%H:%M:%S')} PROGRESS {self.line()}\n")
        getattr(self.fp, "flush", lambda: None)()

    def line(self) -> str:
        """The bar's state as one line of text."""
        d = self.format_dict
        elapsed, n, total, unit = d["elapsed"], d["n"], d["total"], d["unit"]
        rate = n / elapsed if elapsed > 0 else None
        head = f"{d['prefix']}: " if d["prefix"] else ""
        if total:
            head += f"{100.0 * n / total:3.0f}% {n}/{total} {unit}"
        else:
            head += f"{n} {unit}"
        when = f"{self.format_interval(elapsed)} elapsed"
        if total and rate and n < total:
            when += f", ~{self.format_interval((total - n) / rate)} left"
        if rate:
            when += f", {_number(rate)} {unit}/s" if rate >= 1 else f", {_number(1 / rate)} s/{unit}"
        post = f", {d['postfix']}" if d.get("postfix") else ""
        return f"{head} [{when}{post}]"

    def close(self):
        if self.disable:
            return
        # the last line: when the bar showed, or the loop (or its last step) outlasted the delay
        shown = self._lines or time.time() - self.start_t >= self.delay
        if shown and self.n != self._last_n:
            self._write(time.monotonic())
        self.leave = False  # tqdm's own close then only "clears" the line, which `display` ignores
        super().close()
