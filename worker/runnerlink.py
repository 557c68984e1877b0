"""The supervisor's end of the pipe to its runner: requests written without blocking, in flight in order.

Several requests may be in flight (``inflight``, in order; the runner answers each in turn, worker/pipe.py).
Nothing here ever blocks writing: the runner may itself be blocked writing answers the supervisor has to
read, so bytes the pipe does not take now wait here and go as the runner reads (``wait`` watches for room).
``hold``/``flush`` send a burst of requests in one write (the runner wakes once for all of them); a request
sent ``now`` goes at once, after what was held (requests always reach the runner in the order made). Before
sleeping on the pipe after a lone run (a tiny call), ``wait`` may watch it for a while (SPIN_MAX).
"""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from planwire.worker import pipe

# Before sleeping on the runner's pipe, the supervisor watches it for a while after sending a run alone
# (a tiny call): not sleeping saves a wake-up per call. For how long: twice the time the runner's recent
# answers to that plan took (a moving average), at most SPIN_MAX; and only while spinning pays (pipe.Spin:
# most spins catch the answer, and the supervisor gets the CPU it spins on, i.e. the host has a core to
# spare). Cost: at most SPIN_MAX of one core per call, only while calls come one at a time and answer
# within it.
SPIN_MAX = 300e-6


@dataclass
class Sent:
    """A request in flight to the runner: what it was, the handles its outputs will be held under, and the
    shared copies of its arguments (alive, files too, until it is answered)."""

    kind: str  # "load", "run" or "fetch"
    out: list[int] = field(default_factory=list)
    keep: list[np.ndarray] = field(default_factory=list)


