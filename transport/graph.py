"""A plan's main graph as plain data, read from its bytes alone: inputs, outputs, declared types,
initializers (the values of small ones), nodes and metadata.

Pure Python over the protobuf wire format (transport/protowire.py): no ``onnx`` package, no copies of large
payloads. The plan has been checked by transport/plancheck.py before this reads it (bounded nesting and
sizes). Read by the cost estimate (transport/estimate.py) and the review (transport/review.py).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from planwire.transport import protowire as pw

# ONNX TensorProto.DataType -> (wire name, bytes per element)
ELEM_TYPES: dict[int, tuple[str, int]] = {
    1: ("float", 4),
    2: ("uint8", 1),
    3: ("int8", 1),
    4: ("uint16", 2),
    5: ("int16", 2),
    6: ("int32", 4),
    7: ("int64", 8),
    8: ("string", 8),
    9: ("bool", 1),
    10: ("float16", 2),
    11: ("double", 8),
    12: ("uint32", 4),
    13: ("uint64", 8),
    14: ("complex64", 8),
    15: ("complex128", 16),
    16: ("bfloat16", 2),
}
INT64, BOOL, FLOAT = 7, 9, 1  # element types the rules name
_RAW = {1: "<f", 2: "B", 3: "b", 4: "<H", 5: "<h", 6: "<i", 7: "<q", 9: "?", 11: "<d", 12: "<I", 13: "<Q"}
SMALL = 64  # elements of a constant tensor whose values are read (shape arithmetic), never its weights

Dims = tuple[int, ...]
Declared = tuple[int | str | None, ...]


@dataclass(frozen=True)
class Tensor:
    """An initializer or a constant attribute: element type, dims, and the values of small ones."""

    elem: int
    dims: Dims
    values: tuple | None = None


@dataclass(frozen=True)
class ValueType:
    """A declared tensor type: element type, dims (int, symbol, or None), None for an unknown rank."""

    elem: int
    dims: Declared | None


@dataclass(frozen=True)
class Node:
    op: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    subgraphs: bool
    graphs: tuple[Graph, ...] = ()
    """The graphs its attributes hold (``If`` branches, ``Loop``/``Scan`` bodies), in attribute order."""


@dataclass(frozen=True)
class Graph:
    """The main graph of a plan as plain data: ports, declared types, initializers, nodes, metadata (a subgraph,
    held by a node: its formal inputs, outputs, initializers and nodes, no metadata)."""

    inputs: dict[str, ValueType]
    """Runtime inputs in order (graph inputs that are not initializers)."""
    outputs: dict[str, ValueType]
    declared: dict[str, ValueType]
    initializers: dict[str, Tensor]
    nodes: list[Node]
    metadata: dict[str, str]
    functions: frozenset[tuple[str, str]] = frozenset()
    unread: frozenset[str] = frozenset()
    """Parts of the plan this reader does not model (``sparse_initializer``, ``training_info``, an input that is
    also an initializer): a rule that must see everything refuses a plan that has any."""


def read_graph(data: bytes | memoryview) -> Graph:
    """The :class:`Graph` of serialized ONNX ``data`` (ValueError if malformed)."""
    graph: memoryview | None = None
    metadata: dict[str, str] = {}
    functions: set[tuple[str, str]] = set()
    unread: set[str] = set()
    for num, v in pw.fields(data):
        if num == 20:
            unread.add("training_info")
        if num == 7 and isinstance(v, memoryview):
            graph = v
        elif num == 14 and isinstance(v, memoryview):
            entry = dict(pw.fields(v))
            metadata[pw.text(entry.get(1, b""))] = pw.text(entry.get(2, b""))
        elif num == 25 and isinstance(v, memoryview):
            f = dict(pw.fields(v))  # FunctionProto: name 1, domain 10
            functions.add((pw.text(f.get(10, b"")), pw.text(f.get(1, b""))))
    if graph is None:
        raise ValueError("not an ONNX model: no graph")
    g = _graph(graph)
    return Graph(
        g.inputs,
        g.outputs,
        g.declared,
        g.initializers,
        g.nodes,
        metadata,
        frozenset(functions),
        frozenset(unread | g.unread),
    )


def _graph(buf: memoryview) -> Graph:
    """A GraphProto's ports, declared types, initializers and nodes (their subgraphs read too, each with the
    parts it holds that this reader does not model in its own ``unread``: the main graph's say what it holds)."""
    unread: set[str] = set()
    inputs: list[tuple[str, ValueType]] = []
    outputs: dict[str, ValueType] = {}
    declared: dict[str, ValueType] = {}
    initializers: dict[str, Tensor] = {}
    nodes: list[Node] = []
    for num, v in pw.fields(buf):
        if not isinstance(v, memoryview):
            continue
        if num == 15:
            unread.add("sparse_initializer")
        if num == 1:
            nodes.append(_node(v))
        elif num == 5:
            name, tensor = _tensor(v)
            initializers[name] = tensor
        elif num in (11, 12, 13):
            name, vt = _value_info(v)
            declared[name] = vt
            if num == 11:
                inputs.append((name, vt))
            elif num == 12:
                outputs[name] = vt
    runtime_inputs = {n: t for n, t in inputs if n not in initializers}
    if len(runtime_inputs) < len(inputs):
        unread.add("an input that is also an initializer")
    return Graph(runtime_inputs, outputs, declared, initializers, nodes, {}, unread=frozenset(unread))


