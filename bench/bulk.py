"""Bulk: put + get of 1 MiB and 64 MiB float32 tensors vs raw pyzmq and torch.rpc.

Like for like: "raw pyzmq store + fetch" moves the same messages and bytes as put + get (the payload up in
one round trip, back down in a second) through a server with planwire's socket options, server loop and
I/O scheduling (``bench.echo``, STORE/FETCH); the one-round-trip echo of the payload is shown beside it as
the transport floor. An earlier run's "64 MiB put + get 1.37x faster than the raw echo [ipc]" compared
against an echo whose I/O threads were not under SCHED_BATCH, on 8 samples of a round trip whose single
samples range ~85-190 ms on this shared host: with both sides alike and 20 samples it is not reproduced.

Samples: 64 MiB cases take interleaved rounds of one call until the ratios' 95% intervals are within +-5%,
at least 10 rounds (a single 64 MiB round trip ranges ~85-190 ms on this shared host: fewer let a slow
spell move a median), at most 20; 1 MiB cases 20 calls in each of 3-5 rounds, until each median is within
+-5%.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq

from bench import rpcfns
from bench.echo import FETCH, STORE
from bench.env import Env
from bench.timing import Case, Report, interleaved
from planwire.transport.sockets import recv_frames, send_frames

FAMILY = "bulk"
SIZES = {"1 MiB": 1 << 20, "64 MiB": 64 << 20}


def _store_fetch(sock: zmq.Socket, arr: np.ndarray) -> np.ndarray:
    """Two round trips, as put + get: the payload up (answered by a short frame), then back down."""
    send_frames(sock, [STORE, arr])
    recv_frames(sock)
    send_frames(sock, [FETCH])
    (frame,) = recv_frames(sock)
    return np.frombuffer(frame, dtype=arr.dtype)


def _echo(sock: zmq.Socket, arr: np.ndarray) -> np.ndarray:
    send_frames(sock, [arr])  # zero-copy at this size, as planwire's frames
    (frame,) = recv_frames(sock)
    return np.frombuffer(frame, dtype=arr.dtype)


def run(env: Env, report: Report, quick: bool) -> None:
    import torch
    import torch.distributed.rpc as rpc

    peer = env.rpc()
    for label, nbytes in SIZES.items():
        x = torch.randn(nbytes // 4)
        xn = x.numpy()
        big = nbytes > (8 << 20)
        cases: list[Case] = []
        for tr in ("tcp", "ipc"):
            w, sock = env.worker(tr), env.echo(tr, client=FAMILY)
            assert torch.equal(w.put(x).get(), x)
            assert np.array_equal(_echo(sock, xn), xn) and np.array_equal(_store_fetch(sock, xn), xn)

            def put_get(w: Any = w, x: Any = x) -> Any:
                return w.put(x).get()

            def store_fetch(sock: zmq.Socket = sock, xn: np.ndarray = xn) -> Any:
                return _store_fetch(sock, xn)

            def echo(sock: zmq.Socket = sock, xn: np.ndarray = xn) -> Any:
                return _echo(sock, xn)

            per = 1 if big else 20
            cases += [
                Case(f"{label} put+get [{tr}]", put_get, per, warmup=1),
                Case(f"{label} raw pyzmq store+fetch [{tr}]", store_fetch, per, warmup=1),
                Case(f"{label} raw pyzmq echo [{tr}]", echo, per, warmup=1),
            ]
        assert torch.equal(rpc.rpc_sync(peer, rpcfns.echo, args=(x,)), x)
        cases.append(
            Case(
                f"{label} torch.rpc rpc_sync echo [tcp]",
                lambda x=x: rpc.rpc_sync(peer, rpcfns.echo, args=(x,)),
                1 if big else 20,
                warmup=1,
            )
        )
        rounds = (3 if quick else 20) if big else (2 if quick else 5)
        floor = (3 if quick else 8) if big else (2 if quick else 3)
        # 64 MiB: until both transports' ratios to the like-for-like store+fetch and to the echo are within
        # +-5% (95% interval); 1 MiB (no target): until each case's median is.
        watch = (
            [
                (f"{label} raw pyzmq {b} [{tr}]", f"{label} put+get [{tr}]")
                for tr in ("tcp", "ipc")
                for b in ("store+fetch", "echo")
            ]
            if big
            else None
        )
        samples = interleaved(cases, rounds=rounds, budget_s=8 if quick else 12, min_rounds=floor, watch=watch)
        for c in cases:
            report.time(FAMILY, c.name, samples[c.name], "ms")
        for c in cases:
            report.rate(
                FAMILY,
                c.name.replace(label, f"{label} throughput"),
                samples[c.name],
                2 * nbytes / 1e9,
                "GB/s",
            )
    report.note(FAMILY, "throughput counts the bytes both ways (2 x size per round trip); p90 is the slow side")
    for tr in ("tcp", "ipc"):
        report.ratio(
            f"64 MiB put+get vs raw pyzmq store+fetch throughput [{tr}]",
            (FAMILY, f"64 MiB throughput put+get [{tr}]"),
            (FAMILY, f"64 MiB throughput raw pyzmq store+fetch [{tr}]"),
            ">=",
            0.8,
            basis="like-for-like: same messages and bytes, server loop, socket options and I/O scheduling",
        )
        report.ratio(
            f"64 MiB put+get vs raw pyzmq echo throughput [{tr}]",
            (FAMILY, f"64 MiB throughput put+get [{tr}]"),
            (FAMILY, f"64 MiB throughput raw pyzmq echo [{tr}]"),
            basis="the transport floor: the same bytes in one round trip instead of two",
        )