class Untrusted(pipe.PipeClosed):
    """The runner broke the pipe's protocol (a malformed message, an answer to nothing): ``why`` it must be
    killed."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(detail)
        self.why = why


class RunnerLink:
    """The pipe to the current runner (``open`` per runner, ``close`` when it ends) and its requests."""

    def __init__(self) -> None:
        self.inflight: deque[Sent] = deque()  # requests sent and not answered yet, in order
        self.answered: Sent | None = None  # the request the last answer received was for
        self.sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self._reader: pipe.Reader | None = None
        self._batch: list | None = None  # packed requests held back by ``hold`` until ``flush``
        self._out: deque[memoryview] = deque()  # bytes of requests not yet taken by the pipe
        self._writing = False  # the poll also watches for room in the pipe (POLLOUT)
        self._sent_at = 0.0  # perf_counter when the request in flight alone was sent (0: none such)
        self._sent_plan = ""
        self._answer_s: dict[str, float] = {}  # plan: moving average of the runner's answer time to it alone
        self._spin = pipe.Spin()

    def open(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = pipe.replies(sock)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def close(self) -> None:
        """The runner is gone: what was in flight or waiting to be written is dropped."""
        self.inflight.clear()
        self._batch = None
        self._out.clear()
        self._writing = False
        self._sent_at = 0.0
        self.answered = None
        if self.sock is not None:
            self.sock.close()
        self.sock, self._poll, self._reader = None, None, None

    def forget(self, plan: str) -> None:
        self._answer_s.pop(plan, None)

    # -- writing ------------------------------------------------------------------------------------

    def request(self, sent: Sent, msg: pipe.ToRunner, buffers: list, *, plan: str = "", now: bool = False) -> None:
        """Send ``msg`` (held back until ``flush`` after a ``hold``, unless ``now``), in flight as ``sent``.
        ``now`` sends what ``hold`` kept first (the runner answers in the order it reads, and answers are
        matched to ``inflight`` in order), then keeps holding what comes after.
        ``plan``: a run's, whose answer time is measured when it goes alone. OSError when the runner is gone."""
        if plan:
            self._sent_at = time.perf_counter() if not self.inflight else 0.0
            self._sent_plan = plan
        self.inflight.append(sent)
        parts = pipe.pack(msg, buffers)  # type: ignore[arg-type]
        if self._batch is None:
            self._write(parts)
        elif now:
            batch, self._batch = self._batch, []
            self._write(batch + parts)
        else:
            self._batch += parts

    def _write(self, parts: list) -> None:
        """Queue ``parts`` after what waits to be written and write what the pipe takes now, without blocking
        (the rest goes as the runner reads: ``wait`` watches for room). OSError when the runner is gone."""
        self._out.extend(v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes)
        self._push()

    def _push(self) -> None:
        out, sock = self._out, self.sock
        while out and sock is not None:
            try:
                sent = sock.sendmsg(list(itertools.islice(out, pipe.MAX_PARTS)), (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            while sent:
                n = out[0].nbytes
                if sent < n:
                    out[0] = out[0][sent:]
                    break
                out.popleft()
                sent -= n
        writing = bool(out)
        if writing != self._writing and self._poll is not None and sock is not None:
            self._poll.modify(sock.fileno(), select.POLLIN | select.POLLOUT if writing else select.POLLIN)
            self._writing = writing

    def hold(self) -> None:
        """Keep the requests sent from now on until ``flush``: the runner wakes once for all of them."""
        if self._batch is None:
            self._batch = []

    def flush(self) -> None:
        """Send what ``hold`` kept; OSError when the runner is gone (its closed pipe says how)."""
        batch, self._batch = self._batch, None
        if batch and self.sock is not None:
            self._write(batch)

    # -- reading ------------------------------------------------------------------------------------

    def wait(self, seconds: float, also: int | None = None) -> bool:
        """Whether the runner has something to say (an answer, or its closed pipe) within ``seconds``. With
        ``also`` (a file descriptor: the ZeroMQ socket's), the wait ends early, returning False, when that
        descriptor becomes readable too, so a loop that waits on the runner sleeps until either side speaks."""
        if self._poll is None:
            return False
        if self._reader is not None and self._reader.pending():
            return True
        poll = self._poll.poll
        if seconds and self._sent_at and len(self.inflight) == 1 and not self._out:
            spin = self._answer_s.get(self._sent_plan, SPIN_MAX) * 2
            if spin <= SPIN_MAX and self._spin.allowed() and self._spin.until(lambda: poll(0), self._sent_at + spin):
                return True
        if also is not None:
            self._poll.register(also, select.POLLIN)
        try:
            return self._wait(poll, time.monotonic() + seconds, also)
        finally:
            if also is not None:
                self._poll.unregister(also)

    def _wait(self, poll: Callable[[int], list[tuple[int, int]]], end: float, also: int | None) -> bool:
        while True:
            events = poll(max(0, int((end - time.monotonic()) * 1e3)))
            if any(fd != also and ev & ~select.POLLOUT for fd, ev in events):
                return True  # an answer, or the pipe closed
            if not events or any(fd == also for fd, _ in events):
                return False
            try:  # room in the pipe: more of the requests waiting to be written
                self._push()
            except OSError:
                return True  # the runner is gone: its closed pipe says how

    def receive(self) -> tuple[pipe.FromRunner, list[memoryview]]:
        """The runner's next message; PipeClosed when it died, Untrusted when it must be killed. An answer is
        to the oldest request in flight, which becomes ``answered``."""
        try:
            msg, buffers = self._reader.read()  # type: ignore[union-attr]
        except (ConnectionError, OSError) as e:
            raise pipe.PipeClosed(str(e)) from None
        except Exception as e:  # a malformed message: the runner is not to be trusted any more
            raise Untrusted(f"the runner sent a malformed message ({type(e).__name__})", str(e)) from None
        if not isinstance(msg, pipe.Ready):
            if not self.inflight:
                raise Untrusted("the runner answered a request it was not sent", "unexpected answer")
            self.answered = self.inflight.popleft()
            if self._sent_at:  # a lone run's answer time, for the next spin
                took, was = time.perf_counter() - self._sent_at, self._answer_s.get(self._sent_plan)
                self._answer_s[self._sent_plan] = took if was is None else was + (took - was) / 4
                self._sent_at = 0.0
        return msg, buffers
