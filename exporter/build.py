"""The one build driver: cache lookup -> export -> stamp metadata -> verify -> cache.

Every plan (function and class plans, gradient functions, training steps) is built through
:func:`build_variant`, so they share one policy:

* the cache holds what the export produced, before metadata: plans that differ only in their name or
  defaults share one export, and every build stamps its own metadata (:func:`metadata.stamp`, the one
  writer) on what it got;
* nothing enters the cache before the stamped variant has passed verification, so a build that fails
  leaves no entry behind; a cached entry that fails verification (code the key missed) is dropped and
  exported afresh;
* keys come from :func:`cache_key` alone: the kind of build, what its export reads, library versions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import onnx
import onnxscript
import torch

from planwire.exporter import cache, decompose, progress, torch_compat
from planwire.exporter.errors import PlanBuildError
from planwire.exporter.export import OPSET

SCHEME = "planwire-export/2"  # bump when what an entry holds changes

T = TypeVar("T")


def cache_key(kind: str, *parts: Any) -> str:
    """The cache key of one export: ``kind`` of build, the JSON-able ``parts`` its result depends on,
    and the versions of everything that shapes exported graphs."""
    versions = [torch.__version__, onnx.__version__, onnxscript.__version__, OPSET]
    return cache.make_key(SCHEME, kind, *parts, versions, rewrites_source())


@functools.cache
def rewrites_source() -> str:
    """The code that rewrites programs during every export (:mod:`planwire.exporter.decompose`'s rules
    and the :mod:`planwire.exporter.torch_compat` patch that applies them): part of every key, so an
    edited rule never serves a graph the old rule made."""
    return "\n".join(inspect.getsource(module) for module in (decompose, torch_compat))


def build_variant(
    key: str | None,
    *,
    export: Callable[[], onnx.ModelProto],
    stamp: Callable[[onnx.ModelProto], bytes],
    verify: Callable[[bytes, onnx.ModelProto], T],
    reporting: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> T:
    """Build one plan variant, served from the cache under ``key`` when possible (None: never cached).

    ``export`` makes the graph (a fresh export only runs on a miss); ``stamp`` writes the plan's
    metadata into it and returns its bytes; ``verify`` checks those bytes against eager torch (raising
    PlanBuildError) and returns the build's result. ``reporting`` wraps a fresh export and its
    verification (the build's progress display).
    """
    data = cache.get(key) if key is not None else None
    if data is not None:
        proto = onnx.load_from_string(data)
        try:
            return verify(stamp(proto), proto)
        except PlanBuildError:
            assert key is not None
            cache.discard(key)  # a stale entry: export afresh
    with reporting():
        proto = export()
        data = proto.SerializeToString(deterministic=True)
        stamped = stamp(proto)
        progress.stage("verify")
        result = verify(stamped, proto)
    if key is not None:
        cache.put(key, data)
    return result
