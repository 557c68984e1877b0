"""ZeroMQ socket hygiene shared by clients and servers (see shared NOTES: HWMs, linger, mandatory)."""

from __future__ import annotations

import functools
import os
import threading

import zmq

HWM = 10_000  # messages, not bytes: bounds memory per peer together with MAXMSGSIZE
LINGER_MS = 200
IO_SCHED_ENV = "PLANWIRE_IO_SCHED"  # "batch" (default) or "default": scheduling of ZeroMQ's I/O threads


def configure(sock: zmq.Socket, *, max_message_bytes: int | None = None) -> None:
    """Bounded queues and a finite linger; on ROUTER, unroutable replies raise instead of vanishing."""
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if sock.type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)


def tune_io_threads(ctx: zmq.Context) -> bool:
    """Run ``ctx``'s I/O threads under SCHED_BATCH (Linux; before the context's first socket, else no-op).

    Each message wakes the sender's I/O thread; under the default policy that wake-up preempts the sending
    thread, so a call that sends two messages (run, then get) is cut in two and each half pays its own
    round of wake-ups. A SCHED_BATCH thread keeps its fair share of CPU but does not preempt on wake-up.
    Measured on a 2-core host: a tiny plan call about 25% faster, pipelined calls about 30% more per second.
    ``PLANWIRE_IO_SCHED=default`` turns it off. Returns whether the policy was set.
    """
    if os.environ.get(IO_SCHED_ENV, "batch") != "batch" or not _batch_allowed():
        return False
    try:  # policy only: setting ZMQ_THREAD_PRIORITY too makes libzmq call nice(-20), fatal when unprivileged
        ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    except (AttributeError, zmq.ZMQError):  # libzmq without thread scheduling options
        return False
    return True


@functools.cache
def _batch_allowed() -> bool:
    """Whether this process may put a thread under SCHED_BATCH: libzmq aborts if it may not, so try first
    on a throwaway thread."""
    if not hasattr(os, "SCHED_BATCH") or not hasattr(zmq, "THREAD_SCHED_POLICY"):
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, name="planwire-sched-probe", daemon=True)
    t.start()
    t.join()
    return bool(ok and ok[0])
