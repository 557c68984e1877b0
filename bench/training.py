"""Training: one training-plan step on a worker vs the eager torch step of the same model and batch.

Both sides use one intra-op thread (the worker runs onnxruntime with ``--threads 1``, the default; eager
torch is pinned to 1 thread for the comparison). A plan step is one run message; "synchronous" fetches
each step's loss (run + get), "pipelined" sends steps back to back and fetches the last loss only.
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

            def eager_many(step: Any = eager_step) -> Any:
                for _ in range(PIPELINE - 1):
                    step()
                return float(step())

            cases = [
                Case(f"{name}: plan step on worker, synchronous (run + get loss) [tcp]", sync, 20),
                Case(f"{name}: plan step on worker, pipelined [tcp]", pipelined, 1),
                Case(f"{name}: eager torch step (1 thread)", eager_many, 1),
            ]
            samples = interleaved(cases, rounds=3 if quick else 10, budget_s=15 if quick else 30)
            report.time(FAMILY, cases[0].name, samples[cases[0].name], "ms")
            for c in cases[1:]:
                report.time(
                    FAMILY,
                    c.name,
                    [s / PIPELINE for s in samples[c.name]],
                    "ms",
                    note=f"per step, {PIPELINE} steps per run",
                )
            for mode, case in (("pipelined", cases[1]), ("synchronous", cases[0])):
                report.ratio(
                    f"training step vs eager, {name} ({mode})", (FAMILY, case.name), (FAMILY, cases[2].name), "<=", 1.0
                )
            ptr.free()
    finally:
        torch.set_num_threads(threads)
    report.note(
        FAMILY,
        f"batch {BATCH} of 1x8x8 inputs, cross-entropy, SGD(lr=0.1, momentum=0.9); "
        "first-step losses of plan and eager checked equal",
    )
