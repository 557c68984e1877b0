"""Training on real workloads: a ResNet-style CNN and a causal transformer LM (bench/workloads.py),
each against eager torch at the same thread count.

* cold build: the first training-plan build in a fresh interpreter (after ``import torch``, disk cache
  off), against a cold plain ``torch.onnx.export(dynamo=True)`` of the model's forward; one model per run,
  in turn (``COLD_EVERY``): run 1 of ``--runs N`` the ResNet, run 2 the LM, ...;
* warm build: a fresh model (new weights) of the same architecture in the same process, against a warm
  plain export of its forward (target <= 2x). Weights are plan inputs, so the export cache answers the
  ONNX export of a model already built once (the cold build is the one with nothing cached);
* steps at 1 and 2 threads: plan-worker ``--threads N`` against eager torch with
  ``torch.set_num_threads(N)``, synchronous (run + get of the loss per step) and pipelined (steps sent
  back to back, the last loss fetched), target <= 1.0x eager per step at the same CPU: a pipelined step on a
  1-thread worker overlaps with the client, so it uses both cores and is held against eager torch at its
  faster of 1 and 2 threads (against 1 thread shown beside).

Every build and step is timed in the same run, builds and steps interleaved round by round; how many samples
and why is said at ``COLD_SAMPLES`` below (the family is most of a ``make bench`` run's length).

``python -m bench.training_models cold <resnet|lm> <plan|export>`` is the cold child: it prints the
seconds of one build as a JSON line.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from bench.env import ROOT, Env
from bench.timing import Case, Report, interleaved, measure

FAMILY = "training_models"
PIPELINE = 5  # steps per pipelined run (a ResNet step is ~50-100 ms)
KEYS = {"resnet": 0, "lm": 1}

# Samples per run, and why that many (a ResNet build is 30-40 s uncached, so repetitions are the run's length):
# - cold builds: 1 per side, for one model per run in turn (the ResNet in odd runs, the LM in even ones).
#   A cold build is one event per fresh process (~10-45 s); within a run two of them differed by 5-15%,
#   between runs by as much; the ratio has no target, and `make bench RUNS=N` shows the spread over runs.
#   The other model's first build in this process then exports afresh and is reported as the build with
#   the export cache cleared (beside its warm plain export), unless an earlier run of the batch left its
#   export (BATCH_EXPORTS): a lone run saves the other cold plain export and two interpreters (~15-20 s),
#   runs 2+ of a batch also the other model's uncached export (~35 s).
# - the first build of the architecture in this process (the warm builds' warm-up) reads the cold build's
#   export from a disk cache the cold build filled; before, the process exported the whole step again, once
#   as a warm-up and once per warm round "with the export cache cleared" (25-40 s each for the ResNet, as
#   long as a cold build, which already is the build with nothing cached): half the family's length. If
#   that entry does not answer, the first build is reported as the build with the export cache cleared.
# - warm builds against warm plain exports (target <= 2x, measured ~1.0-1.6x): interleaved rounds until the
#   ratio's 95% interval is within +-5% (bench.timing's rule): 3 rounds (one build varies ~10%, p90 /
#   median: fewer rounds do not make a bootstrap interval; a round is 7-8 s): the ratio is 1.2-1.5x against
#   a target of 2x, so +-15-30% settles it, and a run where it does not says "unsettled".
# - steps (target <= 1x): interleaved rounds of 5 steps per case (sync: 5 calls, pipelined and eager: one
#   sample of 5 steps) until every ratio's interval is within +-5%, at least 3 rounds, at most 12 or 12 s.
#   One ResNet sample varies 10-20% with the host; a round of every case is ~4 s (the LM's ~1 s), so the
#   ResNet gets 3-4 rounds (+-10-20%: its ratios are 1.7-2.3x against targets of 1x) and the LM up to 12.
# - the steps run on the plan of the first build in this process (no extra build for them).
# --quick (a smoke run): 2 warm rounds, 3 step rounds.
COLD_SAMPLES = 1
# The exports the runs of one `python -m bench --runs N` hand on to each other (a directory the batch makes and
# removes): a model's first build in a run reads the export a cold build of an earlier run of the batch (or
# that run's own first build) left, instead of exporting the architecture again (~35 s for the ResNet). Unset
# (one run, or --single alone): nothing is handed on between runs.
BATCH_EXPORTS = "PLANWIRE_BENCH_BATCH_EXPORTS"
COLD_EVERY = len(KEYS)  # a model's cold build runs in one run of every COLD_EVERY, in turn
WARM_ROUNDS, WARM_MIN, WARM_BUDGET_S = 3, 3, 20.0
STEP_ROUNDS, STEP_MIN, STEP_BUDGET_S = 12, 3, 12.0


def plain_export(wl: Any, model: Any) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the model's forward with a dynamic batch axis."""
    import torch

    x, _ = wl.batch(wl.build_batch)
    return torch.onnx.export(model, (x,), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))


