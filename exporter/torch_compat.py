"""Every use of torch.onnx's private internals, behind one version gate and one export lock.

``torch.onnx.export(..., dynamo=True)`` is slow on small plans for two reasons this module patches, each
only inside a ``with`` block that the caller enters holding :data:`EXPORT_LOCK`:

* :func:`cached_registry`: the exporter builds ``ONNXRegistry.from_torchlib()`` on every call (about
  1-2 s, most of a small export) and offers no argument to pass one in. The patch hands out a fresh
  *copy* of a registry built once (per opset): the exporter may register custom translations on what it
  gets, so the cached original is never mutated.
* :func:`skip_noop_decompositions`: the exporter always runs ``run_decompositions`` on what
  ``torch.export`` captured, even when that provably hands the program back unchanged (below), and
  re-traces the whole graph when a few common nodes need it (``batch_norm``, ``reshape``, ``flatten``),
  which :mod:`planwire.exporter.decompose` rewrites node by node into what that step would give.

:func:`onnx_registry` gives the training pipeline the registry to ask which ops have a translation.
Every patch checks :func:`supported` (the torch versions they were tested on) and the shape of the
internals it touches; elsewhere it does nothing and exports simply take the normal, slower path.

On skipping decompositions:

``torch.onnx.export(..., dynamo=True)`` always runs ``ExportedProgram.run_decompositions(table)`` on what
``torch.export`` captured, with ``table`` = torch's decompositions minus the ops torchlib translates. For
a small plan that is most of a warm build (about 0.12 s of 0.15 s here): it rebuilds that table,
collects every CompositeImplicitAutograd (CIA) op of every namespace twice, patches and restores the
Python kernels of ~500 CIA ops and re-traces the whole graph under fake tensors.

When the captured graph holds only ops that this step provably leaves alone, its result is the same
graph, so :func:`skip_noop_decompositions` returns the program as it is. An op is left alone when it is
an ``OpOverload`` with

* a functional schema (``not is_mutable``): no in-place or ``out=`` variant to functionalize;
* an ONNX translation in the export's registry, with that very overload as the entry's ``fx_target``:
  exactly the ops torch.onnx drops from ``table``, so no Python decomposition applies to it;
* no CIA kernel, or a CIA kernel that export may preserve (``_is_preservable_cia_op``): run_decompositions
  keeps those (``_special_op_to_preserve_cia``) unless the table names them, which it does not (above);

and the only other call targets are ``operator`` functions on sizes (``getitem``, SymInt arithmetic)
(:func:`left_alone`; the program-wide conditions below are :func:`program_left_alone`). When the only
nodes that fail this have a rule in :data:`planwire.exporter.decompose.RULES`, the block hands torch.onnx
a rewritten copy instead, itself checked with :func:`nothing_to_decompose`.
Anything else falls back to the normal path: higher-order ops, submodules, assertion ops, unregistered
or mutable ops, mutations, effect tokens or a backward signature in the graph signature. Every build is
still verified against eager torch, and tests export plans both ways and compare the ONNX graphs.

The patch replaces ``torch.onnx._internal.exporter._fx_passes.decompose_with_registry`` only inside the
block and only for the thread that entered it (callers hold the export lock); on a torch whose internals
do not look as expected it does nothing, and exports take the normal path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

TESTED = ((2, 6), (2, 13))  # torch versions whose exporter internals look as patched here

# Exports are serialized: the exporter is not thread-safe and the patches here are process-wide.
EXPORT_LOCK = threading.RLock()

_lock = threading.Lock()
_bases: dict[int, Any] = {}
builds = 0  # registries built from torchlib by this process (for tests and diagnostics)
skipped = 0  # decompositions skipped by this process (for tests and diagnostics)
decomposed = 0  # programs that took the normal path inside the block
rewritten = 0  # of the skipped: programs whose few decomposable nodes :mod:`decompose` rewrote itself


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def supported() -> bool:
    """Whether this torch is one the patches were tested on (the one version gate)."""
    return TESTED[0] <= torch_version() <= TESTED[1]


def onnx_registry(opset: int) -> Any:
    """torch.onnx's registry of ONNX translations for ``opset`` (the cached one where patched)."""
    with cached_registry():
        from torch.onnx._internal.exporter import _registration

        return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


