"""One pipeline from a Python function over tensors (gradients included) to ONNX bytes.

``make_fx`` traces the function, ``torch.func`` transforms and all, into a flat aten graph: autograd
runs during tracing, so the backward pass is recorded as ordinary ops. :func:`training_decompositions`
rewrites the backward ops that have no ONNX translation. Only the dimensions named as dynamic are
symbolic (every other size is static), and ``torch.export`` + ``torch.onnx.export`` then turn the graph
into a standard-op ONNX model whose dynamic axes are symbolic.

Two details that matter for correctness:

* Each graph node is tagged with the module (path in the model) whose forward produced it, backward
  nodes included (through hooks on the autograd nodes), so an op without an ONNX translation is
  reported with the layer that emitted it.
* :func:`traceable_functionals` swaps dropout, 3-d linear and scaled-dot-product attention for
  equivalents that trace with a symbolic batch and export; dropout then becomes ``rand_like`` (ONNX
  ``RandomUniformLike``), drawing a fresh mask on every run of the plan.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxscript
import sympy
import torch
import torch.fx.traceback as fx_traceback
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from planwire.exporter import cache, diagnose, progress
from planwire.exporter import export as _export_module
from planwire.exporter.errors import PlanBuildError
from planwire.exporter.export import OPSET, check_exported, failing_op
from planwire.exporter.fingerprint import source_of, tensor_digest
from planwire.exporter.registry import cached_registry
from planwire.exporter.training.decompositions import ONNX_TRANSLATIONS, training_decompositions
from planwire.exporter.training.rewrites import mask_before_unpool
from planwire.exporter.verify import RANDOM_OPS, compare
from planwire.transport import spec as wire
from planwire.transport.dtypes import to_wire
from planwire.transport.spec import PlanVariant, TensorSpec

# The exporter is not thread-safe and the registry patch is process-wide: share export.py's lock.
_EXPORT_LOCK = getattr(_export_module, "_export_lock", None) or threading.RLock()
_MODULE_KEY = "planwire.module"  # node.meta["custom"] key: module path that produced the node


class VariantView:
    """Names and bytes of a built step, read off its ``variant`` (shared by training and function steps)."""

    variant: PlanVariant

    @property
    def data(self) -> bytes:
        """The ONNX bytes of the plan."""
        return self.variant.data

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.variant.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.variant.outputs)


class TrainingExportError(PlanBuildError):
    """A training or gradient plan could not be built; ``op`` and ``module`` name the culprit if known."""

    def __init__(self, message: str, *, plan: str, op: str | None = None, module: str | None = None) -> None:
        super().__init__(message, plan=plan, op=op)
        self.module = module


@dataclass(frozen=True)
class Port:
    """One graph input or output: its name, role, dtype and shape (a str is a dynamic axis' name)."""

    name: str
    role: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]
    binds: str | None = None  # for outputs: the input this output replaces on the next call

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, wire_dtype(self.dtype), tuple(self.shape), self.role)

    def meta(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "name": self.name,
            "role": self.role,
            "dtype": wire_dtype(self.dtype),
            "shape": list(self.shape),
        }
        if self.binds is not None:
            entry["binds"] = self.binds
        return entry


def wire_dtype(dtype: torch.dtype) -> str:
    """The wire (ONNX) name of a torch dtype."""
    return to_wire(torch.empty((), dtype=dtype).numpy().dtype)


# ----------------------------------------------------------------------------------------------------
# Functionals that do not trace (or export) as they are


def _dropout(x: Tensor, p: float, training: bool, feature: bool) -> Tensor:
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    if not feature or x.dim() < 2:
        return torch.ops.aten.native_dropout(x, p, True)[0]
    # channel dropout: one scaled keep/drop factor per (sample, channel), as torch's feature_dropout
    ones = torch.ones(*x.shape[:2], *([1] * (x.dim() - 2)), dtype=x.dtype, device=x.device)
    return x * torch.ops.aten.native_dropout(ones, p, True)[0]


def _dropout_fn(feature: bool) -> Callable[..., Tensor]:
    def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        return _dropout(input, p, training, feature)

    return dropout


