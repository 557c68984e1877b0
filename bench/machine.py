"""What the numbers of a bench run were measured on: the machine, its load, the versions (bench/timing.py's
Report records them)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def io_thread_policies() -> list[str]:
    """Scheduling policy of this process's ZeroMQ I/O threads (Linux), e.g. ["SCHED_BATCH"]."""
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE") if hasattr(os, n)}
    out = []
    try:
        for tid in os.listdir("/proc/self/task"):
            if Path(f"/proc/self/task/{tid}/comm").read_text().startswith("ZMQbg/IO"):
                out.append(names.get(os.sched_getscheduler(int(tid)), "?"))
    except (OSError, AttributeError):
        pass
    return out


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (versions imported lazily: the bench imports them anyway)."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average_start": loadavg(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        info["hypervisor"] = fields.get("Hypervisor vendor", "").strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for mod in ("torch", "onnxruntime", "onnx", "numpy", "msgspec", "zmq"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - reporting only
            info[mod] = None
    try:
        import zmq

        info["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    return info


def thread_run_ns(pid: int, tid: int) -> int:
    """Nanoseconds thread ``tid`` of process ``pid`` has run (the scheduler's own count in /proc schedstat,
    exact where the clock ticks of /proc/PID/stat are 10 ms); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has run so far, every thread (0 for a thread that ended meanwhile)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    return sum(thread_run_ns(pid, int(tid)) for tid in tids) / 1e9
