"""What a plan's bytes say about it, read without torch or onnx, and the bounded line ``repr(plan)`` shows.

A worker-only install (onnxruntime, numpy) must be able to load and inspect a plan, so this reads the
few protobuf fields it needs (metadata, initializer names and dims) straight off the wire format with the
plan checker's reader (:mod:`planwire.transport.onnxproto`), never touching tensor payloads. Callers pass
bytes that :func:`planwire.transport.plancheck.check_model` has accepted or that planwire itself
exported; malformed input raises ValueError.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from planwire.transport.onnxproto import (
    GRAPH_INITIALIZERS,
    MODEL_FACTS,
    SSE_KEEP,
    TENSOR_NAME_DIMS,
    PlanRejected,
    Reader,
)
from planwire.transport.review import human_bytes
from planwire.transport.spec import META_STATE, PlanVariant, TensorSpec

STATE_ROLES = frozenset({"param", "frozen", "buffer"})  # training-plan inputs that hold model state
OPTIM_ROLE = "optim"
MAX_PORTS = 4  # ports listed in a summary before "+N more"


@dataclass(frozen=True)
class ModelFacts:
    """Metadata and initializer sizes (element counts by name) of one ONNX model."""

    metadata: dict[str, str]
    initializers: dict[str, int]

    def state_size(self, inputs: Sequence[TensorSpec] = ()) -> int:
        """Elements of plan state: the initializers named in ``planwire.state``, plus the model-state
        inputs (params, frozen, buffers) of a training plan, whose shapes are static."""
        try:
            names = json.loads(self.metadata.get(META_STATE, "[]"))
        except ValueError:
            names = []
        total = sum(self.initializers.get(n, 0) for n in names if isinstance(n, str))
        for spec in inputs:
            if spec.role in STATE_ROLES and all(isinstance(d, int) for d in spec.shape):
                total += math.prod(spec.shape)  # type: ignore[arg-type]
        return total


_facts: OrderedDict[str, ModelFacts] = OrderedDict()
_FACTS_KEPT = 64


def facts(variant: PlanVariant) -> ModelFacts:
    """:func:`read_model` of a variant, remembered by its id (repr of a plan must stay cheap)."""
    found = _facts.get(variant.id)
    if found is None:
        found = _facts[variant.id] = read_model(variant.data)
        while len(_facts) > _FACTS_KEPT:
            _facts.popitem(last=False)
    return found


def read_model(data: bytes | memoryview) -> ModelFacts:
    """Metadata and initializer sizes of serialized ONNX ``data`` (ValueError if malformed)."""
    reader = Reader(memoryview(data).cast("B") if not isinstance(data, bytes) else data)
    metadata: dict[str, str] = {}
    initializers: dict[str, int] = {}
    try:
        model = reader.scan((0, len(reader.buf)), 0, MODEL_FACTS)
        for span in model.get(14, ()):
            entry = reader.scan(span, 1, SSE_KEEP)
            metadata[reader.utf8(entry.get(1))] = reader.utf8(entry.get(2))
        for graph in model.get(7, ()):
            for span in reader.scan(graph, 1, GRAPH_INITIALIZERS).get(5, ()):
                tensor = reader.scan(span, 2, TENSOR_NAME_DIMS)
                initializers[reader.utf8(tensor.get(8))] = math.prod(reader.ints(tensor.get(1, []), "dims"))
    except PlanRejected as e:
        raise ValueError(f"malformed ONNX model: {str(e).removeprefix('malformed plan: ')}") from None
    return ModelFacts(metadata, initializers)


# -- the summary line -------------------------------------------------------------------------------


def ports(specs: Sequence[TensorSpec]) -> str:
    """Ports as ``x: float32[?, 3], ...``: at most MAX_PORTS listed, state and the rest counted."""
    shown = [s for s in specs if s.role not in STATE_ROLES and s.role != OPTIM_ROLE]
    state = len(specs) - len(shown)
    more = max(0, len(shown) - MAX_PORTS)
    parts = [str(s) for s in shown[:MAX_PORTS]]
    if more:
        parts.append(f"+{more} more")
    if state:
        parts.append(f"+{state} state")
    return ", ".join(parts)


def signature(variant: PlanVariant) -> str:
    """``(inputs) -> (outputs)`` of a variant, bounded."""
    return f"({ports(variant.inputs)}) -> ({ports(variant.outputs)})"


def line(type_name: str, name: str, variants: Sequence[PlanVariant], parameters: int) -> str:
    """``<Plan name id:… built (x: float32[?, 3]) -> (output: float32[?, 3]); 12 parameters, 1.1 KiB>``.

    Bounded whatever the model: ports are listed up to MAX_PORTS, weights never.
    """
    head = f"<{type_name} {name}"
    if not variants:
        return f"{head} not built>"
    first = variants[0]
    more = f" +{len(variants) - 1} variants" if len(variants) > 1 else ""
    size = human_bytes(sum(len(v.data) for v in variants))
    return f"{head} id:{first.id[:12]} built {signature(first)}; {parameters:,} parameters, {size}{more}>"
