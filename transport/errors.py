"""Exceptions of the protocol, each carrying the wire error code it maps to, and :func:`printable`, the one
way a peer's text (names, messages) is made safe to show in them and in logs."""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every non-printable character (newlines, escapes, U+2028 ...) written as its Python
    escape, so a peer's string can neither forge a log line nor hide in a message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class ProtocolError(Exception):
    """A message or request the worker refuses; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(RuntimeError):
    """A worker answered a request with an error reply."""

    def __init__(self, worker: str, code: str, message: str) -> None:
        super().__init__(f"worker {worker!r}: {message} [{code}]")
        self.worker = worker
        self.code = code
        self.message = message


class UnknownTensorError(RemoteError, KeyError):
    """The worker has no tensor under that key (already fetched, deleted, or never stored)."""

    __str__ = RuntimeError.__str__


class ForbiddenError(RemoteError, PermissionError):
    """The worker refuses: its own data may not leave it or be deleted."""


class PrivateDataError(RemoteError, PermissionError):
    """The worker refuses to send a result computed from its private data (no release rule allows it)."""


class RemoteTimeoutError(TimeoutError):
    """A worker did not answer in time."""


def remote_error(worker: str, code: str, message: str) -> RemoteError:
    """The most specific exception class for a wire error code."""
    cls = {
        "unknown_tensor": UnknownTensorError,
        "forbidden": ForbiddenError,
        "private_data": PrivateDataError,
    }.get(code, RemoteError)
    return cls(worker, code, message)


class WorkerLost(RemoteError, ConnectionError):
    """The connection to a worker dropped, or the worker restarted, while requests were outstanding.

    Every request in flight at that moment fails with this at once (their replies can never come): the
    worker's tensors and plans may be gone with it, and nothing queued meanwhile is replayed to a new one.
    """

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(worker, "worker_lost", message)


class NoWorkerListening(RemoteError, ConnectionRefusedError):
    """Nobody accepts connections at the address: no plan-worker runs there, or the port or path is wrong."""

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(worker, "no_listener", message)


class CurveRefused(RemoteError, PermissionError):
    """The worker refused the CURVE handshake: this client's key is not admitted, or the keys do not match."""

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(worker, "curve_refused", message)


class NothingFound(IndexError):
    """Indexing the empty result of ``search(...)``: no tensor on that worker carries those tags."""
