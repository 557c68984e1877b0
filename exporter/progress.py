"""A build's stages (trace, export, verify) on stderr, once it has run longer than :data:`DELAY` seconds.

Builds served from the cache never get here; a build that exports starts one watcher thread, which shows
nothing unless the build is still running after the delay. On a terminal the stages are a tqdm bar that
updates in place; elsewhere (CI logs, pipes) one plain line per stage. ``PLANWIRE_PROGRESS=0`` or a
build's ``progress=False`` turns it off; ``progress=True`` shows it even where the environment says no.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

from planwire.transport.progress import enabled

DELAY = 1.0  # seconds a build runs before its stages are shown
REFRESH = 0.5  # seconds between redraws of a terminal bar (its clock keeps moving)
STAGES = ("trace", "export", "verify")

_current: ContextVar[_Build | None] = ContextVar("planwire_build_progress", default=None)


@contextmanager
def building(plan: str, *, show: bool | None = None, started: float | None = None) -> Iterator[None]:
    """Report the stages of building ``plan`` inside this block (``started``: ``time.perf_counter()`` at
    the start of the build, default now). A build nested in another reports through the outer one."""
    if _current.get() is not None or not enabled(show):
        yield
        return
    build = _Build(plan, time.perf_counter() if started is None else started)
    token = _current.set(build)
    ok = False
    try:
        yield
        ok = True
    finally:
        _current.reset(token)
        build.close(ok)


def stage(name: str) -> None:
    """Mark that the build in progress (if any is being reported) has reached stage ``name``."""
    build = _current.get()
    if build is not None:
        build.stage(name)


class _Build:
    """One reported build: the watcher shows it after the delay; stage() and close() update it."""

    def __init__(self, plan: str, started: float) -> None:
        self.plan, self.started = plan, started
        self.name = STAGES[0]
        self.file: TextIO = sys.stderr  # taken now: the exporter swaps sys.stderr while it runs
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.bar: Any = None
        self.shown = self.closed = False
        self.lock = threading.Lock()
        if DELAY - self.elapsed() <= 0:
            self.show()
        if not self.shown or self.tty:
            _watch(self)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def show(self) -> None:
        with self.lock:
            if self.shown or self.closed:
                return
            self.shown = True
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=len(STAGES),
                    initial=STAGES.index(self.name),
                    desc=f"building plan {self.plan!r}",
                    unit="stage",
                    file=self.file,
                    leave=True,
                    bar_format="{desc}: {bar:12} {n_fmt}/{total_fmt}{postfix} [{elapsed}]",
                    postfix=self.name,
                )
                self.bar.start_t -= self.elapsed()  # its clock starts with the build, not the bar
                self.bar.refresh()
            else:
                self._line(f"building plan {self.plan!r} ({', '.join(STAGES)}): {self.name}")

    def refresh(self) -> None:
        with self.lock:
            if self.bar is not None and not self.closed:
                self.bar.refresh()  # the elapsed clock moves on a terminal

    def stage(self, name: str) -> None:
        with self.lock:
            if name == self.name or name not in STAGES:
                return
            self.name = name
            if self.bar is not None:
                self.bar.n = STAGES.index(name)
                self.bar.set_postfix_str(name)
            elif self.shown:
                self._line(f"building plan {self.plan!r}: {name}")

    def close(self, ok: bool) -> None:
        with self.lock:
            self.closed = True
            if self.shown:
                outcome = "done" if ok else f"failed during {self.name}"
                if self.bar is not None:
                    if ok:
                        self.bar.n = len(STAGES)
                    self.bar.set_postfix_str(outcome)
                    self.bar.close()
                else:
                    verb = f"built plan {self.plan!r}" if ok else f"building plan {self.plan!r} {outcome}"
                    self._line(verb)
        with _cond:
            _active.discard(self)

    def _line(self, text: str) -> None:
        try:
            self.file.write(f"planwire: {text} ({self.elapsed():.1f} s)\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed stderr must not fail the build
            pass


# One watcher thread per process, started by the first build that exports (starting a thread per build
# would cost a warm build more than the check it replaces).
_cond = threading.Condition()
_active: set[_Build] = set()
_watcher: threading.Thread | None = None


def _watch(build: _Build) -> None:
    global _watcher
    with _cond:
        _active.add(build)
        if _watcher is None or not _watcher.is_alive():
            _watcher = threading.Thread(target=_loop, name="planwire-progress", daemon=True)
            _watcher.start()
        _cond.notify()


def _loop() -> None:
    with _cond:
        while True:
            now = time.perf_counter()
            waits = []
            for build in list(_active):
                if not build.shown:
                    due = build.started + DELAY - now
                    if due <= 0:
                        build.show()
                    else:
                        waits.append(due)
                if build.shown:
                    if not build.tty:
                        _active.discard(build)  # plain lines need no redraw
                        continue
                    build.refresh()
                    waits.append(REFRESH)
            _cond.wait(min(waits) if waits else None)
