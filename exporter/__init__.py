"""Turning torch code into planwire plans: export to ONNX, verify, cache, save and load.

Building plans needs torch. Names load lazily, so that loading and inspecting a saved plan
(``load_plan``, ``LoadedPlan``) works on a worker-only install with onnxruntime and numpy alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planwire.exporter import optim
    from planwire.exporter.base import NOT_BUILT, PlanRunner
    from planwire.exporter.cache import CacheStats, cache_dir, clear_cache
    from planwire.exporter.cache import stats as cache_stats
    from planwire.exporter.errors import FixedShapeWarning, PlanBuildError, TrainingModeWarning
    from planwire.exporter.hook import LocalWorker, TorchHook, send, tag
    from planwire.exporter.loading import LoadedPlan, load_plan
    from planwire.exporter.plan import Plan, eager, func2plan
    from planwire.exporter.state import State
    from planwire.exporter.trainer import TrainingPlan, TrainingPointer, training_plan

# name -> (module, attribute in it)
_LAZY: dict[str, tuple[str, str]] = {
    "NOT_BUILT": ("planwire.exporter.base", "NOT_BUILT"),
    "PlanRunner": ("planwire.exporter.base", "PlanRunner"),
    "CacheStats": ("planwire.exporter.cache", "CacheStats"),
    "cache_dir": ("planwire.exporter.cache", "cache_dir"),
    "clear_cache": ("planwire.exporter.cache", "clear_cache"),
    "cache_stats": ("planwire.exporter.cache", "stats"),
    "FixedShapeWarning": ("planwire.exporter.errors", "FixedShapeWarning"),
    "PlanBuildError": ("planwire.exporter.errors", "PlanBuildError"),
    "TrainingModeWarning": ("planwire.exporter.errors", "TrainingModeWarning"),
    "LocalWorker": ("planwire.exporter.hook", "LocalWorker"),
    "TorchHook": ("planwire.exporter.hook", "TorchHook"),
    "send": ("planwire.exporter.hook", "send"),
    "tag": ("planwire.exporter.hook", "tag"),
    "LoadedPlan": ("planwire.exporter.loading", "LoadedPlan"),
    "load_plan": ("planwire.exporter.loading", "load_plan"),
    "Plan": ("planwire.exporter.plan", "Plan"),
    "eager": ("planwire.exporter.plan", "eager"),
    "func2plan": ("planwire.exporter.plan", "func2plan"),
    "State": ("planwire.exporter.state", "State"),
    "TrainingPlan": ("planwire.exporter.trainer", "TrainingPlan"),
    "TrainingPointer": ("planwire.exporter.trainer", "TrainingPointer"),
    "training_plan": ("planwire.exporter.trainer", "training_plan"),
    "optim": ("planwire.exporter.optim", ""),
}

__all__ = [
    "CacheStats",
    "FixedShapeWarning",
    "LoadedPlan",
    "LocalWorker",
    "NOT_BUILT",
    "Plan",
    "PlanBuildError",
    "PlanRunner",
    "State",
    "TorchHook",
    "TrainingModeWarning",
    "TrainingPlan",
    "TrainingPointer",
    "cache_dir",
    "cache_stats",
    "clear_cache",
    "eager",
    "func2plan",
    "load_plan",
    "optim",
    "send",
    "tag",
    "training_plan",
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'planwire.exporter' has no attribute {name!r}")
    module = importlib.import_module(target[0])
    value = getattr(module, target[1]) if target[1] else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
