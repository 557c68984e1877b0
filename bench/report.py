"""``python -m bench.report [RUN.json ...] [--all-figures] [--readme]``: the README's benchmark tables, from
kept runs.

Without paths it aggregates the newest batch in ``bench/runs/`` (the runs of one ``make bench RUNS=N``).
Prints markdown: the targets (median and min-max over runs, passed in how many runs, verdict), the
comparisons shown beside them, the headline figures, and what is derived or fixed by construction.
``--readme`` also rewrites the part of README.md between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.aggregate import aggregate, load
from bench.timing import fmt

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# (family, figure) rows of the headline figures table, in order; missing ones are left out.
HEADLINE = [
    ("latency", "plan call ptr(x).get() [tcp]"),
    (
        "latency",
        "plan call ptr(x).get() on the worker's private data, released by an approved as_is rule, audited [tcp]",
    ),
    ("latency", "plan call ptr(x).get() [ipc]"),
    ("latency", "raw pyzmq echo of a plan call's frames [tcp]"),
    ("latency", "raw pyzmq echo of a plan call's frames [ipc]"),
    ("latency", "raw pyzmq echo of a plan call's frames through a second process (socket pair) [tcp]"),
    ("latency", "raw pyzmq echo of a plan call's frames through a second process (socket pair) [ipc]"),
    ("latency", "plan call ptr(x).get() [tcp], I/O threads at default scheduling"),
    ("latency", "raw pyzmq echo of a plan call's frames [tcp], I/O threads at default scheduling"),
    ("latency", "torch.rpc rpc_sync [tcp]"),
    ("latency", "torch.rpc rpc_sync [shm, isolated]"),
    ("latency", "local onnxruntime InferenceSession.run"),
    ("latency", "eager torch"),
    ("communication", "N=100: plan, one call [tcp]"),
    ("communication", "N=100: planwire op by op, one plan per op [tcp]"),
    ("communication", "N=100: torch.rpc rpc_sync op by op [tcp]"),
    ("communication", "N=100: messages, plan one call"),
    ("bulk", "1 MiB put+get [tcp]"),
    ("bulk", "1 MiB raw pyzmq store+fetch [tcp]"),
    ("bulk", "64 MiB put+get [tcp]"),
    ("bulk", "64 MiB raw pyzmq store+fetch [tcp]"),
    ("bulk", "64 MiB raw pyzmq echo [tcp]"),
    ("bulk", "64 MiB put+get [ipc]"),
    ("bulk", "64 MiB raw pyzmq store+fetch [ipc]"),
    ("bulk", "64 MiB torch.rpc rpc_sync echo [tcp]"),
    ("pipelining", "tiny calls, results kept, then flush [tcp]"),
    ("pipelining", "tiny calls, results kept, then flush [ipc]"),
    ("build", "cold plan build (func2plan, fresh process)"),
    ("build", "cold plain torch.onnx.export(dynamo=True)"),
    ("build", "warm plan build (new function)"),
    ("build", "warm plain torch.onnx.export(dynamo=True)"),
    ("build", "warm plan build, seed Net (new weights)"),
    ("build", "warm plan build, BatchNorm/reshape/flatten (needs decompositions)"),
    ("build", "warm plain torch.onnx.export(dynamo=True), BatchNorm/reshape/flatten"),
    ("build", "rebuild of an unchanged plan (content cache)"),
    ("training", "MLP 64-128-10: plan step on worker, synchronous (run + get loss) [tcp]"),
    ("training", "MLP 64-128-10: plan step on worker, pipelined [tcp]"),
    ("training", "MLP 64-128-10: eager torch step (1 thread)"),
    ("training", "MLP 64-128-10: eager torch step (2 threads)"),
    ("training", "CNN conv8-pool-fc: plan step on worker, synchronous (run + get loss) [tcp]"),
    ("training", "CNN conv8-pool-fc: plan step on worker, pipelined [tcp]"),
    ("training", "CNN conv8-pool-fc: eager torch step (1 thread)"),
    ("training", "CNN conv8-pool-fc: eager torch step (2 threads)"),
    *[
        ("training_models", f"{model}: {figure}")
        for model in ("ResNet-8 CNN", "transformer LM")
        for figure in (
            "warm training-plan build, fresh model",
            "warm plain torch.onnx.export(dynamo=True) of the forward, fresh model",
            "plan step, synchronous (run + get loss), worker --threads 1 [tcp]",
            "plan step, pipelined, worker --threads 1 [tcp]",
            "eager torch step (1 thread)",
            "eager torch step (2 threads)",
        )
    ],
    ("load", "calls/s, 16 client processes x 10000 calls [tcp]"),
    ("load", "acknowledged requests/s with --state-dir, 8 client processes, --state-dir [tcp]"),
    ("load", "restart to ready on the state dir after kill -9"),
    ("footprint", "start to first reply (ready + connect/hello) [tcp]"),
    ("footprint", "worker RSS idle, after hello [tcp]"),
    ("footprint", "worker RSS after the benchmark load [tcp]"),
]
UNITS = {"us": " µs", "x": "×"}
OPS = {"<=": "≤", ">=": "≥", "<": "<"}


def spread(e: dict[str, Any], unit: str = "") -> str:
    u = UNITS.get(unit, f" {unit}" if unit else "")
    if e["min"] == e["max"]:
        return f"{fmt(e['median'])}{u}"
    return f"{fmt(e['median'])}{u} ({fmt(e['min'])}–{fmt(e['max'])})"


def markdown(agg: dict[str, Any], all_figures: bool = False) -> str:
    m = agg["machine"]
    n = agg["runs"]
    loads = ", ".join(str((la.get("start") or [None])[0]) for la in agg["load_average"])
    out = [
        f"Medians over {n} run{'s' if n > 1 else ''} of `make bench`"
        f"{' (QUICK: smoke-test sample sizes, not for reporting)' if agg.get('quick') else ''}; "
        "in brackets the min–max over runs. "
        f"Machine: {m.get('nproc')} CPUs, {m.get('cpu', '?')} ({m.get('hypervisor') or 'bare metal'}), "
        f"Python {m.get('python')}, torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}, "
        f"pyzmq {m.get('zmq')} / libzmq {m.get('libzmq')}; 1-min load average at the start of each run: {loads}. "
        f"Runs: {', '.join(agg.get('run_files') or []) or '?'}.",
        "",
        "| Target | median (min–max) over runs | target | passed in | verdict | what each side does |",
        "|---|---|---|---|---|---|",
    ]
    targets = [t for t in agg["targets"] if t["target"] is not None]
    for t in targets:
        word, unsettled = t["verdict"], t.get("unsettled", 0)
        fails = t.get("fails", t["runs"] - t["passes"] - unsettled)
        if word == "flaky":
            side = "pass" if t["passed"] else "FAIL" if fails > t["runs"] / 2 else "no majority"
            word = f"flaky ({side} by majority)" if side != "no majority" else "flaky (no majority)"
        elif word == "unsettled":  # no interval, or it straddled the target: not called passed whatever the median
            word = f"unsettled (no settled majority: unsettled in {unsettled} of {t['runs']})"
        elif unsettled:  # pass or fail by a majority of settled runs, the others unsettled
            word = f"{word} (unsettled in {unsettled} of {t['runs']})"
        word = word.replace("fail", "FAIL", 1) if word.startswith("fail") else word
        goal = f"{OPS.get(t['op'], t['op'])} {fmt(t['target'])}{UNITS.get(t['unit'], ' ' + t['unit'])}"
        out.append(
            f"| {t['name']} | {spread(t, t['unit'])} | {goal} | {t['passes']} of {t['runs']} | {word} | {t['basis']} |"
        )
    out += sampling(targets)
    shown = [t for t in agg["targets"] if t["target"] is None and t["kind"] == "measured"]
    if shown:
        out += ["", "| Comparison (no target) | median (min–max) | what each side does |", "|---|---|---|"]
        out += [f"| {t['name']} | {spread(t, t['unit'])} | {t['basis']} |" for t in shown]
    rows = (
        [(f, name) for f, figs in agg["figures"].items() for name in figs]
        if all_figures
        else [(f, name) for f, name in HEADLINE if name in agg["figures"].get(f, {})]
    )
    rows = [(f, name) for f, name in rows if agg["figures"][f][name]["kind"] == "measured"]
    if rows:
        out += ["", "| Figure | median (min–max) over runs | samples per run |", "|---|---|---|"]
        for f, name in rows:
            e = agg["figures"][f][name]
            samples = sorted(set(e["samples_per_run"]))
            count = str(samples[0]) if len(samples) == 1 else f"{samples[0]}–{samples[-1]}"
            out.append(f"| {f}: {name} | {spread(e, e['unit'])} | {count} |")
    out += node_table(agg)
    other = [t for t in agg["targets"] if t["kind"] != "measured"]
    other_figs = [(f, n, e) for f, figs in agg["figures"].items() for n, e in figs.items() if e["kind"] != "measured"]
    if other or other_figs:
        out += ["", "| Not a measurement (no target) | value | kind: why |", "|---|---|---|"]
        out += [f"| {t['name']} | {spread(t, t['unit'])} | {t['kind']}: {t['basis']} |" for t in other]
        if all_figures:
            out += [f"| {f}: {name} | {spread(e, e['unit'])} | {e['kind']} |" for f, name, e in other_figs]
        elif other_figs:
            out.append(
                "| torch.rpc message counts (communication) | 2 per rpc_sync | derived: written down, not observed |"
            )
    out += wall_time(agg)
    for name, errors in agg.get("errors", {}).items():
        out.append(f"\nErrors in {name}: {errors}")
    return "\n".join(out)


def sampling(targets: list[dict[str, Any]]) -> list[str]:
    """Per target, what its ratio rests on in each run: samples (numerator / denominator), the 95% interval of
    the ratio, and whether the rounds stopped on the interval rule (bench.timing) or at the cap or budget."""
    rows = [t for t in targets if t.get("ci95_per_run")]
    if not rows:
        return []
    out = [
        "",
        "| Target | samples per run (numerator / denominator) | 95% interval of the ratio, per run | rounds ended |",
        "|---|---|---|---|",
    ]
    for t in rows:
        n = ", ".join("/".join(map(str, s)) if s else "–" for s in t["samples_per_run"])
        ci = ", ".join(f"{fmt(c[0])}–{fmt(c[1])}" if c else "–" for c in t["ci95_per_run"])
        stops = ", ".join(s or "–" for s in t["stop_per_run"])
        out.append(f"| {t['name']} | {n} | {ci} | {stops} |")
    return out


def wall_time(agg: dict[str, Any]) -> list[str]:
    """One line: how long a run of ``make bench`` took, in all and by family (median over runs)."""
    families = agg.get("family_s") or {}
    if not families:
        return []
    runs = agg["duration_s"]
    total = spread({"median": statistics.median(runs), "min": min(runs), "max": max(runs)}, "s")
    parts = ", ".join(f"{name} {fmt(e['median'])}" for name, e in families.items())
    return ["", f"Wall time of a run: {total}; by family (s, median): {parts}."]


def node_table(agg: dict[str, Any]) -> list[str]:
    """The Node.js worker beside the Python one and the echo (bench.node): one column per side."""
    figs = agg["figures"].get("node")
    if not figs:
        return []
    from bench.node import ROWS, SIDES  # only when there is a node family (it imports the test harness)

    out = ["", f"| Figure (bench.node) | {' | '.join(SIDES.values())} |", "|---" * (len(SIDES) + 1) + "|"]
    for label, template, sides in ROWS:
        cells = []
        for side, name in SIDES.items():
            e = figs.get(template.format(name)) if side in sides else None
            cells.append(spread(e, e["unit"]) if e else "–")
        out.append(f"| {label} | {' | '.join(cells)} |")
    return out


def newest_batch(runs_dir: Path) -> list[Path]:
    runs = []
    for path in sorted(runs_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "figures" in data and not data.get("quick"):
            runs.append((data.get("batch") or path.stem, path))
    if not runs:
        return []
    last = max(b for b, _ in runs)
    return [p for b, p in runs if b == last]


def write_readme(text: str, readme: Path = README) -> None:
    doc = readme.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} section to rewrite")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument("runs", nargs="*", type=Path, help="run files (default: the newest batch in bench/runs)")
    ap.add_argument("--all-figures", action="store_true", help="every figure, not only the headline ones")
    ap.add_argument("--readme", action="store_true", help=f"also rewrite README.md between {BEGIN} and {END}")
    args = ap.parse_args(argv)
    paths = args.runs or newest_batch(HERE / "runs")
    if not paths:
        print("no kept runs in bench/runs: run `make bench RUNS=3` first", file=sys.stderr)
        return 1
    text = markdown(aggregate([load(p) for p in paths], names=[p.name for p in paths]), args.all_figures)
    print(text)
    if args.readme:
        write_readme(text)
        print(f"\nrewrote the benchmark tables in {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
