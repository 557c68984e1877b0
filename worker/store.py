"""Store: the worker's tensors by key, with tags, ownership and remembered failures.

Data a worker was given at start is *private*: plans may read it, clients may never delete it, and it
leaves the worker only as a copy when the worker was started public.

Quotas: the bytes of clients' tensors are counted in total and per client (the client that last wrote a
key owns it), so a put or run that would pass ``--max-store-mb`` or ``--max-client-store-mb`` is refused
whole (``quota_exceeded``) before anything changes. The worker's own data is not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from planwire.transport.errors import ProtocolError

MB = 1 << 20
ClientId = bytes
"""Who sent a request: its ZeroMQ routing id, or its CURVE public key (User-Id) when CURVE is on."""


@dataclass
class Entry:
    array: np.ndarray
    tags: tuple[str, ...] = ()
    private: bool = False
    owner: ClientId = b""


class Store:
    """Tensors by key. Every method validates before it mutates, so a refused request loses nothing."""

    def __init__(
        self, *, public: bool = False, max_bytes: int | None = None, max_client_bytes: int | None = None
    ) -> None:
        self.public = public
        self.max_bytes = max_bytes
        self.max_client_bytes = max_client_bytes
        self.bytes = 0  # clients' tensors, all together
        self._by_client: dict[ClientId, int] = {}
        self._tensors: dict[str, Entry] = {}
        self._failed: dict[str, str] = {}  # output key -> why the run that should have made it failed

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def check_writable(self, keys: Iterable[str]) -> None:
        """Refuse to overwrite the worker's own data."""
        for key in keys:
            entry = self._tensors.get(key)
            if entry is not None and entry.private:
                raise ProtocolError("forbidden", f"tensor {key!r} is this worker's own data and cannot be overwritten")

    def client_bytes(self, client: ClientId) -> int:
        """Bytes of the tensors ``client`` wrote last."""
        return self._by_client.get(client, 0)

    def check_quota(self, client: ClientId, sizes: Iterable[tuple[str, int]], what: str) -> None:
        """quota_exceeded unless storing ``(key, nbytes)`` items for ``client`` keeps both caps (a key
        listed twice counts once, with its last size; what a key held before is given back)."""
        if self.max_bytes is None and self.max_client_bytes is None:
            return
        new = dict(sizes)
        total = mine = sum(new.values())
        for key in new:
            old = self._tensors.get(key)
            if old is not None and not old.private:
                n = old.array.nbytes
                total -= n
                if old.owner == client:
                    mine -= n
        if self.max_bytes is not None and self.bytes + total > self.max_bytes:
            raise ProtocolError(
                "quota_exceeded",
                f"{what} needs {_mb(total)} more, but the worker's store holds {_mb(self.bytes)} of its limit of "
                f"{_mb(self.max_bytes)}: get or delete tensors first, or start plan-worker with a larger "
                "--max-store-mb",
            )
        held = self._by_client.get(client, 0)
        if self.max_client_bytes is not None and held + mine > self.max_client_bytes:
            raise ProtocolError(
                "quota_exceeded",
                f"{what} needs {_mb(mine)} more, but this client's tensors take {_mb(held)} of its limit of "
                f"{_mb(self.max_client_bytes)}: get or delete tensors first, or start plan-worker with a larger "
                "--max-client-store-mb",
            )

    def put(
        self, key: str, array: np.ndarray, tags: Iterable[str] = (), *, private: bool = False, owner: ClientId = b""
    ) -> None:
        self._pop(key)
        self._tensors[key] = Entry(array, tuple(tags), private, owner)
        if not private:
            n = array.nbytes
            self.bytes += n
            self._by_client[owner] = self._by_client.get(owner, 0) + n
        self._failed.pop(key, None)

    def _pop(self, key: str) -> Entry | None:
        """Remove ``key`` and give its bytes back to its owner's count."""
        entry = self._tensors.pop(key, None)
        if entry is not None and not entry.private:
            n = entry.array.nbytes
            self.bytes -= n
            left = self._by_client[entry.owner] - n
            if left:
                self._by_client[entry.owner] = left
            else:
                del self._by_client[entry.owner]
        return entry

    def fail(self, key: str, why: str) -> None:
        """Remember that ``key`` will not come: a later read reports why."""
        self._pop(key)
        self._failed[key] = why

    def entry(self, key: str) -> Entry:
        entry = self._tensors.get(key)
        if entry is not None:
            return entry
        if key in self._failed:
            raise ProtocolError("run_failed", self._failed[key])
        raise ProtocolError(
            "unknown_tensor",
            f"no tensor {key!r} on this worker (never stored, deleted, or already moved by get)",
        )

    def check_readable(self, keys: Iterable[str]) -> list[Entry]:
        """Entries whose bytes may be sent to a client, in order."""
        entries = [self.entry(k) for k in keys]
        for key, entry in zip(keys, entries, strict=True):
            if entry.private and not self.public:
                raise ProtocolError(
                    "forbidden",
                    f"tensor {key!r} is this worker's own data: it may be used by plans but never leaves the worker",
                )
        return entries

    def take(self, keys: list[str], keep: bool) -> list[np.ndarray]:
        """Arrays for a get; moved out unless ``keep`` (private data is copied, never removed)."""
        entries = self.check_readable(keys)
        if not keep:
            for key, entry in zip(keys, entries, strict=True):
                if not entry.private:
                    self._pop(key)  # a key may be listed twice
        return [e.array for e in entries]

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for key in keys:
            entry = self._tensors.get(key)
            if entry is not None and entry.private:
                raise ProtocolError("forbidden", f"tensor {key!r} is this worker's own data and cannot be deleted")
        for key in keys:
            self._pop(key)
            self._failed.pop(key, None)

    def search(self, tags: Iterable[str]) -> list[tuple[str, Entry]]:
        wanted = set(tags)
        return [(k, e) for k, e in self._tensors.items() if wanted.issubset(e.tags)]


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MiB" if n < 10 * MB else f"{n // MB} MiB"
