"""``python -m bench.profile_step [resnet|lm] [--threads N] [--steps N] [--nodes K]``: where a training
step's time goes in onnxruntime, op by op.

Builds the workload's training plan (bench/workloads.py), opens it in onnxruntime with the worker's own
session options (``--threads`` intra-op threads) plus ``enable_profiling``, runs a few warm-up steps on
real data (the state advancing as on a worker), then profiles ``--steps`` steps and prints the op types
by total kernel time per step (and the ``--nodes`` slowest single nodes). Proportions are meaningful on a
loaded host; absolute times are not.
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
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    step, batch = build(args.workload)
    nodes, _ = profile(step, batch, args.threads, args.steps)
    print(table(nodes, args.steps, args.top, args.nodes, fastest=args.fastest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
