"""torch module -> optimized, self-contained ONNX model (``torch.onnx.export(..., dynamo=True)``).

The result has only standard-domain ops (onnxscript functions inlined), no external data, a symbolic
dimension on every requested dynamic axis, and plan state (the initializers named in ``keep``) left as
named initializers: the optimizer may not fold or deduplicate them away.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Collection, Sequence

import onnx
import torch
from onnxscript import ir, optimizer

from planwire.exporter import cache, diagnose, progress
from planwire.exporter.errors import PlanBuildError, chain, root_cause
from planwire.exporter.onnx_passes import check_exported, strip_debug_info
from planwire.exporter.torch_compat import EXPORT_LOCK, cached_registry, skip_noop_decompositions
from planwire.exporter.translations import TRANSLATIONS

OPSET = 20  # ONNX opset of exported plans (torchlib implements >= 18; onnxruntime >= 1.17 runs 20)


def export_model(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    *,
    plan: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: Sequence[Collection[int]],
    keep: Collection[str] = (),
    output_dtypes: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module(*args)``; ``dynamic[i]`` lists the axes of argument i that stay symbolic.

    ``output_dtypes`` (wire names of the eager outputs) lets :func:`_restore_output_casts` repair
    float outputs whose final down-cast the exporter dropped.

    Raises PlanBuildError (naming ``plan`` and, when found, the failing op) with the cause chained.
    """
    with (
        EXPORT_LOCK,
        cached_registry(),
        skip_noop_decompositions(on_captured=lambda: progress.stage("export")),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # training-mode and deprecation chatter of the exporter
        try:
            with diagnose.quiet_exporter():
                program = torch.onnx.export(
                    module,
                    tuple(args),
                    dynamo=True,
                    optimize=False,  # optimized below, with plan state protected
                    verbose=False,
                    opset_version=OPSET,
                    dynamic_shapes=_dynamic_shapes(module, args, input_names, dynamic),
                    custom_translation_table=dict(TRANSLATIONS),
                )
        except Exception as e:
            raise export_error(e, plan=plan, rerun=(module, args)) from e
        progress.stage("export")
        cache.stats.exports += 1
        model = program.model
        try:
            if output_dtypes is not None:
                _restore_output_casts(model, output_dtypes)
            _optimize(model, keep)
            _name_ports(model, input_names, output_names)
        except Exception as e:
            raise PlanBuildError(f"plan {plan!r}: post-processing the exported graph failed: {e}", plan=plan) from e
    proto = ir.serde.serialize_model(model)
    strip_debug_info(proto)
    check_exported(proto, plan=plan, input_names=input_names, dynamic=dynamic)
    return proto


def _dynamic_shapes(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    names: Sequence[str],
    dynamic: Sequence[Collection[int]],
) -> object | None:
    """``dynamic_shapes`` in whatever structure ``module.forward``'s signature needs (*args included)."""
    if not any(dynamic):
        return None
    shapes = torch.export.ShapesCollection()
    for name, arg, axes in zip(names, args, dynamic, strict=True):
        if axes:
            shapes[arg] = {a: torch.export.Dim(f"{name}_{a}") for a in sorted(axes)}
    return shapes.dynamic_shapes(module, tuple(args))


_FLOATS = {"float16": ir.DataType.FLOAT16, "float": ir.DataType.FLOAT, "double": ir.DataType.DOUBLE}


def _restore_output_casts(model: ir.Model, dtypes: Sequence[str]) -> None:
    """Cast float outputs back to the dtype eager torch returns.

    torch 2.13's exporter computes some float16 ops in float32 (type promotion inserts up- and
    down-casts) but drops the down-cast when that op's result is a graph output, so ``x.abs()`` on
    float16 exports with a float32 output. Eager torch rounds that float32 result to float16, which is
    exactly the Cast added here; the verification that follows every export checks the values.
    """
    graph = model.graph
    for i, (value, wire) in enumerate(zip(list(graph.outputs), dtypes, strict=True)):
        want = _FLOATS.get(wire)
        if want is None or value.dtype not in _FLOATS.values() or value.dtype == want:
            continue
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", want.value)], num_outputs=1)
        graph.append(cast)
        out = cast.outputs[0]
        out.dtype, out.shape = want, value.shape
        graph.outputs[i] = out  # named by _name_ports


def _name_ports(model: ir.Model, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Give the graph inputs and outputs their plan names.

    Not left to ``torch.onnx.export(output_names=...)``: when a function returns an input unchanged or
    one tensor twice, the exporter renames the input or names two outputs alike, and the optimizer's
    OutputFixPass (which puts an Identity behind such outputs) renames inputs too.
    """
    graph = model.graph
    ports = [*graph.inputs, *graph.outputs]
    names = [*inputs, *outputs]
    if len(ports) != len(names):
        raise AssertionError(f"exported graph has {len(ports)} ports, expected {len(names)}: {names}")
    wanted = set(names)
    for value in [*graph.initializers.values(), *(v for node in graph for v in node.outputs)]:
        if value.name in wanted and value not in ports:  # an inner value called like a port steps aside
            value.name = f"{value.name}_inner"
    for value, name in zip(ports, names, strict=True):
        value.name = name


def _optimize(model: ir.Model, keep: Collection[str]) -> None:
    """onnxscript's optimizer (folding, inlining, CSE) without touching the ``keep`` initializers.

    Graph inputs are never folded or deduplicated, so the kept initializers pose as inputs meanwhile.
    """
    graph = model.graph
    kept = [graph.initializers[n] for n in keep if n in graph.initializers]
    for value in kept:
        graph.inputs.append(value)
    dedup_log = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")  # "skipped <kept>"
    level = dedup_log.level
    dedup_log.setLevel(logging.ERROR)
    try:
        optimizer.optimize_ir(model)
    finally:
        dedup_log.setLevel(level)
        for value in kept:
            graph.inputs.remove(value)


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"\b(aten::\w+(?:\.\w+)?)"),
)


def failing_op(exc: BaseException) -> str | None:
    """The torch op an exporter error is about, searched along the exception chain."""
    for e in chain(exc):
        text = str(e)
        for pattern in _OP_PATTERNS:
            match = pattern.search(text)
            if match:
                return ".".join(g for g in match.groups() if g)
    return None


def export_error(
    exc: BaseException, *, plan: str, rerun: tuple[object, Sequence[object]] | None = None
) -> PlanBuildError:
    """The short PlanBuildError for a failed ``torch.onnx.export`` (caller chains ``exc``): data-dependent
    control flow, or an op without translation (with its layer and source line), named in user terms.
    ``rerun`` (the exported module and its arguments) lets an unsupported op be traced to its line."""
    if diagnose.is_data_dependent(exc):
        return PlanBuildError(diagnose.data_dependent_message(plan, exc), plan=plan)
    if any("mutated in the forward" in str(e) for e in chain(exc)):
        return PlanBuildError(
            f"plan {plan!r} could not be exported to ONNX: {root_cause(exc)}\nA buffer read from outside the "
            "plan is updated in the forward: usually a BatchNorm in training mode (its running statistics) "
            "in a model the plan's code reaches in a way planwire does not follow (an object's attribute, "
            "say). Call .eval() on that model before building, or make it an attribute of the Plan (or a "
            "closure variable or global of the function plan).",
            plan=plan,
        )
    op = failing_op(exc)
    if op is not None and _is_dispatch_failure(exc):
        return PlanBuildError(diagnose.unsupported_op_message(plan, op, exc, rerun=rerun), plan=plan, op=op)
    at = f" at op {op}" if op else ""
    frame = diagnose.user_frame(exc)
    line = f"\n  at {diagnose.where(frame.filename, frame.lineno, frame.line)}" if frame else ""
    return PlanBuildError(
        f"plan {plan!r} could not be exported to ONNX{at}: {root_cause(exc)}{line}\n{diagnose.CAUSE_NOTE}",
        plan=plan,
        op=op,
    )


def _is_dispatch_failure(exc: BaseException) -> bool:
    """Whether the exporter found no ONNX translation for an op (rather than failing inside one)."""
    return any(type(e).__name__ == "DispatchError" or "No ONNX function found" in str(e) for e in chain(exc))
