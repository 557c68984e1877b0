"""The Node.js worker beside the Python one (issue 13), the ``node`` family of ``make bench``; alone:
``python -m bench.node [--quick]``.

Both workers run with their defaults (plans in their sandboxed runner processes) over tcp loopback; both
are driven through the same raw DEALER (tests/conformance's frames), so the client's cost is the same for
each; the raw pyzmq echo (bench.echo, at the default I/O scheduling as zeromq.js's threads are) is the
transport floor. Every case is interleaved round by round with the others, as in the other families:

* tiny call: one ``run`` of bench's tiny plan on 4 floats stored on the worker, with ``fetch``, encoded as the
  planwire client encodes it, round trip; target for the Node worker ≤ 1.5× the echo's round trip of the
  Node worker's own request and reply frames;
* pipelined tiny calls: N runs sent before any reply is read; target ≥ 10,000/s;
* 64 MiB put + get (two round trips): target ≥ 0.8× the echo's store + fetch of the same bytes;
* a synchronous training step of bench's CNN (SGD, batch 64) through the planwire client (no target).

For information, the floor of a zeromq.js worker: a raw zeromq.js echo (worker/node/tools/echo.js: a ROUTER
with the Node worker's socket options answering each message at once with the Node worker's reply frames)
timed beside the tiny calls, and the CPU each server process spends per tiny call (all its threads, and its
main thread alone), read from /proc between blocks of calls. zeromq.js 6 costs more per message than pyzmq
(a promise per receive and per send, a libuv poll start/stop per wait): no Node worker can be faster than
that echo. The target stays against the pyzmq echo.

Without node or worker/node/node_modules the family is skipped, saying why.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from bench.echo import FETCH, REPLAY, STORE
from bench.env import Env
from bench.machine import cpu_s, thread_run_ns
from bench.plans import tiny
from bench.timing import LIKE_FOR_LIKE, Case, Report, interleaved
from planwire.transport import messages as m
from planwire.worker.process import WorkerProcess
from tests.conformance.wire import SIGNATURE, Peer, encode
from tests.conformance.workers import NODE_DIR, NodeWorkerProcess, node_missing

FAMILY = "node"
MiB = 1 << 20
# the README table's columns, then the floor of a zeromq.js worker (for information)
SIDES = {"python": "Python plan-worker", "node": "Node.js plan-worker", "echo": "raw pyzmq echo"}
LABELS = {**SIDES, "jsecho": "raw zeromq.js echo"}
TINY = "tiny call, run with fetch [tcp, {}]"
PIPELINED = "pipelined tiny calls [tcp, {}]"
BULK = "64 MiB put+get [tcp, {}]"
TRAIN = "CNN conv8-pool-fc training step, synchronous [tcp, {}]"
CPU = "CPU per tiny call, server process [tcp, {}]"
CPU_MAIN = "CPU per tiny call, server main thread [tcp, {}]"
ROWS = [  # (label, figure template, sides): the README's table, one column per side
    ("tiny call (run with fetch)", TINY, ("python", "node", "echo")),
    ("pipelined tiny calls", PIPELINED, ("python", "node")),
    ("64 MiB put+get (echo: store+fetch)", BULK, ("python", "node", "echo")),
    ("CNN training step (SGD, batch 64)", TRAIN, ("python", "node")),
]


VERDICTS = [  # (name, figure, the side it is divided by (None: the figure itself), op, target, basis)
    (
        "Node.js worker: tiny call vs raw pyzmq echo [tcp]", TINY, "echo", "<=", 1.5,
        f"{LIKE_FOR_LIKE}: the echo moves the Node worker's own request and reply frames",
    ),
    (
        "Node.js worker: pipelined tiny calls/s [tcp]", PIPELINED, None, ">=", 10_000,
        "Node worker alone: one client, one worker (its runner process included)",
    ),
    (
        "Node.js worker: 64 MiB put+get vs raw pyzmq store+fetch [tcp]", BULK, "echo", ">=", 0.8,
        f"{LIKE_FOR_LIKE}: the same bytes in the same two round trips",
    ),
    ("Node.js vs Python worker: tiny call [tcp]", TINY, "python", "", None, LIKE_FOR_LIKE),
    ("Node.js vs Python worker: CNN training step [tcp]", TRAIN, "python", "", None, LIKE_FOR_LIKE),
    (
        "Node.js worker: tiny call vs raw zeromq.js echo [tcp]", TINY, "jsecho", "", None,
        "the floor of a zeromq.js worker, for information (the target is vs the pyzmq echo)",
    ),
    (
        "Node.js worker vs raw zeromq.js echo: CPU per tiny call, server process [tcp]", CPU, "jsecho", "", None,
        "CPU seconds of all the server's threads (and children) per call, for information",
    ),
]  # fmt: skip


# Rounds per set of cases (cap, floor, budget in s): until each ratio taken from it (VERDICTS) has its 95%
# interval within +-5% (bench.timing's rule, looked at on the floor and its doublings). A round here: tiny
# calls ~0.1 s (3 x 100 calls), pipelined ~0.8 s, 64 MiB ~0.6 s, training steps ~0.1 s; the budgets give
# each set 10-40 rounds on this 2-core host (see bench/README.md for the spread each figure showed).
SAMPLING = {TINY: (80, 10, 15.0), PIPELINED: (12, 5, 8.0), BULK: (20, 8, 12.0), TRAIN: (30, 8, 8.0)}
# Tiny calls made on each side before its tiny calls are timed: V8 optimizes the Node worker's request path
# over its first calls, its main thread's instructions per call falling by a quarter to a third (~1000 calls
# with its tier-up budget on Node 20, worker/node/src/v8flags.js; 2000-5000 at V8's default, which Node 22+
# keeps: there these 2000 may end before the path is all optimized). With bench.sampling's 5 warm-up calls
# its first rounds timed that compilation (its median then fell with the number of rounds run); every side
# gets the same warm-up, so the figures are each server's per-call cost once warm.
TINY_WARMUP = 2000
QUICK_SAMPLING = (3, 2, 10.0)


def _sample(cases: list[Case], figure: str, quick: bool) -> dict[str, Any]:
    """``cases`` (one per side of ``figure``) interleaved by the set's SAMPLING."""
    rounds, floor, budget_s = QUICK_SAMPLING if quick else SAMPLING[figure]
    return interleaved(cases, rounds=rounds, budget_s=budget_s, min_rounds=floor, watch=_watch(figure))


