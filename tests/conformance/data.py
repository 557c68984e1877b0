"""The worker-own data the private-data tests expect (PROTOCOL.md §6.2).

A worker under test holds these arrays as its own tensors, each tagged ``conformance`` and its name.
``python tests/conformance/data.py DIR`` writes them as DIR/own.npz for workers started by hand
(plan-worker: ``--data DIR/own.npz:conformance``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TAG = "conformance"
OWN = {
    "weights": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
    "labels": np.array([1, 0, 1], dtype=np.int64),
}


def write(directory: Path) -> Path:
    path = Path(directory) / "own.npz"
    np.savez(path, **OWN)
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
