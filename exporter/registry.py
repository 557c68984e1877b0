"""One torchlib ONNX registry per process instead of one per ``torch.onnx.export`` call.

``torch.onnx.export(..., dynamo=True)`` builds ``ONNXRegistry.from_torchlib()`` on every call (about 1-2 s,
most of a small export) and offers no argument to pass one in. :func:`cached_registry` patches that
classmethod, for the duration of one export only, to hand out a fresh *copy* of a registry built once
(per opset): the exporter may register custom translations on what it gets, so the cached original is
never mutated. The patch is version-guarded: on a torch whose registry does not look as expected it
does nothing and exports simply stay slow.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_TESTED = ((2, 6), (2, 13))  # torch versions whose exporter obtains its registry as patched here
_lock = threading.Lock()
_bases: dict[int, Any] = {}
builds = 0  # registries built from torchlib by this process (for tests and diagnostics)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _registry_class() -> Any | None:
    """ONNXRegistry if this torch obtains it the way the patch expects, else None."""
    if not _TESTED[0] <= _torch_version() <= _TESTED[1]:
        return None
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return None
    cls = getattr(_registration, "ONNXRegistry", None)
    if cls is None or not isinstance(cls.__dict__.get("from_torchlib"), classmethod):
        return None
    return cls


def _copy(base: Any) -> Any:
    """A registry sharing the (immutable) decomposition entries of ``base`` but not its lists."""
    new = object.__new__(type(base))
    new.__dict__.update(base.__dict__)
    new.functions = {k: list(v) for k, v in base.functions.items()}
    return new


@contextmanager
def cached_registry() -> Iterator[bool]:
    """Within this block, ``ONNXRegistry.from_torchlib`` returns copies of a per-process registry.

    Yields whether the patch is active. Not re-entrant across threads: callers hold the export lock.
    """
    cls = _registry_class()
    if cls is None:
        yield False
        return
    original = cls.__dict__["from_torchlib"]

    def from_torchlib(klass: type, opset_version: int | None = None, **kwargs: Any) -> Any:
        global builds
        args = {} if opset_version is None else {"opset_version": opset_version}
        if kwargs or klass is not cls:  # an unexpected call: behave exactly as torch does
            return original.__func__(klass, **args, **kwargs)
        with _lock:
            base = _bases.get(opset_version or 0)
            if base is None:
                quiet = logging.getLogger(cls.__module__)  # its "torchvision is not installed" warnings
                level = quiet.level
                quiet.setLevel(logging.ERROR)
                try:
                    base = original.__func__(klass, **args)
                finally:
                    quiet.setLevel(level)
                if not isinstance(getattr(base, "functions", None), dict):
                    return base  # unknown layout: never cache what we cannot copy safely
                _bases[opset_version or 0] = base
                builds += 1
        return _copy(base)

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield True
    finally:
        cls.from_torchlib = original