def _watch(figure: str) -> list[tuple[str, str | None]]:
    """The case pairs whose ratios VERDICTS takes from ``figure``'s cases (a lone figure: its own median)."""
    mine = figure.format(SIDES["node"])
    return [(mine, None if over is None else figure.format(LABELS[over])) for _, f, over, *_ in VERDICTS if f == figure]


class JsEcho:
    """worker/node/tools/echo.js, the raw zeromq.js echo (the floor of a zeromq.js worker), on tcp loopback."""

    def __init__(self) -> None:
        cmd = ["node", str(NODE_DIR / "tools" / "echo.js"), "tcp://127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=NODE_DIR)
        line = self.proc.stdout.readline().decode() if self.proc.stdout else ""
        if not line.startswith("ready on "):
            self.close()
            raise RuntimeError(f"the zeromq.js echo did not start: {line!r}")
        self.url = line.split()[2]
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.url)

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of ``proc``, its children and all their threads; of its main thread alone)."""
    pids = [proc.pid, *(c.pid for c in proc.children(recursive=True))]
    return sum(cpu_s(pid) for pid in pids), thread_run_ns(proc.pid, proc.pid) / 1e9


def _cpu_per_call(servers: dict[str, tuple[zmq.Socket, list[bytes], int]], n: int, rounds: int) -> dict:
    """{side: ([process us per call], [main thread us per call])}: blocks of ``n`` tiny calls, the sides
    interleaved round by round."""
    out: dict[str, tuple[list[float], list[float]]] = {side: ([], []) for side in servers}
    procs = {side: psutil.Process(pid) for side, (_, _, pid) in servers.items()}
    for _ in range(rounds):
        for side, (sock, request, _) in servers.items():
            before = _cpu(procs[side])
            for _ in range(n):
                sock.send_multipart(request, copy=False)
                sock.recv_multipart(copy=False)
            after = _cpu(procs[side])
            out[side][0].append((after[0] - before[0]) / n * 1e6)
            out[side][1].append((after[1] - before[1]) / n * 1e6)
    return out


def _round_trip(sock: zmq.Socket, frames: list[bytes]) -> Callable[[], Any]:
    def call() -> list[bytes]:
        sock.send_multipart(frames, copy=False)
        return sock.recv_multipart(copy=False)

    return call


def _tiny(peer: Peer) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(request with fetch, its reply, request without fetch) of bench's tiny plan on ``peer``'s worker: a run on
    4 floats stored there, encoded as the planwire client encodes it (the Python family's tiny call)."""
    pid = peer.register(tiny().variants[0].data)["plan"]
    peer.put("bench-x", np.arange(4, dtype=np.float32))

    def run(rid: int, output: str, fetch: list[int]) -> list[bytes]:
        msg = m.Run(id=rid, plan=pid, args=[m.Arg(ref="bench-x")], outputs=[output], fetch=fetch)
        return [SIGNATURE, m.encoder.encode(msg)]

    request, pipelined = run(1, "bench-y", [0]), run(2, "bench-p", [])
    peer.send_frames(request)
    reply = peer.sock.recv_multipart()
    assert json.loads(reply[1])["type"] == "tensors", reply[1]
    return request, reply, pipelined


