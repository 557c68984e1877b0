"""Pipelining: tiny plan calls per second with many in flight from one client to one worker."""

from __future__ import annotations

from typing import Any

from bench import plans
from bench.env import Env
from bench.timing import Case, Report, interleaved

FAMILY = "pipelining"
KEEP = "tiny calls, results kept, then flush [{}]"
DROP = "tiny calls, results dropped, then flush [{}]"
DEFAULT_SCHED = ", I/O threads at default scheduling"


def run(env: Env, report: Report, quick: bool) -> None:
    import torch

    n = 1000 if quick else 2000  # a sample: 2000 calls, 0.5 s at the sandboxed worker's ~4k calls/s
    cases = []
    for tr, sched in (("tcp", "batch"), ("ipc", "batch"), ("tcp", "default")):
        w = env.worker(tr, sched)
        ptr = w.plan_pointer(plans.tiny())
        xp = w.put(torch.randn(plans.SHAPE))

        def keep(w: Any = w, ptr: Any = ptr, xp: Any = xp) -> list:
            results = [ptr(xp) for _ in range(n)]
            w.flush()
            return results  # freed after the call: one delete message goes with the next request

        def drop(w: Any = w, ptr: Any = ptr, xp: Any = xp) -> None:
            for _ in range(n):
                ptr(xp)  # the result is freed at once: a delete message rides along with the next run
            w.flush()

        if sched == "batch":
            cases += [Case(KEEP.format(tr), keep, 1, warmup=1), Case(DROP.format(tr), drop, 1, warmup=1)]
        else:
            cases.append(Case(KEEP.format(tr) + DEFAULT_SCHED, keep, 1, warmup=1))
    # Rounds until the target's rate and the SCHED_BATCH/default ratio are within +-5% (95% interval), at least
    # 5 rounds, at most 12 or 10 s.
    watch = [(KEEP.format("tcp"), None), (KEEP.format("tcp") + DEFAULT_SCHED, KEEP.format("tcp"))]
    samples = interleaved(
        cases, rounds=2 if quick else 12, budget_s=8 if quick else 10, min_rounds=2 if quick else 5, watch=watch
    )
    for c in cases:
        report.rate(FAMILY, c.name, samples[c.name], n, "calls/s", note=f"{n} calls per run")
    report.on_figure(
        "tiny plan calls/s pipelined [tcp]",
        (FAMILY, KEEP.format("tcp")),
        ">=",
        10_000,
        basis="planwire alone: one client, one worker, 2 cores",
    )
    report.ratio(
        "pipelined calls/s, SCHED_BATCH vs default I/O threads [tcp]",
        (FAMILY, KEEP.format("tcp")),
        (FAMILY, KEEP.format("tcp") + DEFAULT_SCHED),
        basis="planwire against itself: what SCHED_BATCH changes",
    )
