"""Training: one training-plan step on a worker vs the eager torch step of the same model and batch.

A plan step is one run message; "synchronous" fetches each step's loss (run + get), "pipelined" sends
steps back to back and fetches the last loss only. The worker runs onnxruntime with one intra-op thread
(``--threads 1``, the default). Same CPU on both sides:

* synchronous: the client waits while the worker computes, one core busy at a time: against eager torch
  on 1 thread (like for like); eager torch on 2 threads shown beside;
* pipelined: client and worker overlap, so planwire may use both cores: against the faster of eager torch
  on 1 and on 2 threads (like for like: the best eager torch does with the same 2 cores; on small models
  a second intra-op thread can cost more than it brings); each thread count shown beside.
"""

from __future__ import annotations

import copy
from typing import Any

from bench.env import Env
from bench.timing import Case, Report, interleaved

FAMILY = "training"
BATCH = 64
PIPELINE = 20  # steps per pipelined run


def models() -> dict[str, Any]:
    from torch import nn

    return {
        "MLP 64-128-10": nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
        "CNN conv8-pool-fc": nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
        ),
    }


def run(env: Env, report: Report, quick: bool) -> None:
    try:
        from planwire.exporter import optim, training_plan
    except ImportError as e:
        report.skipped[FAMILY] = f"training plans not available ({e})"
        return
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(0)
    w = env.worker("tcp")
    x, y = torch.randn(BATCH, 1, 8, 8), torch.randint(0, 10, (BATCH,))
    xp, yp = w.put(x), w.put(y)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for name, model in models().items():
            eager_model = copy.deepcopy(model)
            step = training_plan(
                model,
                loss=F.cross_entropy,
                optimizer=optim.SGD(lr=0.1, momentum=0.9),
                args_shape=[(-1, 1, 8, 8), (-1,)],
                args_dtypes=[torch.float32, torch.int64],
            )
            ptr = step.send(w)
            opt = torch.optim.SGD(eager_model.parameters(), lr=0.1, momentum=0.9)

            def eager_step(model: Any = eager_model, opt: Any = opt) -> Any:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                return loss

            first_plan, first_eager = float(ptr(xp, yp).get()), float(eager_step())
            assert abs(first_plan - first_eager) < 1e-4 * max(1.0, abs(first_eager)), (first_plan, first_eager)

            def sync(ptr: Any = ptr) -> Any:
                return ptr(xp, yp).get()

            def pipelined(ptr: Any = ptr) -> Any:
                for _ in range(PIPELINE - 1):
                    ptr(xp, yp)
                return ptr(xp, yp).get()

            def eager_many(step: Any = eager_step, threads: int = 1) -> Any:
                torch.set_num_threads(threads)
                try:
                    for _ in range(PIPELINE - 1):
                        step()
                    return float(step())
                finally:
                    torch.set_num_threads(1)

            sync_name = f"{name}: plan step on worker, synchronous (run + get loss) [tcp]"
            pipe_name = f"{name}: plan step on worker, pipelined [tcp]"
            eager = {t: f"{name}: eager torch step ({t} thread{'s' if t > 1 else ''})" for t in (1, 2)}
            cases = [
                Case(sync_name, sync, 20),
                Case(pipe_name, pipelined, 1),
                Case(eager[1], eager_many, 1),
                Case(eager[2], lambda eager_many=eager_many: eager_many(threads=2), 1),
            ]
            # A round is ~0.1 s: rounds until every ratio below is within +-5% (95% interval), at least 6.
            watch = [(pipe_name, eager[t]) for t in (1, 2)] + [(sync_name, eager[t]) for t in (1, 2)]
            samples = interleaved(
                cases,
                rounds=3 if quick else 40,
                budget_s=6 if quick else 8,
                min_rounds=3 if quick else 6,
                watch=watch,
            )
            report.time(FAMILY, sync_name, samples[sync_name], "ms")
            for c in cases[1:]:
                report.time(
                    FAMILY,
                    c.name,
                    samples[c.name].scaled(1 / PIPELINE),
                    "ms",
                    note=f"per step, {PIPELINE} steps per run",
                )
            best = f"{name}: eager torch step, faster of 1 and 2 threads"
            faster = min((1, 2), key=lambda t: report.get(FAMILY, eager[t]).median)
            report.same_as(FAMILY, best, eager[faster], note="the faster median of the two above")
            report.ratio(
                f"training step vs eager, {name} (pipelined)",
                (FAMILY, pipe_name),
                (FAMILY, best),
                "<=",
                1.0,
                basis="like-for-like: at most 2 cores on each side (eager torch at its faster thread count)",
            )
            report.ratio(
                f"training step vs eager, {name} (synchronous)",
                (FAMILY, sync_name),
                (FAMILY, eager[1]),
                "<=",
                1.0,
                basis="like-for-like: one core busy at a time on each side (eager torch on 1 thread)",
            )
            for t, why in (
                (1, "planwire's client and worker overlap on 2 cores, eager torch uses 1"),
                (2, "eager torch on 2 threads"),
            ):
                report.ratio(
                    f"training step vs eager on {t} thread{'s' if t > 1 else ''}, {name} (pipelined)",
                    (FAMILY, pipe_name),
                    (FAMILY, eager[t]),
                    basis=f"beside: {why}",
                )
            report.ratio(
                f"training step vs eager on 2 threads, {name} (synchronous)",
                (FAMILY, sync_name),
                (FAMILY, eager[2]),
                basis="not like-for-like: eager torch on 2 threads, planwire's step on 1 core at a time",
            )
            ptr.free()
    finally:
        torch.set_num_threads(threads)
    report.note(
        FAMILY,
        f"batch {BATCH} of 1x8x8 inputs, cross-entropy, SGD(lr=0.1, momentum=0.9); "
        "first-step losses of plan and eager checked equal",
    )
