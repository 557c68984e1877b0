"""Cancel: a client's ``cancel`` of one of its runs, queued, in the window or executing (a mixin of
worker/window.py's Window).

A queued run is dropped (its outputs marked failed); one in the window not sent yet is answered and
removed; one sent is answered at once and its answer thrown away when it comes; the one executing stops
the runner, and the runs behind it go to a fresh one. The ``ok`` of the cancel follows the run's error.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.server import Server
from planwire.worker.jobs import Origin, RunJob
from planwire.worker.sandbox import Sandbox
from planwire.worker.service import Service


class Cancels:
    """The window's cancels."""

    service: Service
    server: Server
    sandbox: Sandbox
    queue: deque[Any]
    window: deque[Any]

    def _finish(self, outcome: Any, then: list | None = None) -> None:  # the window's
        raise NotImplementedError

    def _restart(self) -> None:  # the window's
        raise NotImplementedError

    def _flush(self) -> None:  # the window's
        raise NotImplementedError

    def _cancel(self, peer: bytes, client: bytes, frames: list, msg: m.Cancel) -> None:
        service, send = self.service, self.server.send
        origin = Origin(frames, client)
        ok = service.reply(origin, msg, m.Ok(re=msg.id, session=service.session))
        for i, q in enumerate(self.queue):
            if q.peer == peer and isinstance(q.msg, m.Run) and q.msg.id == msg.run:
                del self.queue[i]
                why = ProtocolError("cancelled", f"run #{q.msg.id} was cancelled (request #{msg.id}) before it started")
                send(peer, service.drop(q.msg, why, q.frames, q.client))
                send(peer, ok)
                return
        for i, slot in enumerate(self.window):
            job = slot.job
            if slot.cancelled or slot.peer != peer or not isinstance(job, RunJob) or job.msg.id != msg.run:
                continue
            words = f"run #{msg.run} of plan {job.plan.name!r} was cancelled (request #{msg.id})"
            why = ProtocolError("cancelled", words)
            if i == 0 and slot.sent:  # executing (or next to): stop the runner; the runs behind go to a fresh one
                self.sandbox.stop("cancelled")
                self._finish(why, then=ok)
                self._restart()
                return
            send(peer, service.complete(job, why))
            send(peer, ok)
            if slot.sent:  # in the runner's pipe: its answer is thrown away (and the runner stopped if it is slow)
                slot.cancelled = True
            else:
                del self.window[i]
                self._flush()
            return
        error = ProtocolError(
            "bad_argument", f"cancel: no run #{msg.run} of this connection is queued or running (finished?)"
        )
        send(peer, service.refuse(msg.id, error, origin, msg))
