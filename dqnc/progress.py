"""Progress of long work, one concept for every stage and evaluation: a *display* shows the *tasks*
opened inside it, and the code doing the work reports to the innermost task.

    with progress.shown(console):              # the CLI (dqnc.cli.guard) or a Python API call
        with progress.task("quantize (int8)"):  # one piece of work: a stage, an evaluation
            progress.update(phase="calibration states")
            progress.update(done, total, unit="steps", info="loss 0.12")

On a terminal the display is a live Rich progress bar per task. Anywhere else (CI logs, pipes) a
background ticker prints the innermost task's state as one plain line on the display's console:
the first after ``first`` seconds (5), then every ``interval`` seconds (10), so work under ~5 s
prints nothing and longer work is never silent for more than ``interval`` seconds, whether or not
the code reports counts (the label, phase and elapsed time are always known). ``--quiet`` (or
``shown(..., quiet=True)``) shows nothing.

Reporting is ambient (a context variable) rather than a callback argument, so the stage functions
keep their signatures (``dqnc.stages`` calls them, Ray runs them unchanged); with no display active
:func:`update` is a no-op costing one context-variable lookup.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

INTERVAL = 10.0  # seconds between plain lines
FIRST = 5.0  # seconds before a task's first plain line: shorter work prints none


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 03 min``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class Task:
    """One piece of work and what is known of it; :meth:`line` is its plain progress line."""

    label: str
    started: float
    phase: str | None = None
    done: float | None = None
    total: float | None = None
    unit: str = "steps"
    info: str | None = None
    printed: float | None = None  # when the ticker last printed it
    # The current phase's first count and its time: rate and ETA are measured within a phase.
    _mark: tuple[float, float] | None = field(default=None, repr=False)

    def set(self, now: float, done: float | None, total: float | None, unit: str | None, phase: str | None,
            info: str | None) -> None:
        if phase is not None and phase != self.phase:
            self.phase, self.done, self.total, self.info, self._mark = phase, None, None, None, None
        if unit is not None:
            self.unit = unit
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info
        if done is not None:
            self.done = done
            if self._mark is None:
                self._mark = (now, done)

    def rate(self, now: float) -> float | None:
        """Units per second since the phase's first count (None until a second has passed)."""
        if self._mark is None or self.done is None or now - self._mark[0] < 1.0 or self.done <= self._mark[1]:
            return None
        return (self.done - self._mark[1]) / (now - self._mark[0])

    def line(self, now: float) -> str:
        parts = [self.label + (f": {self.phase}" if self.phase else "")]
        if self.done is not None:
            count = f"{self.done:,.0f}" + (f"/{self.total:,.0f}" if self.total else "") + f" {self.unit}"
            if self.total:
                count += f" ({100 * min(1.0, self.done / self.total):.0f}%)"
            rate = self.rate(now)
            if rate is not None:
                count += f", {rate:,.0f} {self.unit}/s"
                if self.total and self.total > self.done:
                    count += f", ETA {duration((self.total - self.done) / rate)}"
            parts.append(count)
        if self.info:
            parts.append(self.info)
        return "; ".join(parts) + f" [{duration(now - self.started)}]"


class Display:
    """Shows the tasks opened inside it on ``console`` (a Rich Console): live bars when ``live``,
    otherwise plain lines from a ticker thread (:meth:`tick`)."""

    def __init__(self, console: Any, *, live: bool, interval: float | None = None, first: float | None = None,
                 clock: Callable[[], float] = time.monotonic, thread: bool = True) -> None:
        self.console, self.live, self.clock = console, live, clock
        self.interval = INTERVAL if interval is None else interval
        self.first = FIRST if first is None else first
        self.stack: list[Task] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._use_thread = thread
        self._bars: Any = None  # rich.progress.Progress, live mode
        self._ids: dict[int, Any] = {}
        self._printing = threading.Lock()
        self._out = None if live else _own_stderr(console)

    # --- tasks ---------------------------------------------------------------------------------
    def push(self, label: str) -> Task:
        task = Task(label, self.clock())
        with self._lock:
            self.stack.append(task)
        if self.live:
            self._live_add(task)
        elif self._use_thread and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dqnc-progress", daemon=True)
            self._thread.start()
        return task

    def pop(self, task: Task) -> None:
        with self._lock:
            if task in self.stack:
                self.stack.remove(task)
        if self.live and id(task) in self._ids:
            self._bars.remove_task(self._ids.pop(id(task)))
            if not self._ids:
                self._bars.stop()

    def update(self, done: float | None = None, total: float | None = None, *, unit: str | None = None,
               phase: str | None = None, info: str | None = None) -> None:
        with self._lock:
            task = self.stack[-1] if self.stack else None
        if task is None:
            return
        old_phase = task.phase
        task.set(self.clock(), done, total, unit, phase, info)
        if self.live and id(task) in self._ids:
            self._live_update(task, reset=task.phase != old_phase)
        elif not self.live:
            self.tick()  # a line due now is printed even when the ticker thread cannot run

    # --- plain lines ---------------------------------------------------------------------------
    def tick(self) -> str | None:
        """Print the innermost task's line if it is due; return what was printed."""
        now = self.clock()
        with self._lock:
            task = self.stack[-1] if self.stack else None
        if task is None or now < (task.started + self.first if task.printed is None else task.printed + self.interval):
            return None
        if not self._printing.acquire(blocking=False):  # the other thread is printing it
            return None
        try:
            task.printed = now
            line = task.line(now)
            # One line per report, never folded: CI logs and grep read it whole.
            if self._out is not None:
                self._out.write(line + "\n")
            else:
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return line
        finally:
            self._printing.release()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.tick()

    # --- live bars -----------------------------------------------------------------------------
    def _live_add(self, task: Task) -> None:
        from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        if self._bars is None:
            # Labels and infos are text, not markup ("[train] CartPole-v1").
            self._bars = Progress(SpinnerColumn(), TextColumn("{task.description}", style="bold", markup=False),
                                  BarColumn(), TextColumn("{task.fields[count]}", markup=False),
                                  TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(),
                                  TimeRemainingColumn(), console=self.console, transient=True)
        if not self._ids:
            self._bars.start()
        self._ids[id(task)] = self._bars.add_task(task.label, total=None, count="", info="")

    def _live_update(self, task: Task, reset: bool) -> None:
        tid = self._ids[id(task)]
        desc = task.label + (f": {task.phase}" if task.phase else "")
        count = "" if task.done is None else f"{task.done:,.0f}" + (f"/{task.total:,.0f}" if task.total else "") + \
            f" {task.unit}"
        if reset:
            self._bars.reset(tid, total=task.total, completed=task.done or 0, description=desc, count=count,
                             info=task.info or "")
        else:
            self._bars.update(tid, total=task.total, completed=task.done or 0, description=desc, count=count,
                              info=task.info or "")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._bars is not None and self._ids:
            self._bars.stop()
            self._ids.clear()


