"""Turning torch code into planwire plans: export to ONNX, verify, cache, save and load.

Needs torch; the worker side (``planwire.worker``) never imports this package.
"""

from planwire.exporter import optim
from planwire.exporter.base import NOT_BUILT, PlanRunner
from planwire.exporter.cache import CacheStats, cache_dir, clear_cache
from planwire.exporter.cache import stats as cache_stats
from planwire.exporter.errors import PlanBuildError
from planwire.exporter.hook import LocalWorker, TorchHook, send, tag
from planwire.exporter.loading import LoadedPlan, load_plan
from planwire.exporter.plan import Plan, eager, func2plan
from planwire.exporter.state import State
from planwire.exporter.trainer import TrainingPlan, TrainingPointer, training_plan

__all__ = [
    "NOT_BUILT",
    "CacheStats",
    "LoadedPlan",
    "LocalWorker",
    "Plan",
    "PlanBuildError",
    "PlanRunner",
    "State",
    "TorchHook",
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
