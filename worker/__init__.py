"""planwire.worker: stores tensors and runs plans in onnxruntime (never imports torch).

``Service`` and ``VirtualWorker`` load on first use, so starting ``plan-worker`` imports nothing heavy
before it decides how to run (worker/cli.py: it starts itself again on glibc's malloc, see worker/heap.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planwire.worker.service import Service
    from planwire.worker.virtual import VirtualWorker

_LAZY = {"Service": "planwire.worker.service", "VirtualWorker": "planwire.worker.virtual"}
__all__ = ["Service", "VirtualWorker"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'planwire.worker' has no attribute {name!r}")
