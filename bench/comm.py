"""Communication: a plan of N elementwise ops as one call vs the same ops executed remotely one by one.

The times are measured; the comparison of one call against N round trips is about N times one round trip
*by construction*, so those ratios are labelled ``by construction`` and carry no target. planwire's message
counts are counted on its socket; torch.rpc's are ``derived`` (2 per rpc_sync, written down, not observed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bench import plans, rpcfns
from bench.env import Env
from bench.timing import Case, Report, interleaved

FAMILY = "communication"
SIZES = (1, 10, 100)


def count_messages(w: Any, fn: Callable[[], Any]) -> int:
    """Requests sent plus replies received by client ``w`` during one steady-state call of ``fn``."""
    fn()
    n = [0]
    send, recv = w._send, w._recv

    def counting_send(frames: Any) -> None:
        n[0] += 1
        send(frames)

    def counting_recv(timeout: Any) -> Any:
        frames = recv(timeout)
        n[0] += frames is not None
        return frames

    w._send, w._recv = counting_send, counting_recv
    try:
        fn()
    finally:
        del w._send, w._recv
    return n[0]


def run(env: Env, report: Report, quick: bool) -> None:
    import torch
    import torch.distributed.rpc as rpc

    w = env.worker("tcp")
    peer = env.rpc()
    x = torch.randn(plans.SHAPE)
    xp = w.put(x)
    singles = {op: w.plan_pointer(plans.single(op)) for op in plans.OPS}
    for n in SIZES:
        ops = [plans.OPS[i % len(plans.OPS)] for i in range(n)]
        chain = w.plan_pointer(plans.chain(n))
        seq = [singles[op] for op in ops]

        def one_call(chain: Any = chain) -> Any:
            return chain(xp).get()

        def op_by_op(seq: list = seq) -> Any:
            y = xp
            for p in seq:
                y = p(y)
            return y.get()

        def rpc_ops(ops: list = ops) -> Any:
            y = x
            for op in ops:
                y = rpc.rpc_sync(peer, rpcfns.op, args=(op, y))
            return y

        def rpc_rrefs(ops: list = ops) -> Any:
            ref = rpc.remote(peer, rpcfns.hold, args=(x,))
            for op in ops:
                ref = rpc.remote(peer, rpcfns.op_rref, args=(op, ref))
            return ref.to_here()

        expected = plans.chain_torch(x, n)
        for fn in (one_call, op_by_op, rpc_ops, rpc_rrefs):
            assert torch.allclose(torch.as_tensor(np.asarray(fn())), expected, atol=1e-5), fn.__name__
        slow = max(1, 20 // n)
        cases = [
            Case(f"N={n}: plan, one call [tcp]", one_call, 20 if quick else 100),
            Case(f"N={n}: planwire op by op, one plan per op [tcp]", op_by_op, max(2, 200 // n)),
            Case(f"N={n}: torch.rpc rpc_sync op by op [tcp]", rpc_ops, slow, warmup=2),
            Case(f"N={n}: torch.rpc remote refs op by op [tcp]", rpc_rrefs, slow, warmup=2),
        ]
        # The ratios of N=100 are by construction (no target): each case's median within +-5% is the rule.
        samples = interleaved(cases, rounds=3 if quick else 8, budget_s=5 if quick else 8, min_rounds=3)
        for c in cases:
            report.time(FAMILY, c.name, samples[c.name], "ms")
        report.count(FAMILY, f"N={n}: messages, plan one call", count_messages(w, one_call), "msgs")
        report.count(FAMILY, f"N={n}: messages, planwire op by op", count_messages(w, op_by_op), "msgs")
        report.count(FAMILY, f"N={n}: messages, torch.rpc rpc_sync op by op", 2 * n, "msgs", kind="derived")
        report.count(FAMILY, f"N={n}: messages, torch.rpc remote refs op by op", 2 * (n + 2), "msgs", kind="derived")
    report.note(
        FAMILY,
        "messages = requests + replies; planwire counted on the socket (steady state, incl. "
        "deferred deletes of freed intermediates); torch.rpc = 2 per call (RRef bookkeeping "
        "messages not counted, so a lower bound)",
    )
    n = SIZES[-1]
    for what, slow in (
        ("torch.rpc rpc_sync", f"N={n}: torch.rpc rpc_sync op by op [tcp]"),
        ("torch.rpc remote refs", f"N={n}: torch.rpc remote refs op by op [tcp]"),
        ("planwire", f"N={n}: planwire op by op, one plan per op [tcp]"),
    ):
        report.ratio(
            f"{n}-op plan vs op by op, {what}",
            (FAMILY, slow),
            (FAMILY, f"N={n}: plan, one call [tcp]"),
            kind="by construction",
            basis=f"{n} round trips against 1: about {n}x the ratio of one round trip",
        )
