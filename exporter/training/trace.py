"""Tracing a Python function over tensors (gradients included) into a flat aten graph.

``make_fx`` traces the function, ``torch.func`` transforms and all: autograd runs during tracing, so the
backward pass is recorded as ordinary ops. :func:`training_decompositions` rewrites the backward ops
that have no ONNX translation. Only the dimensions named as dynamic are symbolic (every other size is
static); :mod:`.graph_export` then turns the graph into a standard-op ONNX model. While tracing, nodes
are tagged with the module that produced them (:mod:`.attribution`) and a few functionals are swapped
for traceable equivalents (:mod:`.functionals`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import sympy
import torch
import torch.fx.traceback as fx_traceback
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from planwire.exporter import diagnose
from planwire.exporter.errors import PlanBuildError, TrainingExportError, first_line
from planwire.exporter.torch_compat import EXPORT_LOCK
from planwire.exporter.training.attribution import ModuleTagger
from planwire.exporter.training.decompositions import training_decompositions
from planwire.exporter.training.functionals import traceable_functionals
from planwire.exporter.training.rewrites import mask_before_unpool

__all__ = ["TrainingExportError", "fake_inputs", "port_shape", "trace", "unify_axes"]


def fake_inputs(examples: Sequence[Tensor], dims: Sequence[Mapping[int, str]]) -> list[Tensor]:
    """Fake copies of ``examples`` in which exactly the axes in ``dims[i]`` are symbolic.

    No duck sizing: two dynamic axes share a symbol only when the traced code proves them equal, and no
    static size can be mistaken for a dynamic one because it happens to have the same example value.
    """
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    fakes = []
    for i, (t, axes) in enumerate(zip(examples, dims, strict=True)):
        sizes = [DimDynamic.DYNAMIC if a in axes else DimDynamic.STATIC for a in range(t.dim())]
        context = StatelessSymbolicContext(dynamic_sizes=sizes)
        source = torch._dynamo.source.LocalSource(f"input{i}")
        fakes.append(mode.from_tensor(t, symbolic_context=context, source=source))
    return fakes


def trace(
    fn: Callable[..., object],
    examples: Sequence[Tensor],
    dims: Sequence[Mapping[int, str]],
    *,
    plan: str,
    tagger: ModuleTagger | None = None,
) -> torch.fx.GraphModule:
    """``make_fx`` of ``fn(*examples)`` with the training decompositions and symbolic ``dims`` only."""
    tagger = tagger or ModuleTagger(None)
    fakes = fake_inputs(examples, dims)
    try:
        with (
            EXPORT_LOCK,
            fx_traceback.preserve_node_meta(),
            tagger.active(),
            traceable_functionals(),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            gm = make_fx(fn, decomposition_table=training_decompositions(), tracing_mode="symbolic")(*fakes)
            mask_before_unpool(gm)
            return gm
    except (TypeError, ValueError, PlanBuildError):
        raise
    except Exception as e:
        where = f" in {tagger.failed_in}" if tagger.failed_in else ""
        if diagnose.is_data_dependent(e):
            raise TrainingExportError(
                diagnose.data_dependent_message(plan, e, what=f"could not be traced{where}"),
                plan=plan,
                module=tagger.failed_in,
            ) from e
        raise TrainingExportError(
            f"plan {plan!r}: tracing the step failed{where}: {type(e).__name__}: {first_line(e)}",
            plan=plan,
            module=tagger.failed_in,
        ) from e


def unify_axes(
    gm: torch.fx.GraphModule, dims: Sequence[Mapping[int, str]]
) -> tuple[list[dict[int, str]], dict[sympy.Symbol, str]]:
    """Input axis names after tracing, and each dynamic symbol's name.

    Axes the traced code proved equal (a batch axis of inputs and targets) share one symbol; they all
    take the name of the first such axis, the name the ONNX graph will show.
    """
    symbols: dict[sympy.Symbol, str] = {}
    named: list[dict[int, str]] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, axes in zip(placeholders, dims, strict=False):
        renamed = {}
        for axis, name in axes.items():
            size = node.meta["val"].shape[axis]
            if isinstance(size, torch.SymInt):
                expr = size.node.shape_env.replace(size.node.expr)
                if isinstance(expr, sympy.Symbol):
                    name = symbols.setdefault(expr, name)
            renamed[axis] = name
        named.append(renamed)
    return named, symbols


def port_shape(value: Tensor, symbols: Mapping[sympy.Symbol, str]) -> tuple[int | str, ...]:
    """Shape of a traced value: static sizes, and dynamic ones written with the input axis names."""
    shape: list[int | str] = []
    for size in value.shape:
        if not isinstance(size, torch.SymInt):
            shape.append(int(size))
            continue
        expr = size.node.shape_env.replace(size.node.expr)
        if expr.is_number:
            shape.append(int(expr))
        else:
            shape.append(str(expr.subs({s: sympy.Symbol(n) for s, n in symbols.items()})))
    return tuple(shape)
