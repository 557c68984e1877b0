"""What a plan's bytes say about it, read without torch or onnx, and the bounded line ``repr(plan)`` shows.

A worker-only install (onnxruntime, numpy) must be able to load and inspect a plan, so this reads the
few protobuf fields it needs (metadata, initializer names and dims) straight off the wire format, never
touching tensor payloads. Callers pass bytes that :func:`planwire.transport.plancheck.check_model` has
accepted or that planwire itself exported; malformed input raises ValueError.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from planwire.transport.protowire import varint as _varint
from planwire.transport.review import human_bytes
from planwire.transport.spec import META_STATE, PlanVariant, TensorSpec

STATE_ROLES = frozenset({"param", "frozen", "buffer"})  # training-plan inputs that hold model state
OPTIM_ROLE = "optim"
MAX_PORTS = 4  # ports listed in a summary before "+N more"

# ONNX field numbers (onnx.proto): ModelProto.graph, .metadata_props; GraphProto.initializer;
# TensorProto.dims, .name; StringStringEntryProto.key, .value
_MODEL_GRAPH, _MODEL_META, _GRAPH_INIT, _TENSOR_DIMS, _TENSOR_NAME = 7, 14, 5, 1, 8


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
    """Metadata and initializer sizes of serialized ONNX ``data``."""
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    metadata: dict[str, str] = {}
    initializers: dict[str, int] = {}
    for field, start, end in _fields(buf, 0, len(buf)):
        if field == _MODEL_META and end >= 0:
            entry = {f: bytes(buf[s:e]).decode("utf-8", "replace") for f, s, e in _fields(buf, start, end) if e >= 0}
            metadata[entry.get(1, "")] = entry.get(2, "")
        elif field == _MODEL_GRAPH and end >= 0:
            for gfield, gstart, gend in _fields(buf, start, end):
                if gfield == _GRAPH_INIT and gend >= 0:
                    name, dims = _tensor(buf, gstart, gend)
                    initializers[name] = math.prod(dims)
    return ModelFacts(metadata, initializers)


def _tensor(buf: bytes | memoryview, start: int, end: int) -> tuple[str, list[int]]:
    name, dims = "", []
    for field, s, e in _fields(buf, start, end):
        if field == _TENSOR_DIMS:
            if e < 0:  # unpacked varint: s is the value
                dims.append(s)
            else:
                pos = s
                while pos < e:
                    value, pos = _varint(buf, pos)
                    dims.append(value)
        elif field == _TENSOR_NAME and e >= 0:
            name = bytes(buf[s:e]).decode("utf-8", "replace")
    return name, dims


def _fields(buf: bytes | memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field; (field, value, -1) for varints."""
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, value, -1
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("malformed ONNX model: field runs past its message")
            yield field, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"malformed ONNX model: wire type {wire}")


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
