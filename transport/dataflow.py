"""Data flow of a plan: which outputs depend on which inputs, computed once when the plan is registered.

An output computed from a private input is private itself (worker/store.py). The analysis is
conservative: every node's outputs depend on all of its inputs, and a node with subgraphs (If, Loop,
Scan) also on every outer value its subgraphs read; a call of a local function on all of its inputs.
Constants and initializers depend on nothing.

The plan has been checked by transport/plancheck.py (size, nesting, field counts) before this reads it, so
a plain protobuf walk over its bytes is bounded. No ``onnx`` package: the worker never needs one. In the
contract layer because both sides use it: the worker to guard private data, the review (transport/review.py)
to show an approver what depends on what.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from planwire.transport.protowire import fields as _all_fields

# Protobuf field numbers (onnx.proto3)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 11, 12
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP, _NODE_ATTR, _NODE_DOMAIN = 1, 2, 4, 5, 7
_ATTR_G, _ATTR_GRAPHS = 6, 11
_VALUE_NAME = 1


@dataclass(frozen=True)
class Flow:
    """``deps[i]``: the indices of the plan inputs that output ``i`` depends on; ``ops``: op counts
    (subgraphs included), ``domain::Op`` for ops outside the default domain."""

    deps: tuple[frozenset[int], ...]
    ops: dict[str, int] = field(default_factory=dict)

    def private_outputs(self, private_args: Sequence[int]) -> frozenset[int]:
        """Outputs that depend on any of the given (private) argument indices."""
        if not private_args:
            return frozenset()
        p = set(private_args)
        return frozenset(i for i, d in enumerate(self.deps) if not p.isdisjoint(d))


def analyze(data: bytes | memoryview, inputs: Sequence[str], outputs: Sequence[str]) -> Flow:
    """The Flow of serialized ONNX ``data`` whose runtime inputs and outputs are named ``inputs`` and
    ``outputs`` (in onnxruntime's order)."""
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    graph = next((v for n, v in _fields(buf) if n == _MODEL_GRAPH), None)
    env: dict[str, frozenset[int]] = {name: frozenset([i]) for i, name in enumerate(inputs)}
    ops: Counter[str] = Counter()
    if graph is not None:
        _graph(graph, env, ops)
    everything = frozenset(range(len(inputs)))
    # An output name the walk did not see (should not happen for a model onnxruntime loaded): assume the worst.
    deps = tuple(env.get(name, everything) for name in outputs)
    return Flow(deps, dict(ops))


def _graph(g: memoryview | bytes, env: dict[str, frozenset[int]], ops: Counter[str]) -> None:
    for num, node in _fields(g):
        if num != _GRAPH_NODE:
            continue
        ins: list[str] = []
        outs: list[str] = []
        op, domain = "", ""
        subgraphs: list[memoryview | bytes] = []
        for n, v in _fields(node):
            if n == _NODE_INPUT:
                ins.append(bytes(v).decode("utf-8", "replace"))
            elif n == _NODE_OUTPUT:
                outs.append(bytes(v).decode("utf-8", "replace"))
            elif n == _NODE_OP:
                op = bytes(v).decode("utf-8", "replace")
            elif n == _NODE_DOMAIN:
                domain = bytes(v).decode("utf-8", "replace")
            elif n == _NODE_ATTR:
                subgraphs += [a for an, a in _fields(v) if an in (_ATTR_G, _ATTR_GRAPHS)]
        ops[f"{domain}::{op}" if domain and domain != "ai.onnx" else op] += 1
        dep: frozenset[int] = frozenset().union(*(env.get(i, frozenset()) for i in ins if i))
        for sub in subgraphs:  # everything the subgraph reads from outside (conservatively: any known name)
            dep |= frozenset().union(*(env.get(name, frozenset()) for name in _names_read(sub, ops)))
        for o in outs:
            if o:
                env[o] = dep


def _names_read(g: memoryview | bytes, ops: Counter[str]) -> Iterator[str]:
    """Every value name a (sub)graph's nodes read or its outputs name, nested subgraphs included."""
    for num, item in _fields(g):
        if num == _GRAPH_OUTPUT:
            for n, v in _fields(item):
                if n == _VALUE_NAME:
                    yield bytes(v).decode("utf-8", "replace")
        elif num == _GRAPH_NODE:
            for n, v in _fields(item):
                if n == _NODE_INPUT:
                    yield bytes(v).decode("utf-8", "replace")
                elif n == _NODE_OP:
                    ops[bytes(v).decode("utf-8", "replace")] += 1
                elif n == _NODE_ATTR:
                    for an, a in _fields(v):
                        if an in (_ATTR_G, _ATTR_GRAPHS):
                            yield from _names_read(a, ops)


def _fields(buf: memoryview | bytes) -> Iterator[tuple[int, memoryview]]:
    """(field number, bytes) of every length-delimited field of one protobuf message."""
    for num, value in _all_fields(buf):
        if isinstance(value, memoryview):
            yield num, value
