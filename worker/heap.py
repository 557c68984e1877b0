"""Give the heap a burst freed back to the system once the worker is idle (glibc's ``malloc_trim``).

A burst of requests (16 clients x 256 calls in flight) peaks at tens of MB of ZeroMQ message buffers and
queued requests; once freed, glibc keeps most of it in its arenas (a thread's arena is never shrunk below
a chunk still in use, and the main one only from the top), so the worker's RSS stayed ~30 MB above where it
was before (bench/load.py). ``malloc_trim(0)`` returns every free page of every arena. It walks the arenas
(a few ms), so it runs once per quiet spell: after ``QUIET_S`` without a request following activity.
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time

QUIET_S = 1.0  # seconds without a request before the heap is trimmed (once per quiet spell)


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None


class Trimmer:
    """``active()`` when a request arrives while idle, ``idle()`` when none did: the heap is trimmed once
    per quiet spell that follows activity."""

    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self.quiet_s = quiet_s
        self.trims = 0
        self._fn = _malloc_trim()
        self._dirty = False  # a request came since the last trim
        self._quiet_since: float | None = None  # monotonic time of the first idle() after it

    def active(self) -> None:
        self._dirty = True
        self._quiet_since = None

    def idle(self) -> None:
        if not self._dirty:
            return
        now = time.monotonic()
        if self._quiet_since is None:
            self._quiet_since = now
        elif now - self._quiet_since >= self.quiet_s:
            self._dirty = False
            gc.collect()  # the burst's reference cycles: nothing else collects them while the worker is idle
            if self._fn is not None:
                self._fn(0)
                self.trims += 1
