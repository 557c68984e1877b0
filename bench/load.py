"""Load: many client processes on one plan-worker, and ``kill -9`` under load with ``--state-dir`` (issue 11).

- **Many clients.** 16 client processes x 10,000 pipelined calls each (1,000 with ``--quick``) on one
  worker (tcp, sandboxed runner). A call is ``y = x + x`` on ``x = [client, call]`` (int64), and each result
  is checked against its own input: a call without its result (an error, a timeout) is *lost*, a result
  that is another call's is *crossed*; both must be 0. The worker's RSS (the process holding the data)
  after all calls must stay within 1.2x of its RSS before them (every client connected and warmed up);
  "after" is read once the worker has been quiet for ``SETTLE_S``, as "before" is: a worker gives the heap a
  burst used back once the burst is over (worker/heap.py), and its peak is not what it keeps.
  Calls/s: all calls over the time from "go" to the last client done.
- **kill -9 under load.** 8 client processes (4 with ``--quick``) each put tensors and run the plan into
  named output keys, one acknowledged request after another, on a worker with ``--state-dir``. The worker
  is killed with SIGKILL mid-load and started again on the same directory; every client goes on (same
  session, its identity presented again, no plan sent again) and reads back every object whose request was
  acknowledged before the kill: none may be missing or different.

The clients are this module run as ``python -m bench.load --client MODE URL ID N PLAN``: they print
``ready`` once connected, wait for ``go`` on stdin, then print one JSON line of counts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

FAMILY = "load"
CLIENTS = 16
CALLS = 10_000
DURABLE_CLIENTS = 8
DEPTH = 256  # calls in flight per client before its oldest result is read and checked
READINGS = 10  # RSS readings 0.1 s apart, before and after the load: each side a figure of its readings
SETTLE_S = 2.0  # seconds between the last client done and the worker's RSS "after" (worker/heap.py's QUIET_S: 1)
ALONE = "planwire alone (no baseline): one worker, many client processes, 2 cores"
RSS_BEFORE, RSS_AFTER = "worker RSS before the load [tcp]", "worker RSS after the load [tcp]"


# -- the plan and its source (no torch, no onnx in the clients) -----------------------------------------------


def plan_bytes() -> bytes:
    """y = x + x over int64 of shape [2]."""
    import onnx
    from onnx import TensorProto, helper

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, ["n"])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [vi("x")], [vi("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _Source:
    """A PlanSource of one fixed variant (what a client needs to call a plan it did not build)."""

    name = "double"

    def __init__(self, data: bytes) -> None:
        from planwire.transport.spec import PlanVariant, TensorSpec

        spec = lambda n: TensorSpec(n, "int64", ("n",))  # noqa: E731
        self.variants = [PlanVariant(data, (spec("x"),), (spec("y"),))]

    def variant_for(self, args: Any) -> Any:
        return self.variants[0]


# -- client processes -----------------------------------------------------------------------------------------


def _ready_then_go() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)


def client_calls(url: str, cid: int, n: int, plan: Path) -> dict:
    """``n`` pipelined calls, each result checked against its own input."""
    from planwire.transport import connect

    c = connect(url, timeout=120)
    pp = c.plan_pointer(_Source(plan.read_bytes()))
    assert pp(np.array([cid, -1], np.int64)).get().tolist() == [2 * cid, -2]
    _ready_then_go()
    lost = crossed = 0
    t0 = time.perf_counter()
    pending: deque = deque()

    def check() -> None:
        nonlocal lost, crossed
        i, p = pending.popleft()
        try:
            y = p.get()
        except Exception:  # noqa: BLE001 - counted: any call without its result is lost
            lost += 1
            return
        if y.tolist() != [2 * cid, 2 * i]:
            crossed += 1

    for i in range(n):
        pending.append((i, pp(np.array([cid, i], np.int64))))
        if len(pending) >= DEPTH:
            check()
    while pending:
        check()
    seconds = time.perf_counter() - t0
    c.close()
    return {"calls": n, "lost": lost, "crossed": crossed, "seconds": seconds}


def client_durable(url: str, cid: int, max_ops: int, plan: Path) -> dict:
    """Acknowledged puts and runs into named keys until the worker goes; then wait for it to come back and
    read every acknowledged object."""
    from planwire.transport import connect

    c = connect(url, timeout=30)
    source = _Source(plan.read_bytes())
    variant = source.variants[0]
    c.plan_pointer(source)  # registered once, before the kill: never again after it
    session = c.session
    _ready_then_go()
    acked: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    i = 0
    while i < max_ops:
        key, value = f"d{cid}-{i}", np.full(256, cid * 1_000_000 + i, np.int64)  # 2 KiB each
        try:
            if i % 2:
                c.run(variant, [value], outputs=[key], fetch=[0], wait=True)
                acked[key] = [2 * int(value[0]), value.size]
            else:
                c.put_many({key: value}, owned=False)
                acked[key] = [int(value[0]), value.size]
        except Exception:  # noqa: BLE001 - the worker went (killed): what was acknowledged is in ``acked``
            break
        i += 1
    seconds = time.perf_counter() - t0
    deadline = time.monotonic() + 120
    while True:  # the worker comes back on the same directory
        try:
            c.ping()
            break
        except Exception:  # noqa: BLE001 - not back yet
            if time.monotonic() > deadline:
                return {"acked": len(acked), "back": 0, "wrong": 0, "same_session": False, "error": "no worker"}
            time.sleep(0.1)
    back = wrong = 0
    keys = list(acked)
    for start in range(0, len(keys), 128):
        chunk = keys[start : start + 128]
        try:
            arrays = c.fetch_arrays(chunk, keep=True)
        except Exception:  # noqa: BLE001 - one is missing: read them one by one to count which
            arrays = []
            for key in chunk:
                try:
                    arrays += c.fetch_arrays([key], keep=True)
                except Exception:  # noqa: BLE001 - missing after the restart
                    arrays.append(None)
        for key, array in zip(chunk, arrays, strict=True):
            if array is None:
                continue
            back += 1
            value, size = acked[key]
            if array.size != size or not (array == value).all():
                wrong += 1
    # It goes on: the plan is still registered in the kept session (not sent again).
    y = c.run(variant, [np.array([cid, 7], np.int64)], fetch=[0], wait=True)[0].get()
    ok = y.tolist() == [2 * cid, 14]
    out = {"acked": len(acked), "back": back, "wrong": wrong, "same_session": c.session == session}
    out |= {"ops_before_kill": i, "seconds": seconds, "goes_on": ok}
    c.close()
    return out


# -- the family -----------------------------------------------------------------------------------------------


def _spawn(mode: str, url: str, cid: int, n: int, plan: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.load", "--client", mode, url, str(cid), str(n), str(plan)]
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)


def _readings(proc: Any) -> list[int]:
    """:data:`READINGS` readings of ``proc``'s (a psutil.Process) RSS, 0.1 s apart."""
    out = []
    for i in range(READINGS):
        if i:
            time.sleep(0.1)
        out.append(proc.memory_info().rss)
    return out


