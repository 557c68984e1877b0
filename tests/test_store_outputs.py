"""Store.put_outputs (a run's outputs stored in one pass) leaves the store exactly as put, key by key, does."""

from __future__ import annotations

import numpy as np
import pytest

from planwire.worker.store import Store


def state(store: Store) -> tuple:
    spaces = {
        c: {k: (e.array.tobytes(), e.private, e.pending, e.rows, e.tags) for k, e in s.items()}
        for c, s in store._spaces.items()
    }
    return store.bytes, dict(store._by_client), spaces, {c: dict(f) for c, f in store._failed.items()}


@pytest.mark.parametrize("sizes", [(3, 5, 0), (0, 0), (4,), (2, 7, 1, 9)])
def test_put_outputs_is_put_key_by_key(sizes: tuple) -> None:
    stores = Store(), Store()
    for s in stores:  # what the client held: some outputs replace tensors, one failed before, another client
        s.put(b"a", "k0", np.ones(6, np.float32))
        s.put(b"a", "other", np.ones(2, np.float32))
        s.put(b"b", "k0", np.ones(1, np.float32))
        s.fail(b"a", "k1", "run #1 failed")
    keys = [f"k{i}" for i in range(len(sizes))]
    arrays = [np.full(n, i, np.float32) for i, n in enumerate(sizes)]
    private, pending = {1}, {1: "release"}
    for i, (key, arr) in enumerate(zip(keys, arrays, strict=True)):
        stores[0].put(b"a", key, arr, private=i in private, pending=pending.get(i), rows=3)
    stores[1].put_outputs(b"a", keys, arrays, private, pending, 3)
    assert state(stores[0]) == state(stores[1])
    for key, arr in zip(keys, arrays, strict=True):  # a fresh client's first outputs
        stores[0].put(b"c", key, arr)
    stores[1].put_outputs(b"c", keys, arrays)
    assert state(stores[0]) == state(stores[1])
