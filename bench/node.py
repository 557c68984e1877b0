"""The Node.js worker beside the Python one, same run, same machine: ``python -m bench.node [--quick]``.

Each figure is measured on both workers (tcp loopback, raw ZeroMQ frames as tests/conformance speaks them,
so the client's cost is the same for both) and on the raw pyzmq echo server (bench.echo, the transport
floor), and compared with the targets of issue 13:

* tiny call: one ``run`` of bench's tiny plan on 4 floats with ``fetch``, round trip, median µs;
  target ≤ 1.5× the echo's round trip of the same request and reply bytes;
* pipelined calls/s: N runs sent before any reply is read; target ≥ 10,000/s;
* 64 MiB put + get (a move): MiB/s over both round trips; target ≥ 0.8× the echo's store + fetch;
* a training step of bench's CNN (SGD, batch 64) through the planwire client, median ms (no target).

Prints a table; ``--json FILE`` also writes the figures. Needs node and worker/node/node_modules.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.echo import FETCH, REPLAY, STORE
from bench.env import spawn_ready, stop_process
from bench.plans import tiny
from planwire.worker.process import WorkerProcess
from tests.conformance.wire import SIGNATURE, Peer, encode
from tests.conformance.workers import NodeWorkerProcess, node_missing

MiB = 1 << 20
TARGETS = {"tiny_vs_echo": 1.5, "pipelined_per_s": 10_000, "bulk_vs_echo": 0.8}


def round_trips(sock: zmq.Socket, frames: list[bytes], n: int) -> list[float]:
    """Seconds of each of ``n`` send + receive of ``frames``."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.send_multipart(frames)
        sock.recv_multipart()
        out.append(time.perf_counter() - t0)
    return out


def worker_figures(url: str, quick: bool) -> dict[str, Any]:
    peer = Peer(url, timeout=60)
    try:
        pid = peer.register(tiny().variants[0].data)["plan"]
        x = np.arange(4, dtype=np.float32)
        header, frames = peer.run_header(pid, [x], ["bench-y"], fetch=[0])
        request = [SIGNATURE, json.dumps({**header, "id": 1}).encode(), *frames]
        for _ in range(200):  # warm up
            peer.send_frames(request)
            peer.recv()
        tiny_s = statistics.median(round_trips(peer.sock, request, 500 if quick else 5000))
        peer.send_frames(request)
        reply = peer.sock.recv_multipart()  # the exact reply bytes, for the echo's like-for-like

        n = 2000 if quick else 20_000
        plain, _ = peer.run_header(pid, [x], ["bench-p"])
        pipelined = [SIGNATURE, json.dumps({**plain, "id": 2}).encode(), *frames]
        t0 = time.perf_counter()
        for _ in range(n):
            peer.send_frames(pipelined)
        for _ in range(n):
            peer.sock.recv_multipart()
        per_s = n / (time.perf_counter() - t0)

        big = np.ones(64 * MiB, np.uint8)
        desc, data = encode(big)
        times = []
        for _ in range(2 if quick else 5):
            t0 = time.perf_counter()
            peer.ok({"type": "put", "tensors": [{"key": "bench-big", **desc, "frame": 0}]}, [data])
            got = peer.ok({"type": "get", "keys": ["bench-big"]})
            times.append(time.perf_counter() - t0)
            assert len(got.frames[0]) == 64 * MiB
        return {"tiny_us": tiny_s * 1e6, "pipelined_per_s": per_s, "bulk_mib_s": 128 / min(times), "reply": reply,
                "request": request}  # fmt: skip
    finally:
        peer.close()


def echo_figures(request: list[bytes], reply: list[bytes], quick: bool) -> dict[str, float]:
    proc, line = spawn_ready([sys.executable, "-m", "bench.echo", "tcp://127.0.0.1:0"], 30)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(line.removeprefix("ready on ").split()[0])
        sock.send_multipart([REPLAY, *reply])
        sock.recv_multipart()
        round_trips(sock, request, 200)
        tiny_s = statistics.median(round_trips(sock, request, 500 if quick else 5000))
        data = np.ones(64 * MiB, np.uint8).tobytes()
        times = []
        for _ in range(2 if quick else 5):
            t0 = time.perf_counter()
            sock.send_multipart([STORE, SIGNATURE, b"{}", data])
            sock.recv_multipart()
            sock.send_multipart([FETCH])
            sock.recv_multipart()
            times.append(time.perf_counter() - t0)
        return {"tiny_us": tiny_s * 1e6, "bulk_mib_s": 128 / min(times)}
    finally:
        sock.close(linger=0)
        stop_process(proc)