def _all_ready(procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        line = p.stdout.readline().strip()  # type: ignore[union-attr]
        if line != "ready" or time.monotonic() > deadline:
            raise RuntimeError(f"a load client did not start (said {line!r}, exit {p.poll()})")


def _go(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]


def _results(procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        lines = stdout.strip().splitlines()
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"a load client failed (exit {p.returncode})")
        out.append(json.loads(lines[-1]))
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def run(env: Any, report: Any, quick: bool) -> None:
    import psutil

    from planwire.transport.remote import connect
    from planwire.worker.process import WorkerProcess

    plan = env.tmp / "load-double.onnx"
    plan.write_bytes(plan_bytes())
    n = 1_000 if quick else CALLS

    # 1. Many clients, every result checked.
    with WorkerProcess("bench-load", listen="tcp://127.0.0.1:0") as worker:
        warm = connect(worker.url, timeout=60)
        pp = warm.plan_pointer(_Source(plan.read_bytes()))
        for i in range(200):
            assert pp(np.array([0, i], np.int64)).get().tolist() == [0, 2 * i]
        warm.close()
        proc = psutil.Process(worker.proc.pid)
        procs = [_spawn("calls", worker.url, cid, n, plan) for cid in range(1, CLIENTS + 1)]
        try:
            _all_ready(procs)
            befores = _readings(proc)  # every client connected, its plan registered, one call made
            t0 = time.perf_counter()
            _go(procs)
            results = _results(procs, timeout=600)
            wall = time.perf_counter() - t0
        finally:
            _stop(procs)
        at_end = proc.memory_info().rss  # at the last reply: the burst's own memory, not yet given back
        time.sleep(SETTLE_S)
        afters = _readings(proc)
        runner = sum(c.memory_info().rss for c in proc.children())
    calls = sum(r["calls"] for r in results)
    lost, crossed = sum(r["lost"] for r in results), sum(r["crossed"] for r in results)
    what = f"{CLIENTS} client processes x {n} calls [tcp]"
    report.count(FAMILY, f"calls/s, {what}", calls / wall, "calls/s", note=f"{calls} calls in {wall:.1f} s")
    report.count(FAMILY, f"calls lost, {what}", lost, "calls")
    report.count(FAMILY, f"calls crossed, {what}", crossed, "calls")
    apart = f"{READINGS} readings 0.1 s apart"
    report.values(FAMILY, RSS_BEFORE, [b / 1e6 for b in befores], "MB", note=f"clients connected, warmed up; {apart}")
    settled = f"{SETTLE_S:g} s after the last client; {apart}; runner: {runner / 1e6:.0f} MB"
    report.count(FAMILY, "worker RSS at the last reply of the load [tcp]", at_end / 1e6, "MB", note="the burst's peak")
    report.values(FAMILY, RSS_AFTER, [a / 1e6 for a in afters], "MB", note=settled)
    # exact counts (no sampling noise): their values decide; the RSS ratio's interval comes from its figures' readings
    report.target(f"calls lost under load ({what})", lost, "<=", 0, "calls", "each result checked", basis=ALONE,
                  exact=True)  # fmt: skip
    report.target(f"calls crossed under load ({what})", crossed, "<=", 0, "calls", "against its input", basis=ALONE,
                  exact=True)  # fmt: skip
    rss = (FAMILY, RSS_AFTER), (FAMILY, RSS_BEFORE)
    report.ratio("worker RSS after / before the load", *rss, "<=", 1.2, basis=ALONE)

    # 2. kill -9 under load, --state-dir, restart: every acknowledged object back.
    from bench.env import free_port

    url = f"tcp://127.0.0.1:{free_port()}"
    extra = ["--state-dir", str(env.tmp / "load-state")]
    k = 4 if quick else DURABLE_CLIENTS
    first = WorkerProcess("bench-durable", listen=url, extra=extra)
    second = None
    procs = [_spawn("durable", url, cid, 100_000, plan) for cid in range(1, k + 1)]
    try:
        _all_ready(procs)
        _go(procs)
        time.sleep(1.5 if quick else 3.0)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        t0 = time.perf_counter()
        second = WorkerProcess("bench-durable", listen=url, extra=extra, ready_timeout=120)
        restart = time.perf_counter() - t0
        results = _results(procs, timeout=300)
    finally:
        _stop(procs)
        first.close()
        if second is not None:
            second.close()
    acked = sum(r["acked"] for r in results)
    missing = acked - sum(r["back"] for r in results)
    wrong = sum(r["wrong"] for r in results)
    same = sum(bool(r["same_session"]) and bool(r.get("goes_on")) for r in results)
    ops_s = sum(r["ops_before_kill"] / r["seconds"] for r in results if r.get("seconds"))
    where = f"{k} client processes, --state-dir [tcp]"
    report.count(FAMILY, f"acknowledged puts and runs before kill -9, {where}", acked, "objects")
    report.count(FAMILY, f"acknowledged requests/s with --state-dir, {where}", ops_s, "requests/s",
                 note="each one waited for its writes to be durable (group commit)")  # fmt: skip
    report.count(FAMILY, "restart to ready on the state dir after kill -9", restart, "s", note=f"{acked} objects")
    report.count(FAMILY, "clients going on in the same session after the restart", same, "clients", note=f"of {k}")
    report.target(
        "acknowledged objects missing or changed after kill -9 and restart",
        missing + wrong,
        "<=",
        0,
        "objects",
        f"{acked} acknowledged, {missing} missing, {wrong} changed",
        basis=ALONE,
        exact=True,
    )
    report.target("clients that go on without re-registering after the restart", same, ">=", k, "clients",
                  "same session, plan still registered", basis=ALONE, exact=True)  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) != 6 or argv[0] != "--client":
        print("usage: python -m bench.load --client calls|durable URL ID N PLAN", file=sys.stderr)
        return 2
    mode, url, cid, n, plan = argv[1], argv[2], int(argv[3]), int(argv[4]), Path(argv[5])
    logging.getLogger("planwire").setLevel(logging.ERROR)  # the lost requests at the kill are counted, not logged
    fn = client_calls if mode == "calls" else client_durable
    print(json.dumps(fn(url, cid, n, plan)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
