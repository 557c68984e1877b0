"""The data: scikit-learn's bundled digits (8x8 images, no download), split as examples/federated.py does.

Torch-free: the ClientApp imports this. Each node loads only its own partition (``partition-id`` of
``num-partitions`` in its node config; the simulation engine sets both).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from flwr.app import Context
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@lru_cache(maxsize=1)
def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images N,1,8,8 float32 in [0, 1], labels int64."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return tuple(  # type: ignore[return-value]
        train_test_split(x, digits.target.astype(np.int64), test_size=0.25, random_state=seed, stratify=digits.target)[
            i
        ]
        for i in (0, 2, 1, 3)
    )


def partition(partition_id: int, num_partitions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Node ``partition_id``'s share of the training split (disjoint, about equal sizes)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    x, y, _, _ = split(seed)
    parts = np.array_split(np.random.default_rng(seed).permutation(len(x)), num_partitions)
    return x[parts[partition_id]], y[parts[partition_id]]


def load_data(context: Context) -> tuple[np.ndarray, np.ndarray]:
    """This node's own examples (the only user code a planwire ClientApp runs)."""
    node = context.node_config
    return partition(int(node["partition-id"]), int(node["num-partitions"]))


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The server's held-out test split."""
    _, _, x, y = split()
    return x, y
