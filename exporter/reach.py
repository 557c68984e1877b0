"""What a plan's code can reach: the one walk behind its cache key (exporter/fingerprint.py) and the build's
view of the modules it uses (exporter/modes.py), so that both always see the same values.

From a function: its closure values, the globals its code names and its defaults; from those, helper
functions (recursively, library code aside), the values inside dicts, lists and tuples (``models["m"]``), the
attributes of plain objects (``holder.net``; not of library objects such as a tensor or an optimizer) and
what bound methods and ``functools.partial`` objects bind, at most ``MAX_ITEMS`` values per container or
object, through at most ``MAX_DEPTH`` plain objects (containers nest without a bound, as code indexes them),
each object once (again only when reached through fewer plain objects; cycles end).
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import types
from collections.abc import Iterator
from typing import Any

from torch import nn

LIBRARIES = frozenset({"torch", "numpy", "onnx", "onnxscript", "onnxruntime", "planwire", "builtins"})
MAX_ITEMS = 64
MAX_DEPTH = 3
MAX_NESTING = 64  # containers in containers: past this a value is keyed as not walked (no RecursionError)
_NESTED = (dict, list, tuple, types.MethodType, functools.partial)
_OPAQUE = (type, types.ModuleType, types.BuiltinFunctionType, nn.Module)
_PATHS = ("stdlib", "platstdlib", "purelib", "platlib")
_INSTALLED = tuple({os.path.realpath(p) + os.sep for k in _PATHS if (p := sysconfig.get_path(k))})


def is_library(fn: types.FunctionType) -> bool:
    """Whether function ``fn`` is the code of torch, numpy, onnx or planwire: not walked into."""
    return (getattr(fn, "__module__", "") or "").split(".")[0] in LIBRARIES


@functools.cache
def _installed(module: str) -> bool:
    """Whether classes of ``module`` come from a library (those named above, the standard library or an
    installed package), whose objects' attributes are not walked: only the user's own classes' are."""
    if module.split(".")[0] in LIBRARIES:
        return True
    path = getattr(sys.modules.get(module), "__file__", None)
    if path is None:  # C modules built in are libraries; __main__ of a notebook is the user's
        return module in sys.builtin_module_names
    return os.path.realpath(path).startswith(_INSTALLED)


def global_names(code: types.CodeType) -> set[str]:
    """Every name ``code`` (nested functions included) may read as a global."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names


class Reach:
    """One walk: ``function(fn)`` and ``value(name, v)`` yield ``(name, value)`` for each value reached that is
    not walked into (functions are yielded, then walked), named by how the code reaches it. Objects already
    walked (or modules already yielded) are not again, across calls on the same ``Reach``."""

    def __init__(self, seen: set[int] | None = None) -> None:
        self.seen: set[int] = set() if seen is None else seen  # functions and modules yielded
        self.walked: dict[int, int] = {}  # containers and objects walked into: the least depth they were at

    def function(self, fn: types.FunctionType, name: str = "") -> Iterator[tuple[str, Any]]:
        if id(fn) in self.seen:
            return
        self.seen.add(id(fn))
        yield name or fn.__qualname__, fn
        if is_library(fn):
            return
        code = fn.__code__
        for var, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            yield from self.value(var, value)
        g = fn.__globals__
        for var in sorted(global_names(code)):
            if var in g:
                yield from self.value(var, g[var])
        for i, value in enumerate(fn.__defaults__ or ()):
            yield from self.value(f"{fn.__name__}.<default {i}>", value)

    def value(self, name: str, value: Any, depth: int = 0, nesting: int = 0) -> Iterator[tuple[str, Any]]:
        if isinstance(value, types.FunctionType):
            yield from self.function(value, name)
            return
        if isinstance(value, nn.Module):
            if id(value) not in self.seen:
                self.seen.add(id(value))
                yield name, value
            return
        before = self.walked.get(id(value))  # walked again only from nearer: what was past the bound may not be
        walk = (before is None or depth < before) and nesting < MAX_NESTING
        items = self._items(name, value, depth < MAX_DEPTH) if walk else None
        if items is None:
            yield name, value
            return
        self.walked[id(value)] = depth
        deeper = depth + (not isinstance(value, _NESTED))  # a plain object's attributes: one level deeper
        for key, item in items:
            yield from self.value(key, item, deeper, nesting + 1)

    @staticmethod
    def _items(name: str, value: Any, objects: bool) -> list[tuple[str, Any]] | None:
        """The named values inside ``value`` when it is walked into: a small dict, list or tuple, a bound method,
        a partial, or (``objects``) a plain object's attributes; else None."""
        if isinstance(value, dict):  # dict's own items: a subclass's code is not run by the walk
            return [(f"{name}[{k!r}]", v) for k, v in list(dict.items(value))] if len(value) <= MAX_ITEMS else None
        if isinstance(value, list | tuple):
            return [(f"{name}[{i}]", v) for i, v in enumerate(value)] if len(value) <= MAX_ITEMS else None
        if isinstance(value, types.MethodType):  # model.forward: its object and its function
            return [(f"{name}.__self__", value.__self__), (f"{name}.__func__", value.__func__)]
        if isinstance(value, functools.partial):  # partial(step, net): what it binds
            bound = [*enumerate(value.args), *value.keywords.items()]
            return [(f"{name}.func", value.func), *((f"{name}.args[{k!r}]", v) for k, v in bound)]
        cls = type(value)
        if not objects or isinstance(value, _OPAQUE) or cls is not types.SimpleNamespace and _installed(cls.__module__):
            return None
        try:  # the instance's own __dict__: no __getattr__ or property of the user's class is run by the walk
            attrs = object.__getattribute__(value, "__dict__")
        except Exception:
            return None
        if not isinstance(attrs, dict) or len(attrs) > MAX_ITEMS:
            return None
        return [(f"{name}.{k}", v) for k, v in list(attrs.items()) if not k.startswith("__")]
