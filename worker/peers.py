"""Naming the peers of a worker in its logs and stats: who sent a request (its CURVE key or its connection),
and a peer's text made safe for one log line."""

from __future__ import annotations

from collections.abc import Sequence

import zmq

from planwire.transport.errors import printable

IN_PROCESS = "in-process"


def clean(text: str, limit: int = 2000) -> str:
    """``text`` safe for one log line: control characters (newlines included) escaped, so a peer's string
    cannot forge a line, and length capped."""
    text = printable(text)
    return text if len(text) <= limit else text[:limit] + "..."


def peer_of(frames: Sequence[object], curve: bool = False) -> str:
    """Who sent ``frames``: ``curve:KEY`` (z85 public key) under CURVE, else ``ADDRESS/fdN`` of the
    connection (ipc addresses carry the peer's uid:gid:pid), or ``in-process``."""
    frame = getattr(frames[0], "obj", None) if frames else None
    if not isinstance(frame, zmq.Frame):
        return IN_PROCESS
    if curve:
        try:
            return f"curve:{frame.get('User-Id')}"
        except zmq.ZMQError:
            pass
    try:
        return f"{frame.get('Peer-Address')}/fd{frame.get(zmq.SRCFD)}"
    except zmq.ZMQError:
        return f"fd{frame.get(zmq.SRCFD)}"


class PeerNames:
    """``peer_of`` once per connection: the label of a routing id ZeroMQ generated (its first byte is 0;
    a peer may not choose such an id, and ZeroMQ never reuses one while the socket lives) is kept, so a
    request costs a dict lookup rather than two zmq property reads. Ids a peer chose (a later connection
    may reuse one) and CURVE connections are read every time."""

    MAX = 4096  # labels kept at most (past it, the cache starts over)

    def __init__(self, curve: bool = False) -> None:
        self.curve = curve
        self._names: dict[bytes, str] = {}

    def __call__(self, frames: Sequence[object], conn: bytes = b"") -> str:
        name = self._names.get(conn)
        if name is not None:
            return name
        name = peer_of(frames, self.curve)
        if conn[:1] == b"\x00" and not self.curve and name != IN_PROCESS:
            if len(self._names) >= self.MAX:
                self._names.clear()
            self._names[conn] = name
        return name
