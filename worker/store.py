"""Store: the worker's tensors by key, with tags, ownership and remembered failures.

Data a worker was given at start is *private*: plans may read it, clients may never delete it, and it
leaves the worker only as a copy when the worker was started public.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from planwire.transport.errors import ProtocolError


@dataclass
class Entry:
    array: np.ndarray
    tags: tuple[str, ...] = ()
    private: bool = False


class Store:
    """Tensors by key. Every method validates before it mutates, so a refused request loses nothing."""

    def __init__(self, *, public: bool = False) -> None:
        self.public = public
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

    def put(self, key: str, array: np.ndarray, tags: Iterable[str] = (), *, private: bool = False) -> None:
        self._tensors[key] = Entry(array, tuple(tags), private)
        self._failed.pop(key, None)

    def fail(self, key: str, why: str) -> None:
        """Remember that ``key`` will not come: a later read reports why."""
        self._tensors.pop(key, None)
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
                    self._tensors.pop(key, None)  # a key may be listed twice
        return [e.array for e in entries]

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for key in keys:
            entry = self._tensors.get(key)
            if entry is not None and entry.private:
                raise ProtocolError("forbidden", f"tensor {key!r} is this worker's own data and cannot be deleted")
        for key in keys:
            self._tensors.pop(key, None)
            self._failed.pop(key, None)

    def search(self, tags: Iterable[str]) -> list[tuple[str, Entry]]:
        wanted = set(tags)
        return [(k, e) for k, e in self._tensors.items() if wanted.issubset(e.tags)]
