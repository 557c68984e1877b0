"""Stable fingerprints of what an exported graph depends on: code, module structure, tensor values.

They key the export cache, so they must change whenever the export could: a function's source (and
the helper functions, closure values and simple globals it uses), each submodule's class and plain
attributes, and the bytes of every parameter and buffer. Anything not captured here (a global object
mutated in place, say) is still caught, for the example inputs, by the verification every build runs.
"""

from __future__ import annotations

import hashlib
import inspect
import marshal
import types
from collections.abc import Callable
from typing import Any

import torch

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


def _value(value: Any, seen: set[int]) -> Any:
    """A JSON-able description of a value code may read, or None when it does not matter."""
    if isinstance(value, _SIMPLE):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return tensor_digest(value)
    if isinstance(value, torch.dtype | torch.device | torch.Size):
        return str(value)
    if isinstance(value, tuple | list | dict) and len(value) <= 64:  # models["m"]: its modules are keyed
        if id(value) in seen:  # a container holding itself
            return "<cycle>"
        seen.add(id(value))
        try:
            if isinstance(value, dict):
                return [[repr(k), _value(v, seen)] for k, v in list(value.items())]
            return [_value(v, seen) for v in value]
        finally:
            seen.discard(id(value))
    if isinstance(value, types.FunctionType):
        return function_fingerprint(value, seen)
    if isinstance(value, torch.nn.Module):  # a model the function calls: its weights become constants
        tensors = [*value.named_parameters(), *value.named_buffers()]
        return [module_fingerprint(value), tensors_digest(tensors)]
    return None  # modules, classes, big containers: keyed by library versions or not at all


def _is_library(fn: types.FunctionType) -> bool:
    module = getattr(fn, "__module__", "") or ""
    return module.split(".")[0] in {"torch", "numpy", "onnx", "onnxscript", "onnxruntime", "planwire"}


def source_of(fn: types.FunctionType) -> str:
    """``fn``'s source, or a digest of its bytecode when there is no source file (frozen, generated)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return hashlib.sha256(marshal.dumps(fn.__code__)).hexdigest()


def function_fingerprint(fn: types.FunctionType, seen: set[int] | None = None) -> Any:
    """Source (or bytecode) of ``fn`` plus the closure values and globals it names, recursively."""
    seen = set() if seen is None else seen
    if id(fn) in seen or _is_library(fn):
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"
    seen.add(id(fn))
    code = source_of(fn)
    closure = [_value(c.cell_contents, seen) for c in fn.__closure__ or () if _has_contents(c)]
    names = _global_names(fn.__code__)
    g = fn.__globals__
    globals_ = {n: _value(g[n], seen) for n in sorted(names) if n in g}
    defaults = [_value(d, seen) for d in fn.__defaults__ or ()]
    return [fn.__qualname__, code, closure, {k: v for k, v in globals_.items() if v is not None}, defaults]


def module_fingerprint(module: torch.nn.Module) -> list[Any]:
    """Class, source, plain attributes and mode of every submodule (values are keyed separately)."""
    out = []
    for name, m in module.named_modules():
        cls = type(m)
        source = ""
        if cls.__module__.split(".")[0] != "torch":
            try:
                source = inspect.getsource(cls)
            except (OSError, TypeError):
                source = cls.__qualname__
        plain = {k: _value(v, set()) for k, v in vars(m).items() if not k.startswith("_")}
        plain = {k: v for k, v in plain.items() if v is not None}
        out.append([name, f"{cls.__module__}.{cls.__qualname__}", source, m.training, plain])
    return out


def _has_contents(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # empty cell
        return False
    return True


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


_AUTOGRAD_NAMES = frozenset(
    {"grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "functional_call", "backward"}
)


def uses_autograd(fn: Callable[..., object]) -> bool:
    """Whether ``fn``'s code (nested functions included) names a torch.func transform or autograd.grad.

    A syntactic check: it can report a false positive (a variable called ``grad``), never misses a
    direct call. False positives only cost the slower, gradient-capable pipeline.
    """
    code = getattr(fn, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    todo = [code] if code is not None else []
    while todo:
        c = todo.pop()
        if _AUTOGRAD_NAMES & {*c.co_names, *c.co_freevars}:  # globals, attributes and closure variables
            return True
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return False
