"""Bulk: put + get of 1 MiB and 64 MiB float32 tensors vs a raw pyzmq echo and torch.rpc."""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq

from bench import rpcfns
from bench.env import Env
from bench.timing import Case, Report, interleaved

FAMILY = "bulk"
SIZES = {"1 MiB": 1 << 20, "64 MiB": 64 << 20}


def _echo(sock: zmq.Socket, arr: np.ndarray) -> np.ndarray:
    sock.send(arr, copy=False)
    frame = sock.recv(copy=False)
    return np.frombuffer(frame.buffer, dtype=arr.dtype)


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
            w, sock = env.worker(tr), env.echo(tr)
            assert torch.equal(w.put(x).get(), x)
            assert np.array_equal(_echo(sock, xn), xn)

            def put_get(w: Any = w, x: Any = x) -> Any:
                return w.put(x).get()

            def echo(sock: zmq.Socket = sock, xn: np.ndarray = xn) -> Any:
                return _echo(sock, xn)

            cases += [
                Case(f"{label} put+get [{tr}]", put_get, 1 if big else 20, warmup=1),
                Case(f"{label} raw pyzmq echo [{tr}]", echo, 1 if big else 20, warmup=1),
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
        rounds = (3 if quick else 8) if big else (2 if quick else 5)
        samples = interleaved(cases, rounds=rounds, budget_s=15 if quick else 40)
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
            f"64 MiB put+get vs raw pyzmq echo throughput [{tr}]",
            (FAMILY, f"64 MiB throughput put+get [{tr}]"),
            (FAMILY, f"64 MiB throughput raw pyzmq echo [{tr}]"),
            ">=",
            0.8,
        )
