"""Which layer an op of a traced step came from, and which op an export failure is about.

Each graph node is tagged with the module (path in the model) whose forward produced it, backward nodes
included (through hooks on the autograd nodes), so an op without an ONNX translation is reported with
the layer that emitted it (:func:`explain_failure`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.fx.traceback as fx_traceback
from torch import Tensor, nn

from planwire.exporter.errors import TrainingExportError, root_cause
from planwire.exporter.export import OPSET, failing_op
from planwire.exporter.torch_compat import onnx_registry

_MODULE_KEY = "planwire.module"  # node.meta["custom"] key: module path that produced the node


def _module_label(path: str, module: nn.Module) -> str:
    return f"{path or '<root>'} ({type(module).__name__})"


def _grad_fns(tensors: object) -> list[torch.autograd.graph.Node]:
    found = []
    for t in torch.utils._pytree.tree_leaves(tensors):
        if isinstance(t, Tensor) and t.grad_fn is not None:
            found.append(t.grad_fn)
    return found


class ModuleTagger:
    """Tags trace nodes with the module whose forward created them, backward nodes included.

    Forward: module pre/post hooks annotate the trace (``fx.traceback.annotate``) with the module's
    label. Backward: each module's post-hook claims the autograd nodes its forward created (a walk from
    its outputs that stops at its inputs' nodes and at nodes an inner module claimed) and hooks them so
    that the ops autograd later runs for them carry the same annotation.
    """

    def __init__(self, modules: Mapping[str, nn.Module] | None) -> None:
        self.modules = dict(modules or {})  # root name ("" for the model itself) -> module
        self.stack: list[contextlib.ExitStack] = []
        self.inputs: list[set[torch.autograd.graph.Node]] = []
        self.claimed: set[torch.autograd.graph.Node] = set()
        self.failed_in: str | None = None  # innermost module whose forward raised
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for root, model in self.modules.items():
            for path, module in model.named_modules(prefix=root):
                label = _module_label(path, module)
                self.handles.append(module.register_forward_pre_hook(self._pre(label)))
                self.handles.append(module.register_forward_hook(self._post(label), always_call=True))
        try:
            yield
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            while self.stack:
                self.stack.pop().close()

    def _pre(self, label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            ctx = contextlib.ExitStack()
            ctx.enter_context(fx_traceback.annotate({_MODULE_KEY: label}))
            self.stack.append(ctx)
            self.inputs.append(set(_grad_fns(args)))

        return hook

    def _post(self, label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            stop = self.inputs.pop() if self.inputs else set()
            if self.stack:
                self.stack.pop().close()
            if self.failed_in is None and sys.exc_info()[1] is not None:  # always_call: forward raised
                self.failed_in = label
            todo = [fn for fn in _grad_fns(output) if fn not in stop]
            while todo:
                fn = todo.pop()
                if fn in self.claimed or fn in stop:
                    continue
                self.claimed.add(fn)
                _annotate_backward(fn, label)
                todo.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)

        return hook


def _annotate_backward(fn: torch.autograd.graph.Node, label: str) -> None:
    """Trace the ops that autograd runs for ``fn`` under ``label`` (a pre-hook opens, a hook closes)."""
    ctx = contextlib.ExitStack()

    def pre(grad_outputs: object) -> None:
        ctx.enter_context(fx_traceback.annotate({_MODULE_KEY: label}))

    def post(grad_inputs: object, grad_outputs: object) -> None:
        ctx.close()

    fn.register_prehook(pre)
    fn.register_hook(post)


def node_module(node: torch.fx.Node) -> str | None:
    """The module label a traced node was tagged with, if any."""
    return node.meta.get("custom", {}).get(_MODULE_KEY)


def _exportable(op: torch._ops.OpOverload, registry: object) -> bool:
    if op.namespace != "aten" or op.__name__.startswith("sym_") or op._schema.is_mutable:
        # size arithmetic, non-aten ops and in-place ops (torch.export functionalizes them) are left to
        # the exporter to judge
        return True
    if registry.is_registered(op):  # type: ignore[attr-defined]
        return True
    return op in torch._decomp.decomposition_table or op in torch.export.default_decompositions()


def explain_failure(gm: torch.fx.GraphModule, error: BaseException, *, plan: str) -> TrainingExportError:
    """The error to raise for a failed export: the op at fault and the layers that emitted it.

    The op is the one the exporter names when it names one in ``gm``, else every op of ``gm`` that has
    neither an ONNX translation nor a torch decomposition (the usual culprit: a backward op).
    """
    named = failing_op(error)
    candidates: dict[str, list[str]] = {}
    registry = onnx_registry(OPSET)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = str(node.target)
        if named is not None and op != named:
            continue
        if named is None and _exportable(node.target, registry):
            continue
        modules = candidates.setdefault(op, [])
        label = node_module(node)
        if label and label not in modules:
            modules.append(label)
    cause = root_cause(error)
    if not candidates:
        at = f" at op {named}" if named else ""
        return TrainingExportError(f"plan {plan!r}: ONNX export failed{at}: {cause}", plan=plan, op=named)
    parts = [f"{op} (emitted by {', '.join(mods)})" if mods else op for op, mods in candidates.items()]
    op, modules = next(iter(candidates.items()))
    return TrainingExportError(
        f"plan {plan!r}: no ONNX translation for {'; '.join(parts)}, so this step (or its gradient) "
        f"cannot be exported: replace the layer or add a decomposition to "
        f"planwire.exporter.training.decompositions. Exporter error: {cause}",
        plan=plan,
        op=op,
        module=modules[0] if modules else None,
    )
