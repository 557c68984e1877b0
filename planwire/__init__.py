"""planwire: ship PyTorch computations to remote workers as ONNX plans.

Names that need torch (func2plan, Plan, ...) load lazily, so ``import planwire.worker`` on a device with
onnxruntime alone never imports torch, and ``planwire.load_plan`` works there too.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # worker side (onnxruntime)
    "VirtualWorker": "planwire.worker",
    # transport (pyzmq)
    "connect": "planwire.transport",
    "RemoteWorker": "planwire.transport",
    "PointerTensor": "planwire.transport",
    "PointerPlan": "planwire.transport",
    "RemoteError": "planwire.transport",
    # exporter (torch)
    "func2plan": "planwire.exporter",
    "Plan": "planwire.exporter",
    "PlanBuildError": "planwire.exporter",
    "FixedShapeWarning": "planwire.exporter",
    "TrainingModeWarning": "planwire.exporter",
    "TrainingPlan": "planwire.exporter",
    # loading and inspecting saved plans: onnxruntime alone (planwire.exporter loads lazily)
    "load_plan": "planwire.exporter",
    "LoadedPlan": "planwire.exporter",
    "TorchHook": "planwire.exporter",
    "tag": "planwire.exporter",
    "send": "planwire.exporter",
    "training_plan": "planwire.exporter",
    "optim": "planwire.exporter",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'planwire' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
