"""Latency of one tiny call: plan run + get vs a raw pyzmq echo, torch.rpc, local onnxruntime, eager torch.

Like for like: the echo moves, per round trip, the very frames a plan call moves (the recorded request out,
the recorded reply back), through a server with planwire's socket options and server loop, and with its
I/O threads (both ends) scheduled as planwire's. The same pair is also measured with every I/O thread at
the default scheduling (planwire with ``PLANWIRE_IO_SCHED=default``), and the rpc_sync target compares
planwire at the default scheduling with torch.rpc, which has no such setting of its own.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from bench import plans, rpcfns
from bench.echo import REPLAY
from bench.env import Env
from bench.timing import LIKE_FOR_LIKE, Case, Report, interleaved
from planwire.transport.sockets import recv_frames, send_frames

FAMILY = "latency"
PLAN = "plan call ptr(x).get() [{}]"
ONE = "one Run request with fetch, no pointers (1-message floor) [{}]"
ECHO = "raw pyzmq echo of a plan call's frames [{}]"
HOP = "raw pyzmq echo of a plan call's frames through a second process (socket pair) [{}]"
DEFAULT = ", I/O threads at default scheduling"
PLAN_DEFAULT = PLAN + DEFAULT
ECHO_DEFAULT = ECHO + DEFAULT
PRIVATE = "plan call ptr(x).get() on the worker's private data, released by an approved as_is rule, audited [{}]"
RPC = "torch.rpc rpc_sync [tcp]"
RPC_SHM = "torch.rpc rpc_sync [shm, isolated]"


def record_call(w: Any, call: Any) -> tuple[list[bytes], list[bytes]]:
    """The frames client ``w`` sends and receives during one steady-state ``call()`` (one message each)."""
    call()
    sent: list[list[bytes]] = []
    received: list[list[bytes]] = []
    send, recv = w._send, w._recv

    def recording_send(frames: Any) -> None:
        sent.append([bytes(f) for f in frames])
        send(frames)

    def recording_recv(timeout: Any) -> Any:
        frames = recv(timeout)
        if frames is not None:
            received.append([bytes(f) for f in frames])
        return frames

    w._send, w._recv = recording_send, recording_recv
    try:
        call()
    finally:
        del w._send, w._recv
    if len(sent) != 1 or len(received) != 1:
        raise RuntimeError(f"a tiny call moved {len(sent)} requests and {len(received)} replies, not 1 and 1")
    return sent[0], received[0]


def replaying_echo(sock: Any, request: list[bytes], reply: list[bytes]) -> Any:
    """A round trip of ``request`` out and ``reply`` back through the echo server (set up here)."""
    send_frames(sock, [REPLAY, *reply])
    assert [bytes(f) for f in recv_frames(sock)] == [REPLAY]

    def echo() -> list:
        send_frames(sock, request)
        return recv_frames(sock)

    assert [bytes(f) for f in echo()] == reply
    return echo


def _cases(env: Env, transport: str, plan: plans.HandPlan, x: Any, per: int, report: Report) -> list[Case]:
    from planwire.transport import messages as m

    w = env.worker(transport)
    ptr, xp = w.plan_pointer(plan), w.put(x)
    variant = plan.variants[0]
    expected = plans.tiny_torch(x).numpy()
    assert np.allclose(np.asarray(ptr(xp).get()), expected)

    def one_message() -> Any:  # what a call would cost if the protocol had a single-message run-and-return
        run = m.Run(id=0, plan=variant.id, args=[m.Arg(ref=xp.key)], outputs=["bench-one"], fetch=[0])
        reply, buffers = w.request(lambda rid: msgspec.structs.replace(run, id=rid))
        return w._decode(reply.tensors[0], buffers)

    assert np.allclose(one_message(), expected)
    request, reply = record_call(w, lambda: ptr(xp).get())
    if transport == "tcp":
        report.note(
            FAMILY,
            f"the echo moves a plan call's own frames: request {[len(f) for f in request]} bytes, "
            f"reply {[len(f) for f in reply]} bytes",
        )
    cases = [
        Case(PLAN.format(transport), lambda: ptr(xp).get(), per),
        Case(ONE.format(transport), one_message, per),
        Case(ECHO.format(transport), replaying_echo(env.echo(transport, True, FAMILY), request, reply), per),
        Case(HOP.format(transport), replaying_echo(env.echo(transport, True, FAMILY, hop=True), request, reply), per),
    ]
    if transport == "tcp":  # the pair at default scheduling: on tcp only (a run's time is bounded)
        echo = replaying_echo(env.echo(transport, False, FAMILY), request, reply)
        plain = env.worker(transport, io_sched="default")
        plain_ptr, plain_x = plain.plan_pointer(plan), plain.put(x)
        cases += [
            Case(ECHO_DEFAULT.format(transport), echo, per),
            Case(PLAN_DEFAULT.format(transport), lambda: plain_ptr(plain_x).get(), per),
        ]
        # The same call on the data owner's private data (a third worker: --data private, --policy approving
        # the plan's output as_is, --audit): the release checks and the audit line are all it adds.
        owner = env.private_worker(transport, x.numpy(), variant.id, "y")
        (secret,) = owner.search("private")
        owner_ptr = owner.plan_pointer(plan)
        assert np.allclose(np.asarray(owner_ptr(secret).get()), expected)
        cases.append(Case(PRIVATE.format(transport), lambda: owner_ptr(secret).get(), per))
    return cases


def run(env: Env, report: Report, quick: bool) -> None:
    import onnxruntime as ort
    import torch
    import torch.distributed.rpc as rpc

    from planwire.transport.ortoptions import session_options

    plan = plans.tiny()
    x = torch.randn(plans.SHAPE)
    xn = x.numpy()
    per = 25  # short blocks, many rounds: slow spells of a shared host hit every case alike
    cases = _cases(env, "tcp", plan, x, per, report) + _cases(env, "ipc", plan, x, per, report)
    peer = env.rpc()
    assert torch.allclose(rpc.rpc_sync(peer, rpcfns.tiny, args=(x,)), plans.tiny_torch(x))
    cases.append(Case(RPC, lambda: rpc.rpc_sync(peer, rpcfns.tiny, args=(x,)), per // 4))
    sess = ort.InferenceSession(plan.variants[0].data, session_options(1), providers=["CPUExecutionProvider"])
    cases.append(Case("local onnxruntime InferenceSession.run", lambda: sess.run(None, {"x": xn}), per))
    cases.append(Case("eager torch", lambda: plans.tiny_torch(x), per))
    # Blocks of `per` calls per case per round (short blocks, many rounds: a slow spell of the shared host hits
    # every case alike); rounds go on until every ratio below is within +-5% (95% interval), at least 12 rounds
    # (the rounds bootstrap needs that many to mean something), at most 160 or 10 s (a round is ~0.2 s here).
    ratios = [(PLAN.format(tr), ECHO.format(tr)) for tr in ("tcp", "ipc")]
    ratios += [(PLAN.format(tr), HOP.format(tr)) for tr in ("tcp", "ipc")]
    ratios += [(HOP.format(tr), ECHO.format(tr)) for tr in ("tcp", "ipc")]
    ratios += [
        (PLAN_DEFAULT.format("tcp"), ECHO_DEFAULT.format("tcp")),
        (PLAN.format("tcp"), ECHO_DEFAULT.format("tcp")),
        (PLAN_DEFAULT.format("tcp"), PLAN.format("tcp")),
        (PRIVATE.format("tcp"), PLAN.format("tcp")),
        (RPC, PLAN_DEFAULT.format("tcp")),
        (RPC, PLAN.format("tcp")),
    ]
    samples = interleaved(
        cases, rounds=8 if quick else 160, budget_s=8 if quick else 10, min_rounds=4 if quick else 12, watch=ratios
    )
    for c in cases:
        report.time(FAMILY, c.name, samples[c.name], "us")
    report.time(
        FAMILY,
        RPC_SHM,
        env.rpc_isolated_tiny("default", 200 if quick else 1000),
        "us",
        note="TensorPipe default transport (shm), measured alone: it busy-polls a core per process",
    )
    report.note(
        FAMILY,
        "plan call = 1 request: the run's reply carries the small result (run.inline_max), get() reads it "
        "there; the stored copy is freed with a later batch of deletes",
    )
    for tr in ("tcp", "ipc"):
        report.ratio(
            f"tiny plan call vs raw pyzmq echo [{tr}]",
            (FAMILY, PLAN.format(tr)),
            (FAMILY, ECHO.format(tr)),
            "<=",
            1.5,
        )
    for tr in ("tcp", "ipc"):
        report.ratio(
            f"tiny plan call vs raw pyzmq echo through a second process [{tr}]",
            (FAMILY, PLAN.format(tr)),
            (FAMILY, HOP.format(tr)),
            basis=LIKE_FOR_LIKE + ": the honest floor of a worker whose plans run in another process (planwire's "
            "sandboxed runner): the same frames, and a socket-pair hop to a child process and back, doing nothing",
        )
        report.ratio(
            f"raw pyzmq echo through a second process vs plain echo [{tr}]",
            (FAMILY, HOP.format(tr)),
            (FAMILY, ECHO.format(tr)),
            basis="the echo against itself: what one process hop costs at best on this host",
        )
    tr = "tcp"  # the default-scheduling pair is measured on tcp only
    report.ratio(
        f"tiny plan call vs raw pyzmq echo, both at default I/O scheduling [{tr}]",
        (FAMILY, PLAN_DEFAULT.format(tr)),
        (FAMILY, ECHO_DEFAULT.format(tr)),
    )
    report.ratio(
        f"tiny plan call vs raw pyzmq echo at default I/O scheduling [{tr}]",
        (FAMILY, PLAN.format(tr)),
        (FAMILY, ECHO_DEFAULT.format(tr)),
        basis="not like-for-like: only planwire's I/O threads under SCHED_BATCH (the earlier headline)",
    )
    report.ratio(
        f"tiny plan call, default vs SCHED_BATCH I/O threads [{tr}]",
        (FAMILY, PLAN_DEFAULT.format(tr)),
        (FAMILY, PLAN.format(tr)),
        basis="planwire against itself: what SCHED_BATCH changes",
    )
    report.ratio(
        f"tiny plan call on private data (as_is rule, audited) vs on the client's data [{tr}]",
        (FAMILY, PRIVATE.format(tr)),
        (FAMILY, PLAN.format(tr)),
        basis="the same plan, tensor size and transport; the private worker also applies the owner's policy "
        "(the result is private-derived), releases it as_is and appends an audit line per call",
    )
    report.ratio(
        "rpc_sync vs tiny plan call, both at default I/O scheduling [tcp]",
        (FAMILY, RPC),
        (FAMILY, PLAN_DEFAULT.format("tcp")),
        ">=",
        5,
        basis=LIKE_FOR_LIKE + ": neither side's threads rescheduled",
    )
    report.ratio(
        "rpc_sync vs tiny plan call [tcp]",
        (FAMILY, RPC),
        (FAMILY, PLAN.format("tcp")),
        basis="not like-for-like: planwire's I/O threads under SCHED_BATCH, TensorPipe's at the default",
    )
    report.ratio(
        "rpc_sync (shm, isolated) vs tiny plan call [ipc]",
        (FAMILY, RPC_SHM),
        (FAMILY, PLAN.format("ipc")),
        kind="unpaired",
        basis="rpc_sync over shm measured alone (it busy-polls a core), the plan call interleaved with others",
    )
