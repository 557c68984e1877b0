"""The data: scikit-learn's bundled digits (8x8 images, no download), split into train and test per class.

Torch-free and light: the ClientApp imports this, and every client process would otherwise carry
scikit-learn and SciPy (about 80 MiB of resident memory) just to read one bundled file. So the digits are
read with numpy from the copy scikit-learn ships (it must be installed, it is not imported), and split with
numpy: a stratified 75/25 split by ``seed``. Each node loads only its own partition (``partition-id`` of
``num-partitions`` in its node config; the simulation engine sets both).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context

TEST_FRACTION = 0.25


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(images N,8,8 float64 in 0..16, labels int64): scikit-learn's ``load_digits()``, read from its
    ``datasets/data/digits.csv.gz`` (64 pixels, then the label, per row) without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # locates the package; does not import it
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the digits come with scikit-learn: pip install scikit-learn")
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


@lru_cache(maxsize=1)
def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images N,1,8,8 float32 in [0, 1], labels int64; each class
    split 75/25 at random (``seed``), so train and test hold the classes in the same proportions."""
    images, y = digits()
    x = (images / 16.0).astype(np.float32)[:, None]
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test.append(members[: round(len(members) * TEST_FRACTION)])
    is_test = np.zeros(len(y), bool)
    is_test[np.concatenate(test)] = True
    train_idx, test_idx = rng.permutation(np.flatnonzero(~is_test)), rng.permutation(np.flatnonzero(is_test))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


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