def _linear_fn(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if input.dim() < 3 or bias is None:
            return original(input, weight, bias)
        out = original(input.reshape(-1, input.shape[-1]), weight, bias)
        return out.reshape(*input.shape[:-1], out.shape[-1])

    return linear


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` in plain ops (its documented reference implementation)."""
    length, source = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = _dropout(scores.softmax(-1), dropout_p, True, False)
    return weights @ value


@contextlib.contextmanager
def traceable_functionals() -> Iterator[None]:
    """Swap a few ``torch.nn.functional`` entries for equivalents that trace and export, while tracing.

    * ``dropout``/``dropout1d/2d/3d`` -> ``native_dropout``: the composite ``aten.dropout`` reads the
      numel as an int under a ``torch.func`` transform and fails with a symbolic batch.
    * ``linear`` on inputs of 3+ dims -> a 2-d linear between reshapes: aten's fused path reads the
      sizes as ints and silently fixes the batch axis to its traced size.
    * ``scaled_dot_product_attention`` -> plain ops: the fused kernels' backward ops do not export.

    The module attributes are swapped (not a TorchFunctionMode) so that functionals calling these by
    their global name (``multi_head_attention_forward``) get them too. Same math, so other threads
    calling them meanwhile are unaffected in substance; callers hold the export lock.
    """
    swaps = {
        "dropout": _dropout_fn(False),
        "dropout1d": _dropout_fn(True),
        "dropout2d": _dropout_fn(True),
        "dropout3d": _dropout_fn(True),
        "linear": _linear_fn(F.linear),
        "scaled_dot_product_attention": _attention,
    }
    saved = {name: getattr(F, name) for name in swaps}
    try:
        for name, fn in swaps.items():
            setattr(F, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


# ----------------------------------------------------------------------------------------------------
# Which module produced which node


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


# ----------------------------------------------------------------------------------------------------
# Tracing


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
            _EXPORT_LOCK,
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
            f"plan {plan!r}: tracing the step failed{where}: {type(e).__name__}: {_first_line(e)}",
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


def _root_cause(e: BaseException) -> str:
    """The innermost exception of the chain, first line: what went wrong, without exporter advice."""
    seen: set[int] = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else ""


# ----------------------------------------------------------------------------------------------------
# Unsupported ops


def _onnx_registry() -> object:
    with cached_registry():
        from torch.onnx._internal.exporter import _registration

        return _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)


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
    registry = _onnx_registry()
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
    cause = _root_cause(error)
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


# ----------------------------------------------------------------------------------------------------
# Export


def export_graph(
    gm: torch.fx.GraphModule,
    examples: Sequence[Tensor],
    inputs: Sequence[Port],
    outputs: Sequence[Port],
    *,
    plan: str,
    kind: str,
    extra_meta: Mapping[str, object] | None = None,
    check: Callable[[PlanVariant, onnx.ModelProto], None] | None = None,
) -> tuple[PlanVariant, onnx.ModelProto]:
    """Export a traced graph to a :class:`PlanVariant` with planwire metadata and named dynamic axes.

    This is the one place that calls the ONNX exporter for training plans (with the process-wide cached
    torchlib registry of :mod:`planwire.exporter.registry`). The exported bytes are cached
    (:mod:`planwire.exporter.cache`) under the traced graph's code and constants, so rebuilding the same
    step skips the export; names and metadata are applied after the cache. ``check`` (the build's
    verification) runs before anything is cached; a cached entry that fails it is dropped and exported
    afresh.
    """
    dynamic = [{a: d for a, d in enumerate(p.shape) if isinstance(d, str)} for p in inputs]
    key = _cache_key(gm, inputs, outputs)
    finish = (inputs, outputs, dynamic, plan, kind, extra_meta, check)
    data = cache.get(key)
    if data is not None:
        try:
            return _finish(onnx.load_from_string(data), *finish)
        except PlanBuildError:
            cache.discard(key)
    data = _export(gm, examples, inputs, outputs, dynamic, plan=plan).SerializeToString()
    result = _finish(onnx.load_from_string(data), *finish)
    cache.put(key, data)
    return result


def _finish(
    proto: onnx.ModelProto,
    inputs: Sequence[Port],
    outputs: Sequence[Port],
    dynamic: Sequence[Mapping[int, str]],
    plan: str,
    kind: str,
    extra_meta: Mapping[str, object] | None,
    check: Callable[[PlanVariant, onnx.ModelProto], None] | None,
) -> tuple[PlanVariant, onnx.ModelProto]:
    """Name the dynamic axes, check the graph's hygiene, write the metadata, run ``check``."""
    _name_dynamic_axes(proto, inputs, outputs)
    check_exported(proto, plan=plan, input_names=[p.name for p in inputs], dynamic=[set(d) for d in dynamic])
    meta = {
        wire.META_NAME: plan,
        wire.META_FORMAT: "1",
        wire.META_KIND: kind,
        wire.META_INPUTS: json.dumps([p.meta() for p in inputs]),
        wire.META_OUTPUTS: json.dumps([p.meta() for p in outputs]),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_meta or {}).items()},
    }
    del proto.metadata_props[:]
    for name, value in meta.items():
        proto.metadata_props.add(key=name, value=value)
    variant = PlanVariant(proto.SerializeToString(), tuple(p.spec() for p in inputs), tuple(p.spec() for p in outputs))
    if check is not None:
        progress.stage("verify")
        check(variant, proto)
    return variant, proto


def _export(
    gm: torch.fx.GraphModule,
    examples: Sequence[Tensor],
    inputs: Sequence[Port],
    outputs: Sequence[Port],
    dynamic: Sequence[Mapping[int, str]],
    *,
    plan: str,
) -> onnx.ModelProto:
    """``torch.export`` (dynamic axes as ``Dim.DYNAMIC``) then ``torch.onnx.export`` of the program."""
    shapes = tuple({a: torch.export.Dim.DYNAMIC for a in axes} or None for axes in dynamic)
    progress.stage("export")
    try:
        with _EXPORT_LOCK, cached_registry(), warnings.catch_warnings(), diagnose.quiet_exporter():
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
    return proto


def tidy_max_pools(proto: onnx.ModelProto) -> int:
    """Remove the ``Indices`` output of every ``MaxPool`` that nothing reads, then let a MaxPool that
    computes indices also serve a one-output MaxPool of the same input and attributes; returns how
    many outputs and nodes went.

    The tiled max-pool backward (``decompositions.max_pool2d_backward_onnx``) pools the forward's input
    again for its indices, while the forward's MaxPool keeps an Indices output nothing reads. onnxruntime
    runs a MaxPool with an Indices output in a generic kernel, several times slower than its one-output
    kernel, and one pool is cheaper than two.
    """
    graph = proto.graph
    graphs = [graph]
    for g in graphs:  # every (sub)graph, for the names it reads
        for node in g.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else attr.graphs)
    used = {o.name for o in graph.output} | {i for g in graphs for node in g.node for i in node.input}
    changed = 0
    pools = [n for n in graph.node if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx")]
    for node in pools:
        if len(node.output) == 2 and node.output[1] and node.output[1] not in used:
            del node.output[1]
            changed += 1

    def signature(node: onnx.NodeProto) -> tuple:
        attrs = sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)
        return node.domain, tuple(node.input), tuple(attrs)

    if len(graphs) > 1:  # a graph with subgraphs keeps both pools: names would need renaming there too
        return changed
    outputs = {o.name for o in graph.output}
    while True:
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
        pools = {i: n for i, n in enumerate(nodes) if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx")}
        with_indices = {signature(n): i for i, n in pools.items() if len(n.output) == 2 and n.output[0]}
        pair = next(
            (
                (i, with_indices[signature(n)])
                for i, n in pools.items()
                if len(n.output) == 1 and n.output[0] not in outputs and signature(n) in with_indices
            ),
            None,
        )
        if pair is None:
            return changed
        at, other = pair
        old, new = nodes[at].output[0], nodes[other].output[0]
        for user in nodes:
            user.input[:] = [new if name == old else name for name in user.input]
        if other > at:  # its only input is the same, so it may run where the one-output pool ran
            nodes[at] = nodes.pop(other)
        else:
            del nodes[at]
        del graph.node[:]
        graph.node.extend(nodes)
        kept = [v for v in graph.value_info if v.name != old]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        changed += 1


def _cache_key(gm: torch.fx.GraphModule, inputs: Sequence[Port], outputs: Sequence[Port]) -> str:
    """The traced graph's code and constants, the ports and library versions: what the export reads."""
    constants = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, Tensor):
                constants.append((node.target, tensor_digest(value)))
    versions = [torch.__version__, onnx.__version__, onnxscript.__version__, OPSET, _translations_source()]
    ports = [[p.meta() for p in inputs], [p.meta() for p in outputs]]
    return cache.make_key("training-graph/2", gm.code, constants, ports, versions)


@functools.cache
def _translations_source() -> str:
    """The code that shapes the exported graph beyond ``gm.code``: the custom ONNX translations and the
    post-export pass (an edited translation must not be served a stale cached export)."""
    return "\n".join(source_of(fn) for fn in [*ONNX_TRANSLATIONS.values(), tidy_max_pools])


def verify(
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
    import onnxruntime as ort

    session = ort.InferenceSession(variant.data, providers=["CPUExecutionProvider"])
    got = session.run(None, dict(feeds))
    want = [t.detach().cpu().numpy() for t in expected]
    names = [s.name for s in variant.outputs]
    compare(got, want, plan=plan, names=names, values=not random, what=" (build check vs eager torch)")


def has_random_ops(proto: onnx.ModelProto) -> bool:
    """Whether the graph draws random numbers (its outputs then differ from eager torch's)."""
    return any(node.op_type in RANDOM_OPS for node in proto.graph.node)


def _name_dynamic_axes(proto: onnx.ModelProto, inputs: Sequence[Port], outputs: Sequence[Port]) -> None:
    """Give the graph's dynamic dims the plan's axis names (the exporter writes ``s0``, ``2*s0``...).

    Graph inputs and outputs take their port's names verbatim; intermediate values are renamed through
    the symbols the inputs define.
    """
    rename: dict[str, str] = {}
    for values, ports in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
        for value, port in zip(values, ports, strict=True):
            for dim, want in zip(value.type.tensor_type.shape.dim, port.shape, strict=False):
                if isinstance(want, str) and not dim.HasField("dim_value"):
                    if values is proto.graph.input and dim.dim_param:
                        rename.setdefault(dim.dim_param, want)
                    dim.dim_param = want
    for value in proto.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