def training_ms(url: str, steps: int) -> float:
    """Median ms of one synchronous training step of bench's CNN (SGD, batch 64) via the planwire client."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from bench.training import BATCH, models
    from planwire import connect
    from planwire.exporter import optim, training_plan

    torch.manual_seed(0)
    model = models()["CNN conv8-pool-fc"]
    step = training_plan(
        model, loss=F.cross_entropy, optimizer=optim.SGD(lr=0.1, momentum=0.9),
        args_shape=[(-1, 1, 8, 8), (-1,)], args_dtypes=[torch.float32, torch.int64],
    )  # fmt: skip
    with connect(url, timeout=60) as w:
        ptr = step.send(w)
        xp, yp = w.put(torch.randn(BATCH, 1, 8, 8)), w.put(torch.randint(0, 10, (BATCH,)))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = ptr(xp, yp)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.get()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke test)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if why := node_missing():
        print(f"bench.node: {why}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, float]] = {}
    request = reply = None
    for name, launch in (("python", WorkerProcess), ("node", NodeWorkerProcess)):
        with launch(f"bench-{name}") as proc:
            figs = worker_figures(proc.url, args.quick)
            request, reply = figs.pop("request"), figs.pop("reply")
            figs["train_step_ms"] = training_ms(proc.url, 30 if args.quick else 200)
            results[name] = figs
    results["echo"] = echo_figures(request, reply, args.quick)  # type: ignore[arg-type]
    echo = results["echo"]
    checks = {}
    for name in ("python", "node"):
        r = results[name]
        checks[name] = {
            "tiny_vs_echo": r["tiny_us"] / echo["tiny_us"],
            "pipelined_per_s": r["pipelined_per_s"],
            "bulk_vs_echo": r["bulk_mib_s"] / echo["bulk_mib_s"],
        }
    print(f"{'':24}{'python':>12}{'node':>12}{'echo':>12}  target (node)")
    rows = [
        ("tiny call (µs)", "tiny_us", "{:.1f}", f"≤ {TARGETS['tiny_vs_echo']}× echo"),
        ("pipelined calls/s", "pipelined_per_s", "{:,.0f}", f"≥ {TARGETS['pipelined_per_s']:,}"),
        ("64 MiB put+get (MiB/s)", "bulk_mib_s", "{:,.0f}", f"≥ {TARGETS['bulk_vs_echo']}× echo"),
        ("CNN train step (ms)", "train_step_ms", "{:.2f}", ""),
    ]
    for label, key, fmt, target in rows:
        cells = [fmt.format(results[w][key]) if key in results[w] else "-" for w in ("python", "node", "echo")]
        print(f"{label:24}{cells[0]:>12}{cells[1]:>12}{cells[2]:>12}  {target}")
    c = checks["node"]
    passed = {
        "tiny_vs_echo": c["tiny_vs_echo"] <= TARGETS["tiny_vs_echo"],
        "pipelined_per_s": c["pipelined_per_s"] >= TARGETS["pipelined_per_s"],
        "bulk_vs_echo": c["bulk_vs_echo"] >= TARGETS["bulk_vs_echo"],
    }
    print(
        f"node: tiny {c['tiny_vs_echo']:.2f}× echo, bulk {c['bulk_vs_echo']:.2f}× echo; "
        f"targets met: {', '.join(k for k, v in passed.items() if v) or 'none'}"
        f"{'; missed: ' + ', '.join(k for k, v in passed.items() if not v) if not all(passed.values()) else ''}"
    )
    if args.json:
        args.json.write_text(json.dumps({"figures": results, "ratios": checks, "targets_met": passed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
