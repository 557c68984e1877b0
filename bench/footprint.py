"""Footprint: plan-worker start-to-ready time and resident memory, idle and after the benchmark load."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from bench.env import Env
from bench.timing import Report, Timed
from planwire.transport.remote import connect
from planwire.worker.process import WorkerProcess

FAMILY = "footprint"
MB = 1e6
READY = "start to ready line (WorkerProcess) [tcp]"
HELLO = "start to first reply (ready + connect/hello) [tcp]"
IDLE = "worker RSS idle, after hello [tcp]"


def start_times(env: Env, runs: int) -> tuple[list[float], list[float], list[float]]:
    ready, hello, rss = [], [], []
    for i in range(runs):
        t0 = time.perf_counter()
        proc = WorkerProcess(f"bench-start-{i}", listen="tcp://127.0.0.1:0")
        try:
            ready.append(time.perf_counter() - t0)
            client = connect(proc.url, timeout=30)
            hello.append(time.perf_counter() - t0)
            rss.append(psutil.Process(proc.proc.pid).memory_info().rss)
            client.close()
        finally:
            proc.close()
    return ready, hello, rss


def import_time(runs: int) -> list[float]:
    """Seconds to import the worker CLI module in a fresh interpreter (what start-up pays before serving)."""
    code = "import time; t = time.perf_counter(); import planwire.worker.cli; print(time.perf_counter() - t)"
    return [
        float(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
        )
        for _ in range(runs)
    ]


def run_start(env: Env, report: Report, quick: bool) -> None:
    """Measured first, on a quiet machine."""
    ready, hello, rss = start_times(env, 3 if quick else 7)
    report.time(FAMILY, READY, Timed(ready), "ms")  # each start its own sample: the median's interval
    report.time(FAMILY, HELLO, Timed(hello), "ms")
    report.time(FAMILY, "import planwire.worker.cli in a fresh interpreter", import_time(3 if quick else 5), "ms")
    report.values(FAMILY, IDLE, [v / MB for v in rss], "MB")
    alone = "planwire alone (no baseline)"  # targets on the figures, with their intervals (over the starts)
    report.on_figure("worker start-to-ready", (FAMILY, HELLO), "<=", 1000, basis=alone)
    report.on_figure("worker idle RSS", (FAMILY, IDLE), "<=", 150, basis=alone)


def run_loaded(env: Env, report: Report, quick: bool) -> None:
    """Measured last: the workers that served every other benchmark."""
    for tr in ("tcp", "ipc"):
        if tr in env._workers:
            info = psutil.Process(env.worker_pid(tr)).memory_info()
            report.add(FAMILY, f"worker RSS after the benchmark load [{tr}]", _rss_figure([info.rss]))


def _rss_figure(values: list[int]):  # noqa: ANN202
    from bench.timing import Figure, percentile

    v = sorted(values)
    return Figure(v[len(v) // 2] / MB, percentile(v, 90) / MB, len(v), "MB")