def build_plan(wl: Any, model: Any) -> Any:
    from planwire.exporter import training_plan

    return training_plan(
        model,
        loss=wl.loss,
        optimizer=wl.plan_optimizer(),
        args_shape=wl.args_shape,
        args_dtypes=wl.dtypes,
        progress=False,
    )


def cold(key: str, what: str, cache_dir: str = "") -> float:
    """Seconds of one build in a fresh interpreter. ``cache_dir``: an empty directory for the export cache
    on disk (the build finds nothing there, so it is as cold as without one, and leaves its export there);
    "" for none."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.training_models", "cold", key, what],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PLANWIRE_CACHE_DIR": cache_dir},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _builds(report: Report, key: str, wl: Any, label: str, quick: bool, with_cold: bool) -> tuple[Any, Any]:
    """Cold (``with_cold``) and warm builds; returns the first build in this process (a plan of
    ``wl.make(0)``) and a copy of that model as it was before the build, for the steps."""
    import torch

    from bench.build import no_disk_cache
    from planwire.exporter import cache

    cold_plan = f"{label}: cold training-plan build (fresh process)"
    cold_export = f"{label}: cold plain torch.onnx.export(dynamo=True) of the forward"
    seeds = iter(range(1, 1000))
    warm_plan = f"{label}: warm training-plan build, fresh model"
    uncached = f"{label}: warm training-plan build, fresh model, export cache cleared"
    warm_export = f"{label}: warm plain torch.onnx.export(dynamo=True) of the forward, fresh model"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="planwire-bench-cache-") as handed_over:
        # The cold build leaves its export in an empty disk cache; this process's first build of the
        # architecture reads it from there (the warm builds' warm-up) instead of exporting the whole
        # step again (30-40 s for the ResNet): the cold build already is the build with nothing cached.
        if with_cold:
            last = COLD_SAMPLES - 1  # only the last cold build may leave its export: the others find nothing
            colds = [cold(key, "plan", handed_over if i == last else "") for i in range(COLD_SAMPLES)]
            report.time(FAMILY, cold_plan, colds, "s")
            report.time(FAMILY, cold_export, [cold(key, "export") for _ in range(COLD_SAMPLES)], "s")
        shared = os.environ.get(BATCH_EXPORTS, "")
        if shared:  # this run's cold export joins the batch's, and the first build reads (or leaves) it there
            for entry in Path(handed_over).glob("*.onnx"):
                shutil.copy2(entry, Path(shared) / entry.name)
        cache.clear_cache()
        os.environ[cache.ENV_DIR], before = shared or handed_over, os.environ.get(cache.ENV_DIR)
        try:
            exports = cache.stats.exports
            model = wl.make(0)
            initial, built = copy.deepcopy(model), []
            first = measure(lambda: built.append(build_plan(wl, model)), runs=1, warmup=0)
            exported = cache.stats.exports > exports
        finally:
            if before is None:
                del os.environ[cache.ENV_DIR]
            else:
                os.environ[cache.ENV_DIR] = before
    with no_disk_cache():
        cases = [
            Case(warm_plan, lambda: build_plan(wl, wl.make(next(seeds))), 1, warmup=0),
            Case(warm_export, lambda: plain_export(wl, wl.make(next(seeds))), 1, warmup=1),
        ]
        samples = interleaved(
            cases,
            rounds=2 if quick else WARM_ROUNDS,
            budget_s=WARM_BUDGET_S,
            min_rounds=2 if quick else WARM_MIN,
            watch=[(warm_plan, warm_export)],
        )
    for name in (warm_plan, warm_export):
        report.time(FAMILY, name, samples[name], "s")
    if exported:  # the cold build's entry did not answer (another key): this build exported afresh
        report.time(FAMILY, uncached, first, "s")
        report.ratio(
            f"warm training-plan build (export cache cleared) vs plain export of the forward, {label}",
            (FAMILY, uncached),
            (FAMILY, warm_export),
            basis="beside: the plan exports forward + backward + optimizer afresh",
        )
    report.note(
        FAMILY,
        f"{label}: the first build in this process "
        + (
            "exported afresh (shown as the build with the export cache cleared)"
            + ("" if with_cold else f"; its cold build runs in one run of every {COLD_EVERY}, in turn")
            if exported
            else "read a cold build's export from a disk cache (this run's, or one an earlier run of the batch left; "
            "the cold build is the build with nothing cached)"
        ),
    )
    report.ratio(
        f"warm training-plan build vs plain export of the forward, {label}",
        (FAMILY, warm_plan),
        (FAMILY, warm_export),
        "<=",
        2.0,
        basis="like-for-like: a new model of a known architecture; the plan also traces the backward and "
        "optimizer and verifies a step against eager torch",
    )
    if with_cold:
        report.ratio(
            f"cold training-plan build vs cold plain export of the forward, {label}",
            (FAMILY, cold_plan),
            (FAMILY, cold_export),
            basis="beside: the plan exports forward + backward + optimizer and verifies a step",
        )
    return built[0], initial


def _steps(report: Report, workers: dict[int, Any], wl: Any, label: str, quick: bool, plan: Any, model: Any) -> None:
    import torch

    x, y = wl.batch(wl.build_batch)
    cases, names = [], {}
    pointers = []
    for threads, w in workers.items():
        eager_model = copy.deepcopy(model)
        opt = wl.torch_optimizer(eager_model.parameters())
        ptr = plan.send(w)
        pointers.append(ptr)
        xp, yp = w.put(x), w.put(y)

        def eager_step(m: Any = eager_model, opt: Any = opt) -> Any:
            opt.zero_grad()
            loss = wl.loss(m(x), y)
            loss.backward()
            opt.step()
            return loss

        torch.set_num_threads(threads)
        first_plan, first_eager = float(ptr(xp, yp).get()), float(eager_step())
        assert abs(first_plan - first_eager) < 1e-4 * max(1.0, abs(first_eager)), (label, first_plan, first_eager)

        def sync(ptr: Any = ptr, xp: Any = xp, yp: Any = yp) -> Any:
            return ptr(xp, yp).get()

        def pipelined(ptr: Any = ptr, xp: Any = xp, yp: Any = yp) -> Any:
            for _ in range(PIPELINE - 1):
                ptr(xp, yp)
            return ptr(xp, yp).get()

        def eager(step: Any = eager_step, threads: int = threads) -> Any:
            torch.set_num_threads(threads)
            for _ in range(PIPELINE - 1):
                step()
            return float(step())

        s = "s" if threads > 1 else ""
        names[threads] = (
            f"{label}: plan step, synchronous (run + get loss), worker --threads {threads} [tcp]",
            f"{label}: plan step, pipelined, worker --threads {threads} [tcp]",
            f"{label}: eager torch step ({threads} thread{s})",
        )
        cases += [
            Case(names[threads][0], sync, PIPELINE, warmup=2),
            Case(names[threads][1], pipelined, 1, warmup=1),
            Case(names[threads][2], eager, 1, warmup=1),
        ]
    eager = {threads: names[threads][2] for threads in names}
    watch = [(sync, eager[t]) for t, (sync, _, _) in names.items()]
    watch += [(pipe, e) for _, pipe, _ in names.values() for e in eager.values()]
    samples = interleaved(
        cases,
        rounds=3 if quick else STEP_ROUNDS,
        budget_s=STEP_BUDGET_S,
        min_rounds=3 if quick else STEP_MIN,
        watch=watch,
    )
    for sync_name, pipe_name, eager_name in names.values():
        report.time(FAMILY, sync_name, samples[sync_name], "ms")
        for n in (pipe_name, eager_name):
            report.time(FAMILY, n, samples[n].scaled(1 / PIPELINE), "ms", note=f"per step, {PIPELINE} steps per run")
    best = f"{label}: eager torch step, faster of 1 and 2 threads"
    faster = min(eager, key=lambda t: report.get(FAMILY, eager[t]).median)
    report.same_as(FAMILY, best, eager[faster], note="the faster median of the two eager steps")
    for threads, (sync_name, pipe_name, eager_name) in names.items():
        s = "s" if threads > 1 else ""
        report.ratio(
            f"training step vs eager at {threads} thread{s}, {label} (synchronous)",
            (FAMILY, sync_name),
            (FAMILY, eager_name),
            "<=",
            1.0,
            basis=f"like-for-like: {threads} intra-op thread{s} on each side, one side busy at a time",
        )
        if threads == 1:
            # The client and a 1-thread worker overlap on the 2 cores: eager torch gets the same 2 cores.
            report.ratio(
                f"training step vs eager at the same 2 cores, {label} (pipelined, worker --threads 1)",
                (FAMILY, pipe_name),
                (FAMILY, best),
                "<=",
                1.0,
                basis="like-for-like: 2 cores on each side (the client and the worker overlap; eager torch at "
                "its faster of 1 and 2 threads)",
            )
            report.ratio(
                f"training step vs eager at 1 thread, {label} (pipelined)",
                (FAMILY, pipe_name),
                (FAMILY, eager_name),
                basis="beside: planwire's client and worker overlap on 2 cores, eager torch uses 1",
            )
        else:
            report.ratio(
                f"training step vs eager at {threads} threads, {label} (pipelined)",
                (FAMILY, pipe_name),
                (FAMILY, eager_name),
                "<=",
                1.0,
                basis=f"like-for-like: the 2 cores on each side (eager torch on {threads} threads; the worker's "
                f"{threads} threads and the client share them)",
            )
    for ptr in pointers:
        ptr.free()


def run(env: Env, report: Report, quick: bool) -> None:
    try:
        from planwire.exporter import training_plan  # noqa: F401
    except ImportError as e:
        report.skipped[FAMILY] = f"training plans not available ({e})"
        return
    import torch

    from bench.env import RemoteWorker
    from bench.workloads import workloads
    from planwire.worker.process import WorkerProcess

    warnings.filterwarnings("ignore")
    threads_before = torch.get_num_threads()
    procs, workers = [], {}
    try:
        for threads in (1, 2):
            proc = WorkerProcess(f"bench-models-{threads}", extra=["--threads", str(threads)])
            procs.append(proc)
            workers[threads] = RemoteWorker(proc.url, timeout=120)
        for key, wl in zip(KEYS, workloads(), strict=True):
            label = wl.name
            with_cold = KEYS[key] == (env.run - 1) % COLD_EVERY
            plan, model = _builds(report, key, wl, label, quick, with_cold)
            _steps(report, workers, wl, label, quick, plan, model)
    finally:
        torch.set_num_threads(threads_before)
        for w in workers.values():
            w.close()
        for proc in procs:
            proc.close()
    report.note(
        FAMILY,
        "ResNet-8 CNN: stem + 3 residual stages with BatchNorm, 32x32x3 inputs, batch 32, cross-entropy, "
        "SGD(lr=0.05, momentum=0.9); transformer LM: 2 layers, d=64, 4 heads, sequence 32, batch 16, "
        "next-token cross-entropy, Adam(lr=1e-3); "
        "first-step losses of plan and eager checked equal at each thread count",
    )
    report.note(
        FAMILY,
        f"samples per run: cold builds {COLD_SAMPLES} per side for one model per run in turn (one fresh process "
        "each; the spread is over runs), "
        f"the first build in this process 1 (its plan runs the steps), warm builds and steps in interleaved "
        f"rounds until each ratio's 95% interval is within +-5% (warm builds {WARM_MIN}-{WARM_ROUNDS} rounds, "
        f"steps {STEP_MIN}-{STEP_ROUNDS} rounds of {PIPELINE} steps per case, bounded by {WARM_BUDGET_S:.0f} s "
        f"and {STEP_BUDGET_S:.0f} s; each figure says how many it took); bench/training_models.py says why",
    )


def _child(argv: list[str]) -> int:
    """One cold build in this fresh interpreter: ``cold <resnet|lm> <plan|export>`` (the disk cache as
    PLANWIRE_CACHE_DIR says: the parent gives it an empty directory or none)."""
    warnings.simplefilter("ignore")
    import torch

    from bench.workloads import workloads

    torch.set_num_threads(1)
    _, key, what = argv
    wl = workloads()[KEYS[key]]
    model = wl.make(0)
    t0 = time.perf_counter()
    if what == "plan":
        build_plan(wl, model)
    else:
        plain_export(wl, model)
    print(json.dumps(time.perf_counter() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
