"""What a burst of requests leaves behind in the worker (issue 11's load: RSS after <= 1.2x before).

Counts, not RSS: the run durations kept for p50/p99 are no objects (a float per run, kept until 10,000
later runs push it out, pinned Python's allocator arenas), the heap is trimmed once per quiet spell, and
plan-worker runs itself on glibc's malloc, whose free pages that trim returns."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

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


def test_recent_extend_is_append_in_order() -> None:
    a, b = Recent(4), Recent(4)
    for values in ([5.0, 1.0, 3.0], [9.0, 7.0, 0.5, 2.0, 8.0], []):  # wraps around twice
        a.extend(values)
        for v in values:
            b.append(v)
        assert len(a) == len(b) and a.sorted() == b.sorted()
    assert a.sorted() == [0.5, 2.0, 7.0, 8.0]


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker starts itself again on Linux only")
@pytest.mark.parametrize("preset", [None, "pymalloc"])
def test_plan_worker_runs_itself_on_glibc_malloc_unless_told_otherwise(preset, monkeypatch) -> None:
    """The same process (pid) serves after starting itself again with PYTHONMALLOC=malloc; an operator's
    own PYTHONMALLOC is kept."""
    if preset is None:
        monkeypatch.delenv("PYTHONMALLOC", raising=False)
    else:
        monkeypatch.setenv("PYTHONMALLOC", preset)
    with WorkerProcess("heap") as w:
        pid = w.proc.pid
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert w.proc.poll() is None
    assert f"PYTHONMALLOC={preset or 'malloc'}".encode() in environ
    assert b"planwire.worker" in cmdline