def _pipelined(sock: zmq.Socket, request: list[bytes], n: int) -> Callable[[], None]:
    def burst() -> None:
        for _ in range(n):
            sock.send_multipart(request)
        for _ in range(n):
            sock.recv_multipart()

    return burst


def _put_get(peer: Peer, data: bytes) -> Callable[[], None]:
    desc, _ = encode(np.empty(len(data), np.uint8))
    tensor = {"key": "bench-big", **desc, "frame": 0}
    put = [SIGNATURE, json.dumps({"type": "put", "id": 3, "tensors": [tensor]}).encode()]
    get = [SIGNATURE, json.dumps({"type": "get", "id": 4, "keys": ["bench-big"]}).encode()]
    sock = peer.sock

    def move() -> None:
        sock.send_multipart([*put, data], copy=False)
        sock.recv_multipart(copy=False)
        sock.send_multipart(get)
        frames = sock.recv_multipart(copy=False)
        assert len(frames[2]) == len(data)

    return move


def _store_fetch(sock: zmq.Socket, data: bytes) -> Callable[[], None]:
    def move() -> None:
        sock.send_multipart([STORE, SIGNATURE, b"{}", data], copy=False)
        sock.recv_multipart(copy=False)
        sock.send_multipart([FETCH])
        sock.recv_multipart(copy=False)

    return move


