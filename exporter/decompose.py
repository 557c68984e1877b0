"""Skip torch.onnx's decomposition step for programs it would hand back unchanged.

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

and the only other call targets are ``operator`` functions on sizes (``getitem``, SymInt arithmetic).
Anything else falls back to the normal path: higher-order ops, submodules, assertion ops, unregistered
or mutable ops, mutations, effect tokens or a backward signature in the graph signature. Every build is
still verified against eager torch, and tests export plans both ways and compare the ONNX graphs.

The patch replaces ``torch.onnx._internal.exporter._fx_passes.decompose_with_registry`` only inside the
block and only for the thread that entered it (callers hold the export lock); on a torch whose internals
do not look as expected it does nothing, and exports take the normal path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from planwire.exporter.registry import _TESTED, _torch_version

skipped = 0  # decompositions skipped by this process (for tests and diagnostics)
decomposed = 0  # programs that took the normal path inside the block


def _internals() -> tuple[Any, Any, Any, Any] | None:
    """(_fx_passes module, _is_preservable_cia_op, InputKind, OutputKind), or None if this torch differs."""
    if not _TESTED[0] <= _torch_version() <= _TESTED[1]:
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


def nothing_to_decompose(program: torch.export.ExportedProgram, registry: Any) -> bool:
    """True when ``run_decompositions`` with torch.onnx's table for ``registry`` would not change ``program``."""
    internals = _internals()
    if internals is None:
        return False
    _, preservable_cia, input_kind, output_kind = internals
    signature = program.graph_signature
    inputs_ok = {input_kind.USER_INPUT, input_kind.PARAMETER, input_kind.BUFFER, input_kind.CONSTANT_TENSOR}
    if any(spec.kind not in inputs_ok for spec in signature.input_specs):
        return False
    if any(spec.kind is not output_kind.USER_OUTPUT for spec in signature.output_specs):
        return False
    if getattr(signature, "backward_signature", None) is not None:
        return False
    functions = getattr(registry, "functions", None)
    if not isinstance(functions, dict):
        return False
    graph_module = program.graph_module
    if any(m is not graph_module for m in graph_module.modules()):  # control flow subgraphs
        return False
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            return False
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target._schema.is_mutable:
                return False
            entries = functions.get(target.name())
            if not entries or entries[0].fx_target is not target:
                return False
            cia = torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")
            if cia and not preservable_cia(target):
                return False
        elif getattr(target, "__module__", None) != "_operator":
            return False
    return True


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
        global skipped, decomposed
        if threading.get_ident() == owner:
            if on_captured is not None:
                on_captured()
            try:
                skip = nothing_to_decompose(program, registry)
            except Exception:  # an internal this check relies on changed shape: take the normal path
                skip = False
            if skip:
                skipped += 1
                return program
        decomposed += 1
        return original(program, registry)

    fx_passes.decompose_with_registry = decompose_with_registry
    try:
        yield True
    finally:
        fx_passes.decompose_with_registry = original
