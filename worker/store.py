"""Store: the worker's tensors by owner and key, with tags, privacy and remembered failures.

Every client has a key space of its own: it sees, reads, overwrites, moves and deletes only its own
tensors, and another client's key reads exactly like a missing one. Beside them sits the worker's own
data (``--data``), visible to every client and marked as the worker's: plans may read it, no client may
overwrite or delete it, and a client's key may not shadow it.

*Private* tensors never leave the worker: its own data (unless it was started public) and every result
derived from private data (worker/flow.py decides which). They can be described and used by later runs.

Quotas: the bytes of clients' tensors are counted in total and per client, so a put or run that would
pass ``--max-store-mb`` or ``--max-client-store-mb`` is refused whole (``quota_exceeded``) before anything
changes. The worker's own data is not counted.

Observer: ``store.observer`` (worker/state.py's, with ``--state-dir``) is told of every change to
clients' tensors. Its ``check`` and ``put``/``failed`` hooks run before the change and may refuse it by
raising (nothing changes then); ``removed`` and ``dropped`` run after.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from planwire.transport.errors import ProtocolError
from planwire.worker.resident import hosts

MB = 1 << 20
_bytes, _entry_bytes = operator.attrgetter("nbytes"), operator.attrgetter("array.nbytes")
ClientId = bytes
"""Who owns an object: the CURVE public key of the client when CURVE is on, else the identity the
worker issued at hello (or, before any hello, the connection's routing id); see worker/owners.py."""


@dataclass
class Entry:
    array: np.ndarray
    tags: tuple[str, ...] = ()
    private: bool = False
    """Never leaves the worker (its own non-public data, or derived from private data)."""
    worker: bool = False
    """The worker's own data (``--data``), not a client's."""
    pending: Any = None
    rows: int = 0
    """A private tensor's fewest rows of the worker's data it was computed from (its own: its leading axis)."""
    """A private result's release allowed by the data owner's policy (worker/release.py), if any."""


class StoreObserver(Protocol):
    """Told of every change to clients' tensors (the worker's own data is never observed)."""

    def check(self, client: ClientId, nbytes: int, what: str) -> None:
        """A put or run would store ``nbytes`` more for ``client`` (raise to refuse it)."""

    def put(self, client: ClientId, key: str, entry: Entry) -> None:
        """``entry`` is about to be stored as ``client``'s ``key`` (raise to refuse it)."""

    def failed(self, client: ClientId, key: str, why: str) -> None:
        """``client``'s ``key`` is about to be recorded as failed (raise to refuse it)."""

    def removed(self, client: ClientId, keys: list[str]) -> None:
        """``client`` no longer holds ``keys`` (moved by a get, or deleted)."""

    def dropped(self, client: ClientId) -> None:
        """Every tensor of ``client`` was freed."""


class Store:
    """Tensors by owner and key. Every method validates before it mutates, so a refused request loses nothing."""

    def __init__(
        self, *, public: bool = False, max_bytes: int | None = None, max_client_bytes: int | None = None
    ) -> None:
        self.public = public
        self.max_bytes = max_bytes
        self.max_client_bytes = max_client_bytes
        self.bytes = 0  # clients' tensors, all together
        self._by_client: dict[ClientId, int] = {}
        self._own: dict[str, Entry] = {}  # the worker's own data
        self._spaces: dict[ClientId, dict[str, Entry]] = {}
        self._failed: dict[ClientId, dict[str, str]] = {}  # output key -> why the run that made it failed
        self.observer: StoreObserver | None = None  # told of every change (worker/state.py: --state-dir)

    def __len__(self) -> int:
        return len(self._own) + sum(map(len, self._spaces.values()))

    def __contains__(self, key: str) -> bool:
        """Whether any client, or the worker, holds ``key`` (for reports and tests)."""
        return key in self._own or any(key in space for space in self._spaces.values())

    def put_own(self, key: str, array: np.ndarray, tags: Iterable[str] = ()) -> None:
        """One of the worker's own tensors (at start): private unless the worker is public."""
        rows = int(array.shape[0]) if array.ndim else 1
        self._own[key] = Entry(array, tuple(tags), private=not self.public, worker=True, rows=rows)

    def own(self) -> list[tuple[str, Entry]]:
        return list(self._own.items())

    def space(self, client: ClientId) -> dict[str, Entry]:
        """``client``'s tensors by key (read-only view for reports)."""
        return self._spaces.get(client, {})

    def clients(self) -> list[ClientId]:
        return list(self._spaces.keys() | self._failed.keys())

    def check_writable(self, client: ClientId, keys: Iterable[str]) -> None:
        """Refuse to overwrite the worker's own data (a client's key may not shadow it)."""
        for key in keys:
            if key in self._own:
                raise ProtocolError("forbidden", f"tensor {key!r} is this worker's own data and cannot be overwritten")

    def client_bytes(self, client: ClientId) -> int:
        """Bytes of ``client``'s tensors."""
        return self._by_client.get(client, 0)

    def check_quota(self, client: ClientId, sizes: Iterable[tuple[str, int]], what: str) -> None:
        """quota_exceeded unless storing ``(key, nbytes)`` items for ``client`` keeps both caps (a key
        listed twice counts once, with its last size; what a key held before is given back)."""
        new = dict(sizes)
        if (self.max_bytes is not None or self.max_client_bytes is not None) and not self.fits(
            client, sum(new.values())
        ):
            self._check_caps(client, new, what)
        if self.observer is not None:
            self.observer.check(client, sum(new.values()), what)

    def fits(self, client: ClientId, nbytes: int) -> bool:
        """True when ``nbytes`` more for ``client`` surely keep both caps (a key's old bytes not even given back):
        the tiny path (worker/tiny.py) then skips check_quota, and the text of its error, on every call."""
        if self.max_bytes is not None and self.bytes + nbytes > self.max_bytes:
            return False
        cap = self.max_client_bytes
        return cap is None or self._by_client.get(client, 0) + nbytes <= cap

    def _check_caps(self, client: ClientId, new: dict[str, int], what: str) -> None:
        mine = sum(new.values())
        space = self._spaces.get(client, {})
        for key in new:
            old = space.get(key)
            if old is not None:
                mine -= old.array.nbytes
        if self.max_bytes is not None and self.bytes + mine > self.max_bytes:
            raise ProtocolError(
                "quota_exceeded",
                f"{what} needs {_mb(mine)} more, but the worker's store holds {_mb(self.bytes)} of its limit of "
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
        self,
        client: ClientId,
        key: str,
        array: np.ndarray,
        tags: Iterable[str] = (),
        *,
        private: bool = False,
        pending: Any = None,
        rows: int = 0,
    ) -> None:
        """Store ``client``'s tensor (after check_writable and check_quota)."""
        entry = Entry(array, tuple(tags), private, pending=pending, rows=rows)
        if self.observer is not None:
            self.observer.put(client, key, entry)
        self._pop(client, key)
        space = self._spaces.get(client)
        if space is None:
            space = self._spaces[client] = {}
        space[key] = entry
        n = array.nbytes
        self.bytes += n
        self._by_client[client] = self._by_client.get(client, 0) + n
        failed = self._failed.get(client)
        if failed:
            failed.pop(key, None)

    def put_outputs(
        self,
        client: ClientId,
        keys: Sequence[str],
        arrays: Sequence[np.ndarray],
        private: Container[int] = (),
        pending: dict | None = None,
        rows: int = 0,
    ) -> None:
        """A run's outputs stored as ``client``'s ``keys`` (after check_writable and check_quota): the same as
        ``put(client, keys[i], arrays[i], private=i in private, pending=pending.get(i), rows=rows)`` for each
        in order, the store's counts updated once."""
        if self.observer is not None or not keys or len(keys) != len(arrays):  # each change observed (state.py)
            for i, (key, array) in enumerate(zip(keys, arrays, strict=True)):
                release = pending.get(i) if pending else None
                self.put(client, key, array, private=i in private, pending=release, rows=rows)
            return
        space = self._spaces.get(client)
        if space is None:
            space = self._spaces[client] = {}
        pop, freed, added = space.pop, 0, 0
        if not private and not pending and not rows:  # none private (a training step's): in bulk, C-level maps
            olds = list(filter(None, map(pop, keys, itertools.repeat(None))))  # (an Entry is true)
            freed, added = sum(map(_entry_bytes, olds)), sum(map(_bytes, arrays))
            space.update(zip(keys, map(Entry, arrays), strict=True))
            del olds  # the old values go now (a Resident frees its handle)
        else:
            for i, (key, array) in enumerate(zip(keys, arrays, strict=True)):
                old = pop(key, None)
                if old is not None:
                    freed += old.array.nbytes
                # positional (tags, private, worker, pending, rows): a dataclass's keywords cost ~200 ns more each
                space[key] = Entry(array, (), i in private, False, pending.get(i) if pending else None, rows)
                added += array.nbytes
        self.bytes += added - freed
        self._by_client[client] = self._by_client.get(client, 0) - freed + added
        failed = self._failed.get(client)
        if failed:
            for key in keys:
                failed.pop(key, None)

    def _pop(self, client: ClientId, key: str) -> Entry | None:
        """Remove ``client``'s ``key`` and give its bytes back."""
        space = self._spaces.get(client)
        entry = space.pop(key, None) if space else None
        if entry is not None:
            n = entry.array.nbytes
            self.bytes -= n
            left = self._by_client[client] - n
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]
            if not space:
                del self._spaces[client]
        return entry

    def fail(self, client: ClientId, key: str, why: str) -> None:
        """Remember that ``client``'s ``key`` will not come: a later read reports why."""
        if self.observer is not None:
            self.observer.failed(client, key, why)
        self._pop(client, key)
        self._failed.setdefault(client, {})[key] = why

    def find(self, client: ClientId, key: str) -> Entry | None:
        """``client``'s tensor or the worker's own one under ``key``, or None."""
        space = self._spaces.get(client)
        if space is not None:
            entry = space.get(key)
            if entry is not None:
                return entry
        return self._own.get(key)

    def found(self, client: ClientId, keys: Iterable[str]) -> list[Entry | None]:
        """``find`` of each of ``keys``, in one call (a step's ~90 state keys)."""
        space, own = self._spaces.get(client), self._own
        if not own:
            return list(map(space.get, keys)) if space is not None else [None for _ in keys]
        return [self.find(client, key) for key in keys]

    def entries(self, client: ClientId, keys: list[str], ahead: Mapping[str, Entry] | None = None) -> list[Entry]:
        """``entry`` of each of ``keys`` in one call (ProtocolError for the first that is not there); those in
        ``ahead`` read from there instead (a chained run's, worker/chain.py)."""
        space = self._spaces.get(client)
        if space is not None:
            got = list(map(ahead.get, keys, map(space.get, keys))) if ahead else list(map(space.get, keys))
            if all(got):  # (an Entry is true, a missing one None)
                return got  # type: ignore[return-value]
        return [ahead[key] if ahead and key in ahead else self.entry(client, key) for key in keys]

    def entry(self, client: ClientId, key: str) -> Entry:
        space = self._spaces.get(client)
        if space is not None:
            entry = space.get(key)
            if entry is not None:
                return entry
        entry = self._own.get(key)
        if entry is not None:
            return entry
        failed = self._failed.get(client)
        if failed and key in failed:
            raise ProtocolError("run_failed", failed[key])
        raise ProtocolError(
            "unknown_tensor",
            f"no tensor {key!r} on this worker (never stored, deleted, or already moved by get)",
        )

    def readable(
        self, client: ClientId, keys: list[str], release: Callable[[str, Entry], np.ndarray] | None = None
    ) -> tuple[list[Entry], list[np.ndarray]]:
        """Entries of ``keys`` and the host values that may be sent to ``client``: a private result only
        through ``release`` (the owner's policy), the worker's own private data never. Each key is looked up
        once, and the host copies of values the sandboxed runner holds are fetched in one request."""
        entries = [self.entry(client, k) for k in keys]
        arrays = hosts([e.array for e in entries])  # what the runner holds crosses to the host, in one request
        values = []
        for key, entry, array in zip(keys, entries, arrays, strict=True):
            if not entry.private:
                values.append(array)
            elif entry.worker:
                raise ProtocolError(
                    "forbidden",
                    f"tensor {key!r} is this worker's own data: it may be used by plans but never leaves the worker",
                )
            elif release is not None:
                values.append(release(key, entry))
            else:
                raise ProtocolError(
                    "private_data",
                    f"tensor {key!r} was computed from this worker's private data: it may be described and used by "
                    "later runs, but never leaves the worker (only a run of a plan the data owner approved in "
                    "plan-worker --policy releases results)",
                )
        return entries, values

    def take(
        self,
        client: ClientId,
        keys: list[str],
        keep: bool,
        release: Callable[[str, Entry], np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Values for a get; moved out unless ``keep`` (the worker's own data is copied, never removed)."""
        entries, values = self.readable(client, keys, release)
        if not keep:
            for key, entry in zip(keys, entries, strict=True):
                if not entry.worker:
                    self._pop(client, key)  # a key may be listed twice
            if self.observer is not None:
                space = self.space(client)
                self.observer.removed(client, [k for k in dict.fromkeys(keys) if k not in space])
        return values

    def delete(self, client: ClientId, keys: Iterable[str]) -> None:
        keys = list(keys)
        space = self._spaces.get(client, {})
        for key in keys:
            if key in self._own and key not in space:
                raise ProtocolError("forbidden", f"tensor {key!r} is this worker's own data and cannot be deleted")
        failed = self._failed.get(client)
        for key in keys:
            self._pop(client, key)
            if failed:
                failed.pop(key, None)
        if failed is not None and not failed:
            del self._failed[client]
        if self.observer is not None:
            self.observer.removed(client, list(dict.fromkeys(keys)))

    def search(self, client: ClientId, tags: Iterable[str]) -> list[tuple[str, Entry]]:
        """The worker's own tensors, then ``client``'s, that carry all ``tags``."""
        wanted = set(tags)
        out = [(k, e) for k, e in self._own.items() if wanted.issubset(e.tags)]
        out += [(k, e) for k, e in self._spaces.get(client, {}).items() if wanted.issubset(e.tags)]
        return out

    def drop_client(self, client: ClientId) -> tuple[int, int]:
        """Forget every tensor of ``client``; returns (tensors, bytes) freed."""
        space = self._spaces.get(client, {})
        n, nbytes = len(space), sum(e.array.nbytes for e in space.values())
        for key in list(space):
            self._pop(client, key)
        self._failed.pop(client, None)
        if self.observer is not None:
            self.observer.dropped(client)
        return n, nbytes


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MiB" if n < 10 * MB else f"{n // MB} MiB"
