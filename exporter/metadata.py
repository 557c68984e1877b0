"""What a plan's ONNX file says about itself: typed ports from the graph, planwire ``metadata_props``.

Ports are always read from the graph (what onnxruntime will enforce); the metadata repeats them as JSON
with roles, plus the plan's name, kind and state initializers, so a worker or a plain ``onnx.load`` can
describe the plan without planwire's Python objects. Building plans uses the onnx package;
:func:`read_session` describes a loaded plan with onnxruntime alone (a worker-only install).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planwire.transport.dtypes import WIRE_TO_NUMPY, from_ort
from planwire.transport.spec import (
    META_FORMAT,
    META_INPUTS,
    META_KIND,
    META_NAME,
    META_OUTPUTS,
    META_STATE,
    Dim,
    TensorSpec,
)

if TYPE_CHECKING:
    import onnx
    import onnxruntime

FORMAT = "1"
INPUT_ROLE = "arg"
OUTPUT_ROLE = "output"


@dataclass(frozen=True)
class PlanMetadata:
    """Everything the bytes of one plan variant say about it."""

    name: str
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: tuple[str, ...]


def _spec(value: onnx.ValueInfoProto, role: str) -> TensorSpec:
    import onnx

    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ValueError(f"plan port {value.name!r} is not a tensor")
    wire = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    if wire not in WIRE_TO_NUMPY:
        raise ValueError(f"plan port {value.name!r} has unsupported element type {wire}")
    dims: list[Dim] = []
    for d in tensor.shape.dim:
        dims.append(d.dim_param if d.dim_param else d.dim_value if d.HasField("dim_value") else None)
    return TensorSpec(value.name, wire, tuple(dims), role)


def ports(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the graph; initializers listed as inputs (old exporters) are not ports."""
    roles = {**_roles(model, META_INPUTS), **_roles(model, META_OUTPUTS)}
    init = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v, roles.get(v.name, INPUT_ROLE)) for v in model.graph.input if v.name not in init)
    outputs = tuple(_spec(v, roles.get(v.name, OUTPUT_ROLE)) for v in model.graph.output)
    return inputs, outputs


def _roles(model: onnx.ModelProto, key: str) -> dict[str, str]:
    return _json_roles({p.key: p.value for p in model.metadata_props}.get(key))


def _json_roles(raw: str | None) -> dict[str, str]:
    try:
        return {e["name"]: str(e["role"]) for e in json.loads(raw)} if raw else {}
    except (ValueError, TypeError, KeyError):
        return {}


def _json_ports(specs: Iterable[TensorSpec], binds: Mapping[str, str]) -> str:
    entries = []
    for s in specs:
        shape = ["?" if d is None else d for d in s.shape]
        entry: dict[str, object] = {"name": s.name, "role": s.role, "dtype": s.dtype, "shape": shape}
        if s.name in binds:
            entry["binds"] = binds[s.name]
        entries.append(entry)
    return json.dumps(entries)


def stamp(
    model: onnx.ModelProto,
    *,
    name: str,
    kind: str,
    state: Sequence[str] = (),
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
    binds: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> bytes:
    """Write planwire metadata (replacing any) into ``model`` and serialize it deterministically.

    The one writer of plan metadata, for every kind of plan. Ports are the graph's unless ``inputs``/
    ``outputs`` give them with their roles; ``binds`` maps an output to the input it replaces on the next
    call (training steps); ``extra`` adds planwire keys (a str, or a value written as JSON).
    """
    if inputs is None or outputs is None:
        graph_inputs, graph_outputs = ports(model)
        inputs = graph_inputs if inputs is None else inputs
        outputs = graph_outputs if outputs is None else outputs
    present = {t.name for t in model.graph.initializer}
    props = {
        META_NAME: name,
        META_FORMAT: FORMAT,
        META_KIND: kind,
        META_INPUTS: _json_ports(inputs, {}),
        META_OUTPUTS: _json_ports(outputs, binds or {}),
        META_STATE: json.dumps([s for s in state if s in present]),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()},
    }
    kept = [p for p in model.metadata_props if not p.key.startswith("planwire.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.graph.name = re.sub(r"\W", "_", name) or "plan"
    return model.SerializeToString(deterministic=True)


def read(model: onnx.ModelProto, *, default_name: str = "plan") -> PlanMetadata:
    """PlanMetadata of a model; a plain ONNX model (no planwire metadata) reads as a nameless function plan."""
    return _info({p.key: p.value for p in model.metadata_props}, ports(model), default_name)


def read_session(
    session: onnxruntime.InferenceSession, meta: dict[str, str], *, default_name: str = "plan"
) -> PlanMetadata:
    """PlanMetadata from an onnxruntime session of the plan (its ports) and its ``metadata_props``: no onnx."""
    roles = {**_json_roles(meta.get(META_INPUTS)), **_json_roles(meta.get(META_OUTPUTS))}

    def spec(port: onnxruntime.NodeArg, default_role: str) -> TensorSpec:
        wire = from_ort(port.type)
        if not port.type.startswith("tensor(") or wire not in WIRE_TO_NUMPY:
            raise ValueError(f"plan port {port.name!r} has unsupported type {port.type}")
        dims = tuple(d if isinstance(d, int | str) else None for d in port.shape)
        return TensorSpec(port.name, wire, dims, roles.get(port.name, default_role))

    inputs = tuple(spec(p, INPUT_ROLE) for p in session.get_inputs())
    outputs = tuple(spec(p, OUTPUT_ROLE) for p in session.get_outputs())
    return _info(meta, (inputs, outputs), default_name)


def _info(
    meta: dict[str, str], io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]], default_name: str
) -> PlanMetadata:
    fmt = meta.get(META_FORMAT)
    if fmt is not None and fmt != FORMAT:
        raise ValueError(f"plan format {fmt!r} is not supported (this planwire reads format {FORMAT!r})")
    inputs, outputs = io
    try:
        state = tuple(json.loads(meta.get(META_STATE, "[]")))
    except ValueError:
        raise ValueError(f"bad {META_STATE} metadata: {meta[META_STATE]!r}") from None
    name = meta.get(META_NAME) or default_name
    return PlanMetadata(name, meta.get(META_KIND, "function"), inputs, outputs, state)
