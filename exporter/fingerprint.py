"""Stable fingerprints of what an exported graph depends on: code, module structure, tensor values.

They key the export cache, so they must change whenever the export could: a function's source and what
its code reaches (exporter/reach.py: helpers, closure values, globals, containers, plain objects'
attributes), each submodule's class and plain attributes, and the bytes of every parameter and buffer.
Anything not captured here (a global object mutated in place, say) is still caught, for the example inputs,
by the verification every build runs.
"""

from __future__ import annotations

import hashlib
import inspect
import marshal
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

from planwire.exporter.reach import Reach, is_library

_SIMPLE = (int, float, bool, str, bytes, type(None))


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{flat.dtype}{tuple(t.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_digest(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str]]:
    """(name, digest) of named tensors, in order."""
    return [(name, tensor_digest(t)) for name, t in named]


def _describe(value: Any, reach: Reach) -> Any:
    """A JSON-able description of a value code may read (a function: its own code), or None when it does not
    matter or is walked into (:class:`~planwire.exporter.reach.Reach` yields what it holds)."""
    if isinstance(value, _SIMPLE):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return tensor_digest(value)
    if isinstance(value, torch.dtype | torch.device | torch.Size):
        return str(value)
    if isinstance(value, types.FunctionType):
        if is_library(value):
            return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
        return [value.__qualname__, source_of(value)]
    if isinstance(value, torch.nn.Module):  # a model the function calls: its weights become constants
        tensors = [*value.named_parameters(), *value.named_buffers()]
        return [module_fingerprint(value, reach), tensors_digest(tensors)]
    return None  # modules, classes, big containers: keyed by library versions or not at all


def _described(found: Iterable[tuple[str, Any]], reach: Reach) -> list[Any]:
    return [[name, d] for name, value in found if (d := _describe(value, reach)) is not None]


def source_of(fn: types.FunctionType) -> str:
    """``fn``'s source, or a digest of its bytecode when there is no source file (frozen, generated)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return hashlib.sha256(marshal.dumps(fn.__code__)).hexdigest()


def function_fingerprint(fn: types.FunctionType) -> Any:
    """Source (or bytecode) of ``fn`` and of the helpers it calls, and every value its code reaches
    (exporter/reach.py), each named by how the code reaches it."""
    reach = Reach()
    return _described(reach.function(fn), reach)


def module_fingerprint(module: torch.nn.Module, reach: Reach | None = None) -> list[Any]:
    """Class, source, plain attributes (and what they reach) and mode of every submodule (values are keyed
    separately)."""
    reach = Reach() if reach is None else reach
    named = list(module.named_modules())
    reach.seen.update(id(m) for _, m in named)  # a submodule an attribute names again is keyed once
    out = []
    for name, m in named:
        cls = type(m)
        source = ""
        if cls.__module__.split(".")[0] != "torch":
            try:
                source = inspect.getsource(cls)
            except (OSError, TypeError):
                source = cls.__qualname__
        plain = [_described(reach.value(k, v), reach) for k, v in vars(m).items() if not k.startswith("_")]
        out.append([name, f"{cls.__module__}.{cls.__qualname__}", source, m.training, [p for p in plain if p]])
    return out


_AUTOGRAD_NAMES = frozenset(
    {"grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "functional_call", "backward"}
)


def uses_autograd(fn: Callable[..., object]) -> bool:
    """Whether ``fn``'s code (nested functions and the helpers it reaches included, exporter/reach.py) names a
    torch.func transform or autograd.grad.

    A syntactic check: it can report a false positive (a variable called ``grad``), never misses a
    direct call. False positives only cost the slower, gradient-capable pipeline.
    """
    code = getattr(fn, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    todo = [code] if code is not None else []
    if isinstance(fn, types.FunctionType):
        todo += [f.__code__ for _, f in Reach().function(fn) if isinstance(f, types.FunctionType) and not is_library(f)]
    while todo:
        c = todo.pop()
        if _AUTOGRAD_NAMES & {*c.co_names, *c.co_freevars}:  # globals, attributes and closure variables
            return True
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return False
