"""A traced graph (:mod:`.trace`) to a verified plan variant, through the one build driver.

:func:`export_traced` is the one place that calls the ONNX exporter on traced graphs: ``torch.export``
(dynamic axes as ``Dim.DYNAMIC``), ``torch.onnx.export`` with the training translations, then the
graph passes (max-pool tidying, guarded mask multiplies for zero selects, merged Slices, Transposes
read by Gemm, debug info, axis names) and
the hygiene check. :func:`export_graph` builds a variant from it with
:func:`planwire.exporter.build.build_variant`: cached under the traced graph's code and constants
(:func:`graph_key`), so rebuilding the same step skips the export, and stamped with each plan's own name
and metadata.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor

from planwire.exporter import cache, diagnose, metadata, progress
from planwire.exporter.build import build_variant, cache_key
from planwire.exporter.export import OPSET
from planwire.exporter.fingerprint import source_of, tensor_digest
from planwire.exporter.onnx_passes import check_exported, name_dynamic_axes, strip_debug_info, tidy_max_pools
from planwire.exporter.torch_compat import EXPORT_LOCK, cached_registry
from planwire.exporter.training.attribution import explain_failure
from planwire.exporter.training.decompositions import ONNX_TRANSLATIONS
from planwire.exporter.training.graph_passes import (
    GRAPH_PASSES,
    guard_zero_selects,
    leading_sums_as_products,
    merge_slices,
    transposes_into_gemm,
)
from planwire.exporter.training.specs import TorchSpec
from planwire.exporter.verify import verify_variant
from planwire.transport.spec import PlanVariant

Check = Callable[[PlanVariant, onnx.ModelProto], None]


def export_graph(
    gm: torch.fx.GraphModule,
    examples: Sequence[Tensor],
    inputs: Sequence[TorchSpec],
    outputs: Sequence[TorchSpec],
    *,
    plan: str,
    kind: str,
    extra_meta: Mapping[str, object] | None = None,
    check: Check | None = None,
) -> tuple[PlanVariant, onnx.ModelProto]:
    """Export a traced graph to a :class:`PlanVariant` with planwire metadata and named dynamic axes.

    ``check`` (the build's verification) runs before anything is cached; a cached entry that fails it
    is dropped and exported afresh.
    """
    specs_in, specs_out = tuple(p.spec() for p in inputs), tuple(p.spec() for p in outputs)
    binds = {p.name: p.binds for p in outputs if p.binds}

    def stamp(proto: onnx.ModelProto) -> bytes:
        return metadata.stamp(
            proto, name=plan, kind=kind, inputs=specs_in, outputs=specs_out, binds=binds, extra=extra_meta
        )

    def verify(data: bytes, proto: onnx.ModelProto) -> tuple[PlanVariant, onnx.ModelProto]:
        variant = PlanVariant(data, specs_in, specs_out)
        if check is not None:
            check(variant, proto)
        return variant, proto

    return build_variant(
        graph_key(gm, inputs, outputs),
        export=lambda: export_traced(gm, examples, inputs, outputs, plan=plan),
        stamp=stamp,
        verify=verify,
    )


def export_traced(
    gm: torch.fx.GraphModule,
    examples: Sequence[Tensor],
    inputs: Sequence[TorchSpec],
    outputs: Sequence[TorchSpec],
    *,
    plan: str,
) -> onnx.ModelProto:
    """``torch.export`` then ``torch.onnx.export`` of a traced graph; ports and dynamic axes named."""
    dynamic = [{a for a, d in enumerate(p.shape) if isinstance(d, str)} for p in inputs]
    shapes = tuple({a: torch.export.Dim.DYNAMIC for a in sorted(axes)} or None for axes in dynamic)
    progress.stage("export")
    try:
        with EXPORT_LOCK, cached_registry(), warnings.catch_warnings(), diagnose.quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.export.export(gm, tuple(examples), dynamic_shapes=shapes, strict=False)
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                verbose=False,
                opset_version=OPSET,
                input_names=[p.name for p in inputs],
                output_names=[p.name for p in outputs],
                custom_translation_table=dict(ONNX_TRANSLATIONS),
            )
    except Exception as e:
        raise explain_failure(gm, e, plan=plan) from e
    cache.stats.exports += 1
    proto = onnx_program.model_proto
    tidy_max_pools(proto)
    guard_zero_selects(proto)  # after tidy_max_pools, which leaves graphs with subgraphs as they are
    merge_slices(proto)
    transposes_into_gemm(proto)
    leading_sums_as_products(proto)
    strip_debug_info(proto)
    name_dynamic_axes(proto, [p.shape for p in inputs], [p.shape for p in outputs])
    check_exported(proto, plan=plan, input_names=[p.name for p in inputs], dynamic=dynamic)
    return proto


def graph_key(gm: torch.fx.GraphModule, inputs: Sequence[TorchSpec], outputs: Sequence[TorchSpec]) -> str:
    """The traced graph's code and constants, the ports and the code of the translations: what the
    export reads."""
    constants = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, Tensor):
                constants.append((node.target, tensor_digest(value)))
    ports = [[p.meta() for p in inputs], [p.meta() for p in outputs]]
    return cache_key("traced-graph", gm.code, constants, ports, translations_source())


@functools.cache
def translations_source() -> str:
    """The code that shapes the exported graph beyond ``gm.code``: the custom ONNX translations and the
    post-export passes (an edited translation must not be served a stale cached export)."""
    return "\n".join(source_of(fn) for fn in [*ONNX_TRANSLATIONS.values(), tidy_max_pools, *GRAPH_PASSES])


def verify_once(
    variant: PlanVariant,
    feeds: Mapping[str, np.ndarray],
    expected: Sequence[Tensor],
    *,
    plan: str,
    random: bool,
) -> None:
    """Run the plan once in onnxruntime; PlanBuildError unless it matches eager torch's ``expected``.

    Eager torch differentiates with its own autograd kernels, so this checks the decompositions and the
    ONNX translation of the gradient, not just the forward. Plans with random ops (dropout) are checked
    for output dtypes and shapes only.
    """
    arrays = [np.asarray(feeds[s.name]) for s in variant.inputs]
    want = [t.detach().cpu().numpy() for t in expected]
    verify_variant(variant, [(arrays, want)], plan=plan, random=random, what=" (build check vs eager torch)")