def _tensor(buf: memoryview) -> tuple[str, Tensor]:
    name, elem, dims = "", FLOAT, []
    raw: memoryview | None = None
    listed: list = []
    for num, v in pw.fields(buf):
        if num == 1:
            dims += pw.ints(v)
        elif num == 2 and isinstance(v, int):
            elem = v
        elif num == 8:
            name = pw.text(v)
        elif num == 9 and isinstance(v, memoryview):
            raw = v
        elif num == 4:
            listed += pw.floats(v)
        elif num in (5, 7):
            listed += pw.ints(v)
        elif num == 10:
            listed += [struct.unpack("<d", x.to_bytes(8, "little"))[0] for x in _fixed64(v)]
    count = math.prod(dims)
    values: tuple | None = None
    if count <= SMALL:
        if raw is not None and elem in _RAW:
            fmt = _RAW[elem]
            size = struct.calcsize(fmt)
            if len(raw) == size * count:
                values = tuple(v for (v,) in struct.iter_unpack(fmt, raw))
        elif len(listed) == count:
            values = tuple(listed)
    return name, Tensor(elem, tuple(dims), values)


def _fixed64(v: int | memoryview) -> list[int]:
    if isinstance(v, int):
        return [v]
    return [int.from_bytes(v[i : i + 8], "little") for i in range(0, len(v) - 7, 8)]


def _value_info(buf: memoryview) -> tuple[str, ValueType]:
    name, elem, dims = "", 0, None
    for num, v in pw.fields(buf):
        if num == 1:
            name = pw.text(v)
        elif num == 2 and isinstance(v, memoryview):
            for tnum, tv in pw.fields(v):
                if tnum == 1 and isinstance(tv, memoryview):  # tensor_type
                    for knum, kv in pw.fields(tv):
                        if knum == 1 and isinstance(kv, int):
                            elem = kv
                        elif knum == 2 and isinstance(kv, memoryview):
                            dims = tuple(_dim(d) for n, d in pw.fields(kv) if n == 1 and isinstance(d, memoryview))
    return name, ValueType(elem, dims)


def _dim(buf: memoryview) -> int | str | None:
    for num, v in pw.fields(buf):
        if num == 1 and isinstance(v, int):
            return pw.signed(v)
        if num == 2:
            return pw.text(v) or None
    return None


def _node(buf: memoryview) -> Node:
    ins: list[str] = []
    outs: list[str] = []
    op = domain = ""
    attrs: dict[str, Any] = {}
    graphs: list[Graph] = []
    for num, v in pw.fields(buf):
        if num == 1:
            ins.append(pw.text(v))
        elif num == 2:
            outs.append(pw.text(v))
        elif num == 4:
            op = pw.text(v)
        elif num == 7:
            domain = pw.text(v)
        elif num == 5 and isinstance(v, memoryview):
            name, value, held = _attribute(v)
            attrs[name] = value
            graphs += [_graph(g) for g in held]
    return Node(op, "" if domain == "ai.onnx" else domain, tuple(ins), tuple(outs), attrs, bool(graphs), tuple(graphs))


def _attribute(buf: memoryview) -> tuple[str, Any, list[memoryview]]:
    """An attribute's name, its value (None for a graph), and the graphs it holds (``g``, ``graphs``)."""
    name = ""
    value: Any = None
    listed: list = []
    graphs: list[memoryview] = []
    for num, v in pw.fields(buf):
        if num == 1:
            name = pw.text(v)
        elif num == 2 and isinstance(v, int):
            value = pw.floats(v)[0]
        elif num == 3 and isinstance(v, int):
            value = pw.signed(v)
        elif num == 4:
            value = pw.text(v)
        elif num == 5 and isinstance(v, memoryview):
            value = _tensor(v)[1]
        elif num in (6, 11) and isinstance(v, memoryview):
            graphs.append(v)
        elif num == 7:
            listed += pw.floats(v)
        elif num == 8:
            listed += pw.ints(v)
    if value is None and listed:
        value = listed
    return name, value, graphs
