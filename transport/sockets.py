"""ZeroMQ sockets for clients and servers: hygiene (see shared NOTES: HWMs, linger, mandatory), I/O thread
scheduling, and moving one multipart message in or out with as little Python per frame as possible."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence

import zmq
import zmq.backend

from planwire.transport.framing import Frame

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


# -- moving frames ----------------------------------------------------------------------------------
# pyzmq's send_multipart/recv_multipart wrap each frame in several layers of Python (type checks, keyword
# plumbing, a getsockopt(RCVMORE) per frame): about 7 us per small message each way, a fifth of a tiny
# plan call's own CPU. With the Cython backend its methods are called directly; they still copy frames
# under ``copy_threshold`` and send larger ones zero-copy. Flags are plain ints: pyzmq's constants are
# enum members, and each ``|`` on one costs about 1-2 us of Python.
_CYTHON = zmq.backend.Socket.__module__.startswith("zmq.backend.cython")
_send, _recv = zmq.backend.Socket.send, zmq.backend.Socket.recv
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
COPY_BELOW = 4096  # frames under this many bytes are copied into a fresh zmq message (cheaper than lending
# the buffer: no Frame object, no free callback); pyzmq's copy_threshold (64 KiB) applies above


def send_frames(sock: zmq.Socket, frames: Sequence[Frame], flags: int = 0) -> None:
    """Send ``frames`` as one multipart message (buffers at or over copy_threshold without a copy)."""
    if not _CYTHON:
        sock.send_multipart(frames, flags, copy=False)
        return
    flags = int(flags)
    more = flags | SNDMORE
    for f in frames[:-1]:
        _send(sock, f, more, len(f) < COPY_BELOW)
    f = frames[-1]
    _send(sock, f, flags, len(f) < COPY_BELOW)


def send_routed(sock: zmq.Socket, peer: Frame, frames: Sequence[Frame], flags: int = 0) -> None:
    """send_frames of ``[peer, *frames]`` (a ROUTER's reply: the routing id, then the message) without making
    that list. ``flags`` a plain int."""
    if not _CYTHON:
        sock.send_multipart([peer, *frames], flags, copy=False)
        return
    more = flags | SNDMORE
    _send(sock, peer, more, True)
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _send(sock, f, more if i < last else flags, len(f) < COPY_BELOW)


def recv_routed(sock: zmq.Socket, flags: int = 0) -> tuple[bytes, list[memoryview]]:
    """recv_frames on a ROUTER: ``(routing id, the message's frames)``. The routing id comes as bytes (a copy:
    about a third of the cost of a frame object and its view; ZeroMQ always sends the message after it)."""
    if not _CYTHON:
        peer, *frames = recv_frames(sock, flags)
        return bytes(peer), frames
    peer = _recv(sock, flags, True)
    frame = _recv(sock, flags, False)
    out = [frame.buffer]
    while frame.more:
        frame = _recv(sock, flags, False)
        out.append(frame.buffer)
    return peer, out


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[memoryview]:
    """The next multipart message, each frame a zero-copy view; zmq.Again under NOBLOCK when none is there."""
    if not _CYTHON:
        return [f.buffer for f in sock.recv_multipart(flags, copy=False)]
    frame = _recv(sock, flags, False)
    out = [frame.buffer]
    while frame.more:
        frame = _recv(sock, flags, False)
        out.append(frame.buffer)
    return out


def recv_small_copied(sock: zmq.Socket, flags: int = 0) -> list[bytearray | memoryview]:
    """As recv_frames, but each frame under COPY_BELOW bytes comes as its own bytearray (a copy: writable, and
    nothing the garbage collector tracks, where a view keeps a zmq Frame, a buffer and the view alive). A
    client holding thousands of unread replies (pipelined calls) then leaves little for every collection to
    walk. Larger frames stay zero-copy views."""
    if not _CYTHON:
        parts = sock.recv_multipart(flags, copy=False)
        return [bytearray(f.buffer) if len(f) < COPY_BELOW else f.buffer for f in parts]
    frame = _recv(sock, flags, False)
    out = [bytearray(frame) if len(frame) < COPY_BELOW else frame.buffer]
    while frame.more:
        frame = _recv(sock, flags, False)
        out.append(bytearray(frame) if len(frame) < COPY_BELOW else frame.buffer)
    return out