# -- one torchlib registry per process --------------------------------------------------------------


def _registry_class() -> Any | None:
    """ONNXRegistry if this torch obtains it the way the patch expects, else None."""
    if not supported():
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


# -- skipping no-op decompositions -------------------------------------------------------------


def _internals() -> tuple[Any, Any, Any, Any] | None:
    """(_fx_passes module, _is_preservable_cia_op, InputKind, OutputKind), or None if this torch differs."""
    if not supported():
        return None
    try:
        from torch._export.utils import _is_preservable_cia_op
        from torch.export.graph_signature import InputKind, OutputKind
        from torch.onnx._internal.exporter import _fx_passes
    except ImportError:
        return None
    if not callable(getattr(_fx_passes, "decompose_with_registry", None)) or not hasattr(
        torch._C, "_dispatch_has_kernel_for_dispatch_key"
    ):
        return None
    return _fx_passes, _is_preservable_cia_op, InputKind, OutputKind


def program_left_alone(program: torch.export.ExportedProgram, registry: Any) -> bool:
    """Whether ``run_decompositions`` leaves ``program``'s signature and structure alone: no mutations,
    effect tokens, backward signature, control-flow subgraphs or attributes, and a registry we can read."""
    internals = _internals()
    if internals is None:
        return False
    _, _, input_kind, output_kind = internals
    signature = program.graph_signature
    inputs_ok = {input_kind.USER_INPUT, input_kind.PARAMETER, input_kind.BUFFER, input_kind.CONSTANT_TENSOR}
    if any(spec.kind not in inputs_ok for spec in signature.input_specs):
        return False
    if any(spec.kind is not output_kind.USER_OUTPUT for spec in signature.output_specs):
        return False
    if getattr(signature, "backward_signature", None) is not None:
        return False
    if not isinstance(getattr(registry, "functions", None), dict):
        return False
    graph_module = program.graph_module
    if any(m is not graph_module for m in graph_module.modules()):  # control flow subgraphs
        return False
    return all(node.op != "get_attr" for node in graph_module.graph.nodes)


def left_alone(target: Any, registry: Any) -> bool:
    """Whether ``run_decompositions`` with torch.onnx's table for ``registry`` keeps a call to ``target``."""
    if isinstance(target, torch._ops.OpOverload):
        internals = _internals()
        if internals is None or target._schema.is_mutable:
            return False
        entries = registry.functions.get(target.name())
        if not entries or entries[0].fx_target is not target:
            return False
        cia = torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")
        return not cia or internals[1](target)
    return getattr(target, "__module__", None) == "_operator"


def nothing_to_decompose(program: torch.export.ExportedProgram, registry: Any) -> bool:
    """True when ``run_decompositions`` with torch.onnx's table for ``registry`` would not change ``program``."""
    if not program_left_alone(program, registry):
        return False
    nodes = program.graph_module.graph.nodes
    return all(left_alone(node.target, registry) for node in nodes if node.op == "call_function")


@contextmanager
def skip_noop_decompositions(on_captured: Callable[[], None] | None = None) -> Iterator[bool]:
    """Within this block torch.onnx skips ``run_decompositions`` where :func:`nothing_to_decompose`.

    ``on_captured`` is called when torch.export has captured the program (the build's progress moves
    from tracing to translating). Yields whether the patch is active. Callers hold the export lock.
    """
    internals = _internals()
    if internals is None:
        yield False
        return
    fx_passes = internals[0]
    original = fx_passes.decompose_with_registry
    owner = threading.get_ident()

    def decompose_with_registry(program: Any, registry: Any) -> Any:
        global skipped, decomposed, rewritten
        if threading.get_ident() == owner:
            if on_captured is not None:
                on_captured()
            try:
                from planwire.exporter import decompose  # its rules build on the checks here

                skip = nothing_to_decompose(program, registry)
                local = None if skip else decompose.decompose_locally(program, registry)
            except Exception:  # an internal these checks or rules rely on changed: take the normal path
                skip, local = False, None
            if skip:
                skipped += 1
                return program
            if local is not None:
                skipped += 1
                rewritten += 1
                return local
        decomposed += 1
        return original(program, registry)

    fx_passes.decompose_with_registry = decompose_with_registry
    try:
        yield True
    finally:
        fx_passes.decompose_with_registry = original
