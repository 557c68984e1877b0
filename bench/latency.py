"""Latency of one tiny call: plan run + get vs a raw pyzmq echo, torch.rpc, local onnxruntime, eager torch."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from bench import plans, rpcfns
from bench.env import Env
from bench.timing import Case, Report, interleaved

FAMILY = "latency"
PLAN = "plan call ptr(x).get() [{}]"
FETCH = "plan call with fetch in the run [{}]"
ONE = "one Run request with fetch, no pointers (1-message floor) [{}]"
ECHO = "raw pyzmq echo, same bytes [{}]"
ECHO2 = "raw pyzmq 2-message echo (floor of run + get) [{}]"
TUNED = " (I/O threads scheduled as planwire's)"
PLAN_DEFAULT_SCHED = "plan call ptr(x).get(), I/O threads at default scheduling [tcp]"
RPC = "torch.rpc rpc_sync [tcp]"
RPC_SHM = "torch.rpc rpc_sync [shm, isolated]"


def _planwire_cases(env: Env, transport: str, plan: plans.HandPlan, x: Any, per_round: int) -> list[Case]:
    w = env.worker(transport)
    ptr = w.plan_pointer(plan)
    variant = plan.variants[0]
    xp = w.put(x)
    expected = plans.tiny_torch(x).numpy()
    assert np.allclose(np.asarray(ptr(xp).get()), expected)
    payload = x.numpy().tobytes()
    from planwire.transport import messages as m

    def one_message() -> Any:  # what a call would cost if the protocol had a single-message run-and-return
        run = m.Run(id=0, plan=variant.id, args=[m.Arg(ref=xp.key)], outputs=["bench-one"], fetch=[0])
        reply, buffers = w.request(lambda rid: msgspec.structs.replace(run, id=rid))
        return w._decode(reply.tensors[0], buffers)

    assert np.allclose(one_message(), expected)
    cases = [
        Case(PLAN.format(transport), lambda: ptr(xp).get(), per_round),
        Case(FETCH.format(transport), lambda: w.run(variant, [xp], fetch=[0])[0].value, per_round),
        Case(ONE.format(transport), one_message, per_round),
    ]
    for tuned in (False, True):
        sock = env.echo(transport, tuned)

        def echo(sock: Any = sock) -> bytes:
            sock.send(payload)
            return sock.recv()

        def echo2(sock: Any = sock) -> bytes:  # what a plan call moves: two requests back to back, two replies
            sock.send(b"r")
            sock.send(payload)
            sock.recv()
            return sock.recv()

        assert echo() == payload
        assert echo2() == payload
        suffix = TUNED if tuned else ""
        cases += [
            Case(ECHO.format(transport) + suffix, echo, per_round),
            Case(ECHO2.format(transport) + suffix, echo2, per_round),
        ]
    return cases


def run(env: Env, report: Report, quick: bool) -> None:
    import onnxruntime as ort
    import torch
    import torch.distributed.rpc as rpc

    from planwire.worker.runtime import session_options

    plan = plans.tiny()
    x = torch.randn(plans.SHAPE)
    xn = x.numpy()
    per = 25 if quick else 50  # short blocks, many rounds: slow spells of a shared host hit every case alike
    cases = _planwire_cases(env, "tcp", plan, x, per) + _planwire_cases(env, "ipc", plan, x, per)
    plain = env.worker("tcp", io_sched="default")  # what planwire's SCHED_BATCH I/O threads change
    plain_ptr, plain_x = plain.plan_pointer(plan), plain.put(x)
    cases.append(Case(PLAN_DEFAULT_SCHED, lambda: plain_ptr(plain_x).get(), per))
    peer = env.rpc()
    assert torch.allclose(rpc.rpc_sync(peer, rpcfns.tiny, args=(x,)), plans.tiny_torch(x))
    cases.append(Case(RPC, lambda: rpc.rpc_sync(peer, rpcfns.tiny, args=(x,)), per // 4))
    sess = ort.InferenceSession(plan.variants[0].data, session_options(1), providers=["CPUExecutionProvider"])
    cases.append(Case("local onnxruntime InferenceSession.run", lambda: sess.run(None, {"x": xn}), per))
    cases.append(Case("eager torch", lambda: plans.tiny_torch(x), per))
    samples = interleaved(cases, rounds=8 if quick else 64, budget_s=20 if quick else 60)
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
    report.ratio(
        "tiny plan call, default vs SCHED_BATCH I/O threads [tcp]",
        (FAMILY, PLAN_DEFAULT_SCHED),
        (FAMILY, PLAN.format("tcp")),
    )
    for tr in ("tcp", "ipc"):  # no target: the floor a two-request call could reach
        report.ratio(
            f"tiny plan call vs raw 2-message echo [{tr}]", (FAMILY, PLAN.format(tr)), (FAMILY, ECHO2.format(tr))
        )
        report.ratio(
            f"tiny plan call vs raw echo, same I/O scheduling [{tr}]",
            (FAMILY, PLAN.format(tr)),
            (FAMILY, ECHO.format(tr) + TUNED),
        )
    report.ratio("rpc_sync vs tiny plan call [tcp]", (FAMILY, RPC), (FAMILY, PLAN.format("tcp")), ">=", 5)
    report.ratio(
        "rpc_sync (shm, isolated) vs tiny plan call [ipc]",
        (FAMILY, RPC_SHM),
        (FAMILY, PLAN.format("ipc")),
        ">=",
        5,
    )
