"""``python -m bench.profile_step [resnet|lm] [--threads N] [--steps N] [--nodes K]``: where a training
step's time goes in onnxruntime, op by op. ``--worker R``: where it goes in a plan-worker instead.

Builds the workload's training plan (bench/workloads.py), opens it in onnxruntime with the worker's own
session options (``--threads`` intra-op threads) plus ``enable_profiling``, runs a few warm-up steps on
real data (the state advancing as on a worker), then profiles ``--steps`` steps and prints the op types
by total kernel time per step (and the ``--nodes`` slowest single nodes). Proportions are meaningful on a
loaded host; absolute times are not.

``--save PATH`` writes the step's graph to PATH and its feeds (one batch, the initial state) beside it
(``PATH`` without ``.onnx`` + ``-feeds.npz``); ``--compare A.onnx B.onnx ...`` runs saved graphs (before and
after a change to the training export) interleaved round by round with eager torch (``--rounds`` rounds of
``--steps`` steps): thread CPU time at 1 thread (steady on a loaded host), wall time otherwise.

``--worker R`` sends the plan to a real plan-worker (``--threads N``) and runs ``R`` interleaved rounds of
``--steps`` synchronous steps (run + get of the loss) against as many eager torch steps, and prints the CPU
time per step of each process (client, supervisor, runner; every thread, from /proc's schedstat) against
eager torch's (this process's): steady on a loaded host, where wall times (shown beside) are not; and the
minor page faults per step of eager torch's process and of the runner (memory faulted in afresh). At 1 thread
only: torch's OpenMP threads spin while they wait, so at 2 its CPU time is no measure of its speed.

``--nchwc SRC DST`` rewrites a saved graph's convolutions into onnxruntime's NCHWc kernels as a plan-worker does
(worker/nchwc.py), feeds copied beside it, for ``--compare`` (bench/README.md, tenth pass).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

from bench.machine import cpu_s


def build(workload: str) -> Any:
    """The training step (``TrainingStep``) of the named workload and one batch for it."""
    from bench.workloads import workloads
    from planwire.exporter import training_plan

    wl = {"resnet": workloads()[0], "lm": workloads()[1]}[workload]
    plan = training_plan(wl.make(0), wl.loss, wl.plan_optimizer(), wl.args_shape, wl.dtypes, progress=False)
    return plan.step, wl.batch(wl.build_batch)


def profile(step: Any, batch: Any, threads: int, steps: int, warmup: int = 5) -> tuple[list[dict], int]:
    """Kernel events (onnxruntime's profile) of ``steps`` steps after ``warmup`` unprofiled ones."""
    import onnxruntime as ort

    from planwire.worker.runtime import session_options

    so = session_options(threads)
    plain = ort.InferenceSession(step.variant.data, so, providers=["CPUExecutionProvider"])
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="planwire-profile-"), "step")
    session = ort.InferenceSession(step.variant.data, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    state = step.state
    for _ in range(warmup):
        state = step.advance(state, plain.run(names, step.feeds(batch, state)))
    for _ in range(steps):
        state = step.advance(state, session.run(names, step.feeds(batch, state)))
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return nodes, len(session.get_inputs())


def minor_faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (field 10 of /proc/PID/stat): pages a run faults in afresh,
    as every buffer malloc'd and freed per step does once it is big enough to be mapped for itself."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def on_worker(workload: str, threads: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Milliseconds of CPU per step, per round: eager torch (``torch.set_num_threads(threads)``) and a plan-worker
    (``--threads``) running the same training plan from the same weights, interleaved round by round."""
    import copy
    import time

    import torch

    from bench.training_models import build_plan
    from bench.workloads import workloads
    from planwire.transport import RemoteWorker
    from planwire.worker.process import WorkerProcess

    torch.set_num_threads(threads)
    wl = {"resnet": workloads()[0], "lm": workloads()[1]}[workload]
    model = wl.make(0)
    eager_model = copy.deepcopy(model)
    plan = build_plan(wl, model)
    x, y = wl.batch(wl.build_batch)
    opt = wl.torch_optimizer(eager_model.parameters())

    def eager() -> float:
        opt.zero_grad()
        loss = wl.loss(eager_model(x), y)
        loss.backward()
        opt.step()
        return float(loss)

    proc = WorkerProcess("profile-step", extra=["--threads", str(threads)])
    worker = RemoteWorker(proc.url, timeout=120)
    try:
        ptr = plan.send(worker)
        xp, yp = worker.put(x), worker.put(y)
        for _ in range(3):
            ptr(xp, yp).get()
            eager()
        with open(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children") as f:
            runner = int(f.read().split()[0])
        pids = {"client": os.getpid(), "supervisor": proc.proc.pid, "runner": runner}
        keys = ("eager", *pids, "worker", "eager wall", "worker wall", "eager faults", "runner faults")
        got: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(rounds):
            t0, w0 = cpu_s(os.getpid()), time.perf_counter()  # this process: torch's intra-op threads too
            f0 = minor_faults(os.getpid())
            for _ in range(steps):
                eager()
            got["eager faults"].append((minor_faults(os.getpid()) - f0) / steps)
            got["eager wall"].append((time.perf_counter() - w0) / steps * 1e3)
            got["eager"].append((cpu_s(os.getpid()) - t0) / steps * 1e3)
            before, w0 = {k: cpu_s(p) for k, p in pids.items()}, time.perf_counter()
            f0 = minor_faults(runner)
            for _ in range(steps):
                ptr(xp, yp).get()
            got["runner faults"].append((minor_faults(runner) - f0) / steps)
            got["worker wall"].append((time.perf_counter() - w0) / steps * 1e3)
            used = {k: (cpu_s(p) - before[k]) / steps * 1e3 for k, p in pids.items()}
            for k, v in used.items():
                got[k].append(v)
            got["worker"].append(sum(used.values()))
        return got
    finally:
        worker.close()
        proc.close()


def worker_table(got: dict[str, list[float]]) -> str:
    """The medians (and fastest rounds) of :func:`on_worker`'s figures, and the worker's ratio to eager."""
    import statistics

    lines = ["| per step (ms; faults: count) | median | least round |", "|---|---:|---:|"]
    lines += [f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} |" for k, v in got.items()]
    ratios = [w / e for w, e in zip(got["worker"], got["eager"], strict=True)]
    lines += [
        "",
        f"worker (client + supervisor + runner) / eager: median of per-round ratios {statistics.median(ratios):.3f}",
    ]
    return "\n".join(lines)


def save(step: Any, batch: Any, path: str) -> None:
    """The step's ONNX graph to ``path`` and its feeds (``batch``, the initial state) to :func:`feeds_path`."""
    import numpy as np

    with open(path, "wb") as f:
        f.write(step.variant.data)
    np.savez(feeds_path(path), **step.feeds(batch))


def feeds_path(path: str) -> str:
    return path.removesuffix(".onnx") + "-feeds.npz"


def compare(workload: str, paths: list[str], threads: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Milliseconds per step, per round, of eager torch and each saved graph (:func:`save`), interleaved:
    thread CPU time at 1 thread (onnxruntime and torch compute in the calling thread), else wall time."""
    import time

    import numpy as np
    import onnxruntime as ort
    import torch

    from bench.workloads import workloads
    from planwire.worker.runtime import session_options

    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    wl = {"resnet": workloads()[0], "lm": workloads()[1]}[workload]
    model = wl.make(0)
    opt = wl.torch_optimizer(model.parameters())
    saved = np.load(feeds_path(paths[0]))
    x, y = (torch.from_numpy(saved[name]) for name in ("arg0", "arg1"))

    def eager() -> None:
        opt.zero_grad()
        wl.loss(model(x), y).backward()
        opt.step()

    cases: dict[str, Any] = {"eager": eager}
    for path in paths:
        session = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
        data = np.load(feeds_path(path))
        feeds = {i.name: data[i.name] for i in session.get_inputs()}
        cases[path] = lambda s=session, f=feeds: s.run(None, f)
    for run in cases.values():
        for _ in range(3):
            run()
    got: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            t0 = clock()
            for _ in range(steps):
                run()
            got[name].append((clock() - t0) / steps * 1e3)
    return got


def compare_table(got: dict[str, list[float]]) -> str:
    """Median and fastest round of :func:`compare`, and the median of the per-round ratios to eager."""
    import statistics

    lines = ["| per step | median ms | fastest round ms | / eager (median of rounds) |", "|---|---:|---:|---:|"]
    for name, times in got.items():
        ratio = statistics.median(t / e for t, e in zip(times, got["eager"], strict=True))
        lines.append(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | {ratio:.3f} |")
    return "\n".join(lines)


def table(nodes: list[dict], steps: int, top: int, top_nodes: int, fastest: bool = False) -> str:
    """Op types by kernel time per step; ``fastest``: each node's fastest run (times ``steps``) instead of
    the sum of its runs, which a loaded host inflates wherever it preempted a kernel."""
    runs: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in nodes:
        name = e["name"].removesuffix("_kernel_time")
        runs[name].append(e["dur"])
        op_of[name] = e["args"].get("op_name", "?")
    by_op: dict[str, list[float]] = collections.defaultdict(list)
    by_node: dict[str, float] = {}
    for name, durs in runs.items():
        by_node[name] = min(durs) * steps if fastest else sum(durs)
        by_op[op_of[name]] += [by_node[name] / steps] * steps
    total = sum(sum(d) for d in by_op.values())
    n_nodes = len(by_node)
    lines = [
        f"{n_nodes} nodes; kernel time per step {total / steps / 1e3:.2f} ms (sum over nodes, {steps} steps)",
        "",
        "| op | nodes | µs per step | share |",
        "|---|---:|---:|---:|",
    ]
    ranked = sorted(by_op.items(), key=lambda kv: -sum(kv[1]))
    for op, durs in ranked[:top]:
        count = len(durs) // steps
        lines.append(f"| {op} | {count} | {sum(durs) / steps:.0f} | {100 * sum(durs) / total:.1f}% |")
    rest = sum(sum(d) for _, d in ranked[top:])
    if rest:
        lines.append(f"| (other {len(ranked) - top} op types) | | {rest / steps:.0f} | {100 * rest / total:.1f}% |")
    if top_nodes:
        lines += ["", "| node | op | µs per step |", "|---|---|---:|"]
        for name, dur in sorted(by_node.items(), key=lambda kv: -kv[1])[:top_nodes]:
            lines.append(f"| {name} | {op_of[name]} | {dur / steps:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__)
    ap.add_argument("workload", choices=["resnet", "lm"], nargs="?", default="resnet")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (as plan-worker --threads)")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--top", type=int, default=15, help="op types to list")
    ap.add_argument("--nodes", type=int, default=10, help="slowest single nodes to list")
    ap.add_argument("--fastest", action="store_true", help="count each node's fastest run (loaded hosts)")
    ap.add_argument("--worker", type=int, default=0, metavar="R", help="R rounds on a plan-worker against eager")
    ap.add_argument("--save", metavar="PATH", help="write the step's graph (and its feeds beside it), then stop")
    ap.add_argument("--compare", nargs="+", metavar="ONNX", help="saved graphs against eager, interleaved")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds of --compare")
    ap.add_argument("--nchwc", nargs=2, metavar=("SRC", "DST"), help="a saved graph's Convs as NCHWc kernels")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if args.nchwc:
        import shutil

        from planwire.worker.nchwc import at_this_block

        with open(args.nchwc[0], "rb") as f:
            data, count, block = at_this_block(f.read())
        print(f"{count} Convs rewritten (block {block})")
        with open(args.nchwc[1], "wb") as f:
            f.write(data)
        shutil.copy(feeds_path(args.nchwc[0]), feeds_path(args.nchwc[1]))
        return 0
    if args.compare:
        print(compare_table(compare(args.workload, args.compare, args.threads, args.rounds, args.steps)))
        return 0
    if args.worker:
        print(worker_table(on_worker(args.workload, args.threads, args.worker, args.steps)))
        return 0
    step, batch = build(args.workload)
    if args.save:
        save(step, batch, args.save)
        return 0
    nodes, _ = profile(step, batch, args.threads, args.steps)
    print(table(nodes, args.steps, args.top, args.nodes, fastest=args.fastest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
