"""What a burst of requests leaves behind in the worker (issue 11's load: RSS after <= 1.2x before).

Counts, not RSS: the run durations kept for p50/p99 are no objects (a float per run, kept until 10,000
later runs push it out, pinned Python's allocator arenas), the heap is trimmed once per quiet spell, and
WorkerProcess runs its workers on glibc's malloc, whose free pages that trim returns."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

from planwire.worker import heap
from planwire.worker.process import WorkerProcess
from planwire.worker.stats import Recent


def test_recent_keeps_the_last_values_in_order() -> None:
    r = Recent(4)
    assert len(r) == 0 and r.sorted() == []
    for v in (5.0, 1.0, 3.0):
        r.append(v)
    assert r.sorted() == [1.0, 3.0, 5.0]
    for v in (9.0, 7.0, 0.5):  # 5.0 and 1.0 pushed out
        r.append(v)
    assert len(r) == 4
    assert r.sorted() == [0.5, 3.0, 7.0, 9.0]


def test_recent_keeps_no_object_per_value() -> None:
    r = Recent(10_000)
    gc.collect()
    blocks = sys.getallocatedblocks()
    for i in range(5_000):
        r.append(i * 1e-3 + 0.123456)  # a fresh float each time, as a run's duration is
    gc.collect()
    assert sys.getallocatedblocks() - blocks < 100  # a deque of floats: +5,000


def test_trimmer_trims_once_per_quiet_spell() -> None:
    t = heap.Trimmer(quiet_s=0.0)
    t.idle()
    assert t.trims == 0  # nothing happened since the start: nothing to give back
    t.active()
    t.idle()  # the first idle call starts the quiet spell
    t.idle()
    t.idle()
    t.active()
    t.idle()
    t.idle()
    expected = 2 if heap._malloc_trim() is not None else 0  # glibc only
    assert t.trims == expected


def test_trimmer_waits_for_a_quiet_spell() -> None:
    t = heap.Trimmer(quiet_s=3600.0)
    t.active()
    for _ in range(3):
        t.idle()
    assert t.trims == 0


def test_worker_process_runs_the_worker_on_glibc_malloc() -> None:
    with WorkerProcess("heap") as w:
        environ = Path(f"/proc/{w.proc.pid}/environ").read_bytes().split(b"\0")
    expected = "PYTHONMALLOC=" + (os.environ.get("PYTHONMALLOC") or "malloc")
    assert expected.encode() in environ
