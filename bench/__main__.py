"""``python -m bench [--runs N] [--quick] [--only FAMILY,...]``: run the benchmarks on real plan-worker
processes over loopback (tcp and ipc) N times, each run in a fresh process.

Every run is kept as ``bench/runs/<UTC timestamp>.json`` (figures, comparisons, the machine and its load,
each family's wall time, also printed as each family ends and at the end of the run);
the runs of this invocation are then aggregated into ``bench/results.json`` (medians over runs, min-max,
how many runs each target passed) and printed as the tables ``python -m bench.report`` prints. ``--quick``
runs (a smoke test, fewer samples) go to ``bench/runs/quick/`` and are never aggregated with full runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS_DIR = HERE / "runs"

# Order matters: start-up is timed on a quiet machine, the loaded footprint after everything else.
FAMILY_NAMES = (
    "startup",
    "latency",
    "communication",
    "bulk",
    "pipelining",
    "build",
    "training",
    "training_models",
    "flower",
    "node",
    "load",
    "gpu",
    "footprint",
)


def run_once(out: Path, quick: bool, only: list[str], meta: dict) -> int:
    """One full run in this process: every family, a table on stdout, the run's JSON at ``out``."""
    from bench import (
        build,
        bulk,
        comm,
        flower,
        footprint,
        gpu,
        latency,
        load,
        node,
        pipeline,
        training,
        training_models,
    )
    from bench.env import Env
    from bench.timing import Report

    families = {
        "startup": footprint.run_start,
        "latency": latency.run,
        "communication": comm.run,
        "bulk": bulk.run,
        "pipelining": pipeline.run,
        "build": build.run,
        "training": training.run,
        "training_models": training_models.run,
        "flower": flower.run,
        "node": node.run,
        "load": load.run,
        "gpu": gpu.run,
        "footprint": footprint.run_loaded,
    }
    warnings.filterwarnings("ignore")
    logging.getLogger("planwire").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" per export

    report = Report()
    prestarted = False
    with Env() as env:
        env.run = int(meta.get("run", 1))
        for name, fn in families.items():
            if only and name not in only:
                continue
            if name != "startup" and not prestarted:  # start-up is timed first, on a quiet machine; then the
                env.prestart(set(only or families) - {"startup"})  # processes the families need start at once
                prestarted = True
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                fn(env, report, quick)
            except Exception as e:  # noqa: BLE001 - one family failing must not lose the others
                report.errors[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            report.family_s[name] = round(time.perf_counter() - t0, 1)
            print(f"[bench] {name} done in {report.family_s[name]:.1f} s", file=sys.stderr, flush=True)
        report.machine["client_zmq_io_threads"] = env.client_io_threads
        report.machine["worker_providers"] = env.providers
    print(report.table())
    data = {**meta, "quick": quick, "only": only, **report.to_json()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwrote {out} ({data['duration_s']} s)")
    return 1 if report.errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--runs", type=int, default=1, help="full runs to make and aggregate (default 1)")
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke test, not for reporting)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(FAMILY_NAMES)}")
    ap.add_argument("--out", type=Path, default=None, help="the aggregate (default bench/results.json)")
    ap.add_argument("--runs-dir", type=Path, default=None, help="where runs are kept (default bench/runs)")
    ap.add_argument("--single", type=Path, default=None, help=argparse.SUPPRESS)  # one run, in this process
    ap.add_argument("--meta", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = [f for f in args.only.split(",") if f]
    unknown = set(only) - set(FAMILY_NAMES)
    if unknown:
        ap.error(f"unknown families: {', '.join(sorted(unknown))}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.single is not None:
        return run_once(args.single, args.quick, only, json.loads(args.meta))

    from bench import aggregate, report

    runs_dir = args.runs_dir or (RUNS_DIR / "quick" if args.quick else RUNS_DIR)
    out = args.out or (runs_dir / "aggregate.json" if args.quick else HERE / "results.json")
    batch = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    paths, failed = [], 0
    exports = tempfile.TemporaryDirectory(prefix="planwire-bench-batch-")  # training_models.BATCH_EXPORTS
    child_env = {**os.environ, "PLANWIRE_BENCH_BATCH_EXPORTS": exports.name}
    for i in range(args.runs):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = runs_dir / f"{stamp}.json"
        while path.exists():  # two runs in the same second (a failing --only run)
            path = path.with_name(path.stem + "-1.json")
        meta = {"batch": batch, "run": i + 1, "runs": args.runs}
        print(f"[bench] run {i + 1} of {args.runs} -> {path}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "bench", "--single", str(path), "--meta", json.dumps(meta)]
        cmd += ["--quick"] * args.quick + (["--only", args.only] if only else [])
        rc = subprocess.run(cmd, cwd=HERE.parent, env=child_env, check=False).returncode
        failed += rc != 0
        if path.exists():
            paths.append(path)
    exports.cleanup()
    if not paths:
        print("no run produced results", file=sys.stderr)
        return 1
    agg = aggregate.aggregate([aggregate.load(p) for p in paths], names=[p.name for p in paths])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(agg, indent=1) + "\n")
    print()
    print(report.markdown(agg))
    print(f"\nwrote {out}: {len(paths)} run(s) aggregated ({', '.join(p.name for p in paths)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