def _training_plan() -> Any:
    """bench's CNN training step (SGD, batch 64) as a plan: built once, sent to both workers."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from bench.training import models
    from planwire.exporter import optim, training_plan

    torch.manual_seed(0)
    return training_plan(
        models()["CNN conv8-pool-fc"], loss=F.cross_entropy, optimizer=optim.SGD(lr=0.1, momentum=0.9),
        args_shape=[(-1, 1, 8, 8), (-1,)], args_dtypes=[torch.float32, torch.int64],
    )  # fmt: skip


def _training_step(url: str, step: Any, stack: list) -> Callable[[], None]:
    """One synchronous step (run + get the loss) of ``step`` through the planwire client."""
    import torch

    from bench.training import BATCH
    from planwire import connect

    w = connect(url, timeout=60)
    stack.append(w)
    ptr = step.send(w)
    xp, yp = w.put(torch.randn(BATCH, 1, 8, 8)), w.put(torch.randint(0, 10, (BATCH,)))

    def one() -> None:
        loss = ptr(xp, yp)
        (loss[0] if isinstance(loss, tuple) else loss).get()

    return one


def run(env: Env, report: Report, quick: bool) -> None:
    if why := node_missing():
        report.skipped[FAMILY] = why
        return
    stack: list = []
    try:
        procs = {"python": WorkerProcess("bench-python"), "node": None}
        stack.append(procs["python"])
        procs["node"] = NodeWorkerProcess("bench-node")
        stack.append(procs["node"])
        peers = {side: Peer(p.url, timeout=60) for side, p in procs.items()}
        stack += peers.values()
        echo = env.echo("tcp", False, FAMILY)
        jsecho = JsEcho()
        stack.append(jsecho)
        frames = {side: _tiny(peer) for side, peer in peers.items()}
        request, reply, _ = frames["node"]
        for sock in (echo, jsecho.sock):
            sock.send_multipart([REPLAY, *reply])
            sock.recv_multipart()
        per = 50 if quick else 100  # short blocks of tiny calls, many rounds
        warm = TINY_WARMUP
        tiny_cases = [Case(TINY.format(SIDES[s]), _round_trip(peers[s].sock, frames[s][0]), per, warm) for s in peers]
        tiny_cases.append(Case(TINY.format(SIDES["echo"]), _round_trip(echo, request), per, warm))
        tiny_cases.append(Case(TINY.format(LABELS["jsecho"]), _round_trip(jsecho.sock, request), per, warm))
        samples = _sample(tiny_cases, TINY, quick)
        for c in tiny_cases:
            report.time(FAMILY, c.name, samples[c.name], "us")

        servers = {s: (peers[s].sock, frames[s][0], procs[s].proc.pid) for s in peers}
        servers["echo"] = (echo, request, env.echo_pid(tuned=False))
        servers["jsecho"] = (jsecho.sock, request, jsecho.proc.pid)
        cpu = _cpu_per_call(servers, 500 if quick else 2000, 2 if quick else 5)
        for side, (whole, main) in cpu.items():
            report.values(FAMILY, CPU.format(LABELS[side]), whole, "us", note="all threads and children, per call")
            report.values(FAMILY, CPU_MAIN.format(LABELS[side]), main, "us", note="the thread that runs its loop")

        n = 2000  # within the workers' default --max-client-queue of 10,000 replies; ~1 s at the Python worker's rate
        pipe_cases = [Case(PIPELINED.format(SIDES[s]), _pipelined(peers[s].sock, frames[s][2], n), 1, 1) for s in peers]
        samples = _sample(pipe_cases, PIPELINED, quick)
        for c in pipe_cases:
            report.rate(FAMILY, c.name, samples[c.name], n, "calls/s", note=f"{n} calls per run")

        data = np.ones(64 * MiB, np.uint8).tobytes()
        bulk_cases = [Case(BULK.format(SIDES[s]), _put_get(peers[s], data), 1, 1) for s in peers]
        bulk_cases.append(Case(BULK.format(SIDES["echo"]), _store_fetch(echo, data), 1, 1))
        samples = _sample(bulk_cases, BULK, quick)
        for c in bulk_cases:
            report.rate(FAMILY, c.name, samples[c.name], 128, "MiB/s", note="64 MiB up, then 64 MiB down")

        step = _training_plan()
        train_cases = [Case(TRAIN.format(SIDES[s]), _training_step(procs[s].url, step, stack), 10, 5) for s in peers]
        samples = _sample(train_cases, TRAIN, quick)
        for c in train_cases:
            report.time(FAMILY, c.name, samples[c.name], "ms")
    finally:
        for obj in reversed(stack):
            obj.close()

    floor = ("jsecho", "echo", "what zeromq.js itself costs: the same frames through each echo")
    for figure, what in ((TINY, "tiny call"), (CPU, "CPU per tiny call, server process")):
        mine, over = ((FAMILY, figure.format(LABELS[side])) for side in floor[:2])
        if over[1] in report.figures.get(FAMILY, {}):
            report.ratio(f"raw zeromq.js echo vs raw pyzmq echo: {what} [tcp]", mine, over, basis=floor[2])
    for name, figure, over, op, target, basis in VERDICTS:
        mine = (FAMILY, figure.format(SIDES["node"]))
        if over is None:  # a target on the figure itself
            report.on_figure(name, mine, op, target, basis=basis)
        else:
            report.ratio(name, mine, (FAMILY, figure.format(LABELS[over])), op, target, basis=basis)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke test)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    report = Report()
    with Env() as env:
        run(env, report, args.quick)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if FAMILY in report.skipped:
        print(f"bench.node: {report.skipped[FAMILY]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
