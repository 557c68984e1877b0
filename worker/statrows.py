"""The rows worker/stats.py keeps: per connection, per owner, per plan, and the recent run durations."""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field


@dataclass
class ClientStats:
    """One connection's row (kept while recent, then folded into its owner's)."""

    owner: str = ""  # the owner it last acted for
    requests: int = 0
    refused: int = 0
    name: str = ""  # what its hello said
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    held: set[tuple[str, str]] = field(default_factory=set)  # (owner, key) of the tensors it stored


@dataclass
class OwnerStats:
    name: str = ""  # what its last hello said
    last_seen: float = field(default_factory=time.time)
    connections: dict[str, None] = field(default_factory=dict)  # the latest CONNECTIONS_SHOWN, oldest first
    requests: int = 0  # over all its connections, folded ones included
    refused: int = 0
    folded: int = 0  # connections whose rows were folded into this one


@dataclass
class PlanStats:
    name: str
    nbytes: int
    clients: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    runs: int = 0
    failed: int = 0


class Recent:
    """The last ``size`` values (run durations) in one fixed array of doubles.

    Not a deque of floats: one float object per run, kept until 10,000 later runs push it out, spreads
    over every allocator arena a burst of requests used, and each such float keeps its arena (1 MiB)
    from going back to the system: 16 clients x 1,000 calls left ~20 MB pinned that way (bench/load.py).
    """

    def __init__(self, size: int) -> None:
        self._values = array("d", bytes(8 * size))
        self._count = 0

    def append(self, value: float) -> None:
        self._values[self._count % len(self._values)] = value
        self._count += 1

    def extend(self, values: list[float]) -> None:
        """``append`` each of ``values``, in order."""
        kept, count = self._values, self._count
        size = len(kept)
        for v in values:
            kept[count % size] = v
            count += 1
        self._count = count

    def __len__(self) -> int:
        return min(self._count, len(self._values))

    def sorted(self) -> list[float]:
        """The values kept, in ascending order."""
        return sorted(self._values[: len(self)])