def _own_stderr(console: Any) -> Any:
    """A line-buffered handle on the process's stderr when ``console`` writes there, else None.

    dqnc points fd 2 at a scratch file while TensorFlow imports and converts (dqnc.runtime.quiet_stderr
    keeps its C++ chatter off the terminal), which can take tens of seconds; progress lines written to
    a duplicate of the original fd reach the log all the same."""
    try:
        if console.file.fileno() != 2:
            return None
        console.file.flush()
        return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # not a real file (a test's buffer, a notebook)
        return None


_DISPLAY: contextvars.ContextVar[Display | None] = contextvars.ContextVar("dqnc_progress", default=None)


def current() -> Display | None:
    return _DISPLAY.get()


class _Silent(Display):
    """The display of ``--quiet``: tasks and updates inside are accepted and shown nowhere."""

    def __init__(self) -> None:
        super().__init__(None, live=False, thread=False)

    def push(self, label: str) -> Task:
        return Task(label, 0.0)

    def pop(self, task: Task) -> None:
        pass

    def update(self, done: float | None = None, total: float | None = None, *, unit: str | None = None,
               phase: str | None = None, info: str | None = None) -> None:
        pass


@contextmanager
def shown(console: Any = None, *, quiet: bool = False, live: bool | None = None, interval: float | None = None,
          first: float | None = None) -> Iterator[Display]:
    """Show the progress of tasks opened inside (on ``console``, default: a Rich console on stderr):
    live when the console is a terminal (or ``live``), plain lines otherwise; nothing when ``quiet``.
    Inside another display (a quiet one included), that one stays in charge: a Python API call made
    by a CLI command shows its progress as the command does."""
    outer = _DISPLAY.get()
    if outer is not None:
        yield outer
        return
    if quiet:
        display: Display = _Silent()
    else:
        if console is None:
            from rich.console import Console

            console = Console(stderr=True, highlight=False)
        display = Display(console, live=console.is_terminal if live is None else live, interval=interval, first=first)
    token = _DISPLAY.set(display)
    try:
        yield display
    finally:
        _DISPLAY.reset(token)
        display.close()


@contextmanager
def task(label: str) -> Iterator[None]:
    """Report the work inside as ``label`` on the active display (nothing without one)."""
    display = _DISPLAY.get()
    if display is None:
        yield
        return
    t = display.push(label)
    try:
        yield
    finally:
        display.pop(t)


def update(done: float | None = None, total: float | None = None, *, unit: str | None = None,
           phase: str | None = None, info: str | None = None) -> None:
    """Report to the innermost task: a new ``phase`` (resets the count), ``done`` of ``total``
    ``unit``, and a short ``info`` (e.g. the latest evaluation)."""
    display = _DISPLAY.get()
    if display is not None:
        display.update(done, total, unit=unit, phase=phase, info=info)


def train_update(p: Any) -> None:
    """The train stage's callback (``dqnc.train.Progress``): steps, episodes, latest evaluation."""
    info = f"{p.episodes:,} episodes"
    if p.eval_mean is not None:
        info += f", eval {p.eval_mean:.1f}" + (f" (best {p.best_mean:.1f})" if p.best_mean is not None else "")
    update(p.step, p.total, unit="steps", info=info + f", epsilon {p.epsilon:.2f}")


def counted(fn: Callable[[Any], Any], unit: str = "steps") -> Callable[[Any], Any]:
    """``fn`` (a batched policy) reporting the rows it is called on as ``unit`` done."""
    seen = [0]

    def call(batch: Any) -> Any:
        seen[0] += len(batch)
        update(seen[0], unit=unit)
        return fn(batch)

    return call
