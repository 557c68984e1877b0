"""``python -m bench [--quick] [--only FAMILY,...] [--out PATH]``: run the benchmarks on real plan-worker
processes over loopback (tcp and ipc), print a table and write bench/results.json."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

from bench import build, bulk, comm, footprint, latency, pipeline, training
from bench.env import Env
from bench.timing import Report

# Order matters: start-up is timed on a quiet machine, the loaded footprint after everything else.
FAMILIES = {
    "startup": footprint.run_start,
    "latency": latency.run,
    "communication": comm.run,
    "bulk": bulk.run,
    "pipelining": pipeline.run,
    "build": build.run,
    "training": training.run,
    "footprint": footprint.run_loaded,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer runs (a smoke test, not for reporting)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.json")
    args = ap.parse_args(argv)
    only = [f for f in args.only.split(",") if f]
    unknown = set(only) - set(FAMILIES)
    if unknown:
        ap.error(f"unknown families: {', '.join(sorted(unknown))}")
    warnings.filterwarnings("ignore")
    logging.getLogger("planwire").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" per export

    report = Report()
    with Env() as env:
        for name, fn in FAMILIES.items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                fn(env, report, args.quick)
            except Exception as e:  # noqa: BLE001 - one family failing must not lose the others
                report.errors[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        report.machine["client_zmq_io_threads"] = env.client_io_threads
        report.machine["worker_providers"] = env.providers
    print(report.table())
    report.write(args.out)
    print(f"\nwrote {args.out} ({report.to_json()['duration_s']} s)")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
