"""Reject hostile ONNX plans before onnxruntime sees them.

A plan arrives from a network peer as serialized ``onnx.ModelProto`` bytes. :func:`check_model` walks the
protobuf wire format directly (pure Python, no ``onnx`` package, no copies of tensor payloads: ``raw_data``
and other large fields are skipped by length) and raises :class:`PlanRejected` unless the plan is safe to
hand to ``onnxruntime.InferenceSession``. The walk is in three layers: :mod:`.onnxproto` reads the wire
format against its field tables, :mod:`.plandomains` decides which operators a plan may name,
:mod:`.plansize` bounds the resources a plan fixes up front, and this module holds the policy below and the
walk over a model's graphs, nodes, functions and tensors.

Policy (field numbers checked against onnx.proto of onnx 1.23):

* **Size** -- ``len(data) <= max_bytes`` (and below protobuf's 2 GiB), checked before anything else.
  Sparse tensors, which onnxruntime densifies while loading, must also fit in ``max_bytes`` once dense.
* **No external data, anywhere** -- any TensorProto with ``data_location`` other than DEFAULT or with
  ``external_data`` entries is rejected: graph initializers, sparse initializers, tensors in node
  attributes (``t``, ``tensors``, ``sparse_tensor(s)``), subgraphs at any depth, local functions (nodes
  and default attributes) and ``training_info`` graphs. onnxruntime resolves such paths against the
  worker's working directory when loading from bytes (and ``*/_ORT_MEM_ADDR_/*`` against raw memory).
* **Op domains** -- every node (main graph, subgraphs, functions, training graphs) must use a domain in
  ``allowed_domains`` (``""`` and ``"ai.onnx"`` are the same domain), or call a *model-local function*
  defined in the plan. Every ``opset_import`` (model and functions) must name an allowed domain or the
  domain of a local function.
* **Local functions** -- allowed, because onnxruntime inlines them into ordinary nodes, with rules:
  their bodies pass the same checks; their domain must not be an allowed domain nor one that
  onnxruntime (or a known execution provider) registers ops in (``ai.onnx*``, ``com.microsoft*``,
  ``com.ms*``, ``org.pytorch*``, ...), because onnxruntime resolves a node to a built-in op *before*
  looking for a local function, so a "function" named ``com.microsoft::Gelu`` would really run the
  contrib kernel; a node may only use a non-allowed domain if exactly that ``(domain, name, overload)``
  function is defined; recursive functions are rejected, and the node count after inlining is capped
  (``max_nodes``) so nested calls cannot expand exponentially.
* **Well-formed protobuf** -- truncated varints, lengths past the end of the enclosing message, group or
  invalid wire types, a known field with the wrong wire type, unknown fields in the messages that can
  carry ops or tensors, nesting deeper than :data:`MAX_DEPTH` or more than :data:`MAX_FIELDS` fields are
  all rejected. The walk is iterative per message and bounded, so garbage input cannot hang it.
* **Not a model** -- no ``graph`` field means not an ONNX model; bytes that carry the ORT-format file
  identifier (``ORTM`` at offset 4) are rejected too, because onnxruntime would parse them as a
  flatbuffer model that this walker never looked at (a protobuf/flatbuffer polyglot).
* **Resources knowable up front** (:class:`PlanTooLarge`, wire code ``plan_too_large``) -- node count
  (everything, subgraphs and inlined functions included), function nesting depth, any tensor whose size
  the plan fixes (declared dims, densified sparse tensors, and the outputs of ``ConstantOfShape``,
  ``Expand``, ``Tile``, ``Range`` and ``Resize`` whose size inputs are initializers or ``Constant``s), a
  ``Loop`` with a constant trip count over the limit and no condition (or a constant true one), and a
  ``Loop`` with neither. What depends on the data (a shape read from an input, ``Div`` of INT_MIN by -1)
  is left to containment.
* ``metadata_props`` may not contain ``ort_config`` (session options that onnxruntime applies when
  ``ORT_LOAD_CONFIG_FROM_MODEL=1`` is set).

The caller must hand onnxruntime the *same immutable bytes* that were checked, and should build the
session with :func:`planwire.transport.ortoptions.session_options`. Runtime resource use that depends on the data is not
bounded here.
"""

from __future__ import annotations

from dataclasses import dataclass

from planwire.transport.onnxproto import (
    ATTRIBUTE,
    ELEM_BITS,
    FUNCTION,
    GRAPH,
    GRAPH_PORTS,
    MAX_DEPTH,
    MAX_FIELDS,
    MODEL,
    NODE,
    OPSET,
    SPARSE,
    SSE_KEEP,
    TENSOR,
    TENSOR_TYPE_KEEP,
    TRAINING,
    TYPE_KEEP,
    VALUE_INFO_KEEP,
    Buffer,
    Fields,
    PlanRejected,
    PlanTooLarge,
    Span,
    itemsize,
    signed64,
)
from planwire.transport.plandomains import DEFAULT_DOMAINS, ML_DOMAINS, ONNX_ALIASES, Domains
from planwire.transport.plansize import SIZED_OPS, SizeRules, human_size

__all__ = [
    "DEFAULT_DOMAINS",
    "MAX_DEPTH",
    "MAX_FIELDS",
    "ML_DOMAINS",
    "ModelSummary",
    "PlanRejected",
    "PlanTooLarge",
    "check_model",
]

PROTOBUF_LIMIT = 2**31 - 1
"""Protobuf cannot parse a message of 2 GiB or more."""


@dataclass(frozen=True)
class ModelSummary:
    """What a checked plan contains (all counts are for the main graph, subgraphs included)."""

    size_bytes: int
    ir_version: int
    producer_name: str
    producer_version: str
    opsets: dict[str, int]
    """``opset_import`` as ``{domain: version}``."""
    node_count: int
    """Nodes in the main graph and its subgraphs, before inlining local functions."""
    expanded_node_count: int
    """Nodes after inlining every local-function call (what onnxruntime will build)."""
    initializer_count: int
    """Dense plus sparse initializers of the main graph."""
    initializer_bytes: int
    """Serialized size of those initializers (about their data size)."""
    function_count: int
    metadata_props: dict[str, str]
    unknown_rank: frozenset[str] = frozenset()
    """Names of graph inputs and outputs declared without a shape: their rank is unknown."""


class _Checker(SizeRules):
    """One walk over one plan, holding it to the policy in the module docstring."""

    def __init__(
        self,
        buf: Buffer,
        allowed: frozenset[str],
        max_bytes: int,
        max_nodes: int,
        max_tensor_bytes: int | None = None,
        max_function_depth: int = 8,
        max_loop_trips: int = 1 << 24,
    ) -> None:
        tensor_bytes = max_bytes if max_tensor_bytes is None else max_tensor_bytes
        super().__init__(buf, tensor_bytes, max_function_depth, max_loop_trips)
        self.max_bytes = max_bytes
        self.all_nodes = 0  # every node walked: main graph, subgraphs, functions, training graphs
        self.domains = Domains(allowed, self.reject)
        self.allowed = self.domains.allowed
        self.max_nodes = max_nodes
        self.calls: list[int] = []  # local-function calls made from the scope being walked
        self.nodes = 0  # nodes in the scope being walked

    def tensor(self, span: Span, depth: int, role: str) -> Fields:
        f = self.scan(span, depth, TENSOR)
        entries = f.get(13)
        external = any(f.get(14, ()))  # DataLocation: DEFAULT=0, EXTERNAL=1; refuse anything but 0
        if not entries and not external:
            dims = f.get(1)
            if dims:  # a declared size is allocated as declared (and checked against the data only later)
                what = f"{role} '{self.label(f.get(8))}'"
                self.bound(self.ints(dims, f"{what} dims"), itemsize(f), what)
            return f
        location = None
        for entry in entries or ():
            kv = self.scan(entry, depth + 1, SSE_KEEP)
            if self.label(kv.get(1)) == "location":
                location = self.label(kv.get(2))
        detail = f"location '{location}'" if location is not None else "data_location EXTERNAL"
        raise self.reject(f"{role} '{self.label(f.get(8))}' uses external data ({detail})")

    def sparse(self, spans: list, depth: int, role: str) -> None:
        """One sparse tensor, given as every occurrence of a singular field (protobuf merges them)."""
        dims: list = []
        values: Fields = {}
        for span in spans:
            f = self.scan(span, depth, SPARSE)
            dims += f.get(3, [])
            for s in f.get(1, ()):
                for k, v in self.tensor(s, depth + 1, f"{role} values").items():
                    values.setdefault(k, []).extend(v)
            for s in f.get(2, ()):
                self.tensor(s, depth + 1, f"{role} indices")
        # onnxruntime turns sparse tensors into dense ones: a few bytes could demand gigabytes.
        dtypes = values.get(2)
        bits = ELEM_BITS.get(dtypes[-1] if dtypes else 0, 128)
        limit = self.max_tensor_bytes * 8 // bits
        count = 1
        for dim in self.ints(dims, f"{role} '{self.label(values.get(8))}' dims"):
            count *= dim
            if dim < 0 or count > limit:
                if dim < 0:
                    raise self.reject(f"{role} '{self.label(values.get(8))}' densifies to a negative size")
                raise self.too_large(
                    f"{role} '{self.label(values.get(8))}' densifies to more than {human_size(self.max_tensor_bytes)}, "
                    "over the worker limit"
                )

    def graph(self, span: Span, depth: int, label: bool) -> tuple[int, int]:
        """Walk a graph; returns (initializer count, initializer bytes) of this graph level."""
        f = self.scan(span, depth, GRAPH)
        if label:
            self.path.append(f"graph '{self.label(f.get(2))}'")
        n_init = n_bytes = 0
        for s in f.get(5, ()):
            self.constant(self.tensor(s, depth + 1, "initializer"))
            n_init += 1
            n_bytes += s[1] - s[0]
        for s in f.get(15, ()):
            self.sparse([s], depth + 1, "sparse initializer")
            n_init += 1
            n_bytes += s[1] - s[0]
        for i, s in enumerate(f.get(1, ())):
            self.node(s, depth + 1, i)
        if label:
            self.path.pop()
        return n_init, n_bytes

    def node(self, span: Span, depth: int, index: int) -> None:
        f = self.scan(span, depth, NODE)
        name = self.label(f.get(3))
        op = self.text(f.get(4), f"op_type of node #{index}")
        desc = f"node '{name}' (op {op})" if name else f"node #{index} (op {op})"
        domain = self.text(f.get(7), f"domain of {desc}")
        overload = self.text(f.get(8), f"overload of {desc}")
        self.nodes += 1
        self.all_nodes += 1
        if self.all_nodes > self.max_nodes:
            raise self.too_large(f"plan has more than {self.max_nodes} nodes (subgraphs and functions included)")
        if domain not in self.allowed:
            self.calls.append(self.domains.called(desc, domain, op, overload))
        attrs: dict[str, Fields] = {}
        if f.get(5):
            self.path.append(desc)
            for s in f[5]:
                af = self.attribute(s, depth + 1)
                attrs[self.label(af.get(1))] = af
            self.path.pop()
        if domain in ONNX_ALIASES and op in SIZED_OPS:
            ins = [self.raw(s) for s in f.get(1, ())]
            outs = [self.raw(s) for s in f.get(2, ())]
            self.sized(op, desc, ins, outs, attrs)

    def attribute(self, span: Span, depth: int) -> Fields:
        f = self.scan(span, depth, ATTRIBUTE)
        self.path.append(f"attribute '{self.label(f.get(1))}'")
        for s in f.get(5, []) + f.get(10, []):
            self.tensor(s, depth + 1, "tensor")
        if 22 in f:
            self.sparse(f[22], depth + 1, "sparse tensor")
        for s in f.get(23, ()):
            self.sparse([s], depth + 1, "sparse tensor")
        for s in f.get(6, []) + f.get(11, []):
            self.graph(s, depth + 1, label=True)
        self.path.pop()
        return f

    def opsets(self, spans: list, depth: int, where: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in spans:
            f = self.scan(s, depth, OPSET)
            domain = self.text(f.get(1), f"{where} domain")
            self.domains.opset(domain, where)
            versions = f.get(2)
            out[domain] = signed64(versions[-1]) if versions else 0
        return out

    def model(self) -> ModelSummary:
        size = len(self.buf)
        f = self.scan((0, size), 0, MODEL)
        if not f.get(7):
            raise self.reject("not an ONNX model: no graph")

        metadata: dict[str, str] = {}
        for s in f.get(14, ()):
            kv = self.scan(s, 1, SSE_KEEP)
            key, value = self.utf8(kv.get(1)), self.utf8(kv.get(2))
            if key == "ort_config":
                raise self.reject("metadata_props key 'ort_config' (onnxruntime session options) is not allowed")
            metadata[key] = value

        # Local functions: collect signatures first, so nodes anywhere can be matched against them.
        functions: list[tuple[str, Fields]] = []
        for s in f.get(25, ()):
            ff = self.scan(s, 1, FUNCTION)
            name = self.text(ff.get(1), "function name")
            domain = self.text(ff.get(10), f"domain of function '{name}'")
            overload = self.text(ff.get(13), f"overload of function '{name}'")
            functions.append((self.domains.define(domain, name, overload), ff))

        fn_nodes: list[int] = []
        fn_calls: list[list[int]] = []
        for qual, ff in functions:
            self.path = [f"function '{qual}'"]
            self.calls, self.nodes, self.consts = [], 0, {}
            for i, s in enumerate(ff.get(7, ())):
                self.node(s, 2, i)
            for s in ff.get(11, ()):
                self.attribute(s, 2)
            self.opsets(ff.get(9, []), 2, "opset_import")
            fn_nodes.append(self.nodes)
            fn_calls.append(self.calls)
        self.path = []

        self.calls, self.nodes, self.consts = [], 0, {}
        n_init = n_bytes = 0
        for s in f[7]:
            a, b = self.graph(s, 1, label=False)
            n_init, n_bytes = n_init + a, n_bytes + b
        unknown_rank = frozenset(self.unknown_rank(f[7][-1]))
        node_count, main_calls = self.nodes, self.calls
        for i, s in enumerate(f.get(20, ())):  # checked like the main graph; onnxruntime never runs these
            tf = self.scan(s, 1, TRAINING)
            for field, part in ((1, "initialization"), (2, "algorithm")):
                for g in tf.get(field, ()):
                    self.path, self.calls, self.consts = [f"training_info[{i}] {part}"], [], {}
                    self.graph(g, 2, label=False)
        self.path = []
        opsets = self.opsets(f.get(8, []), 1, "opset_import")
        expanded = self.expand(node_count, main_calls, fn_nodes, fn_calls, [q for q, _ in functions])

        ir = f.get(1)
        return ModelSummary(
            size_bytes=size,
            ir_version=signed64(ir[-1]) if ir else 0,
            producer_name=self.utf8(f.get(2)),
            producer_version=self.utf8(f.get(3)),
            opsets=opsets,
            node_count=node_count,
            expanded_node_count=expanded,
            initializer_count=n_init,
            initializer_bytes=n_bytes,
            function_count=len(functions),
            metadata_props=metadata,
            unknown_rank=unknown_rank,
        )

    def unknown_rank(self, graph: Span) -> list[str]:
        """Names of the graph's tensor inputs and outputs whose type has no shape (unknown rank)."""
        f = self.scan(graph, 1, GRAPH_PORTS)
        out = []
        for s in f.get(11, []) + f.get(12, []):
            vi = self.scan(s, 2, VALUE_INFO_KEEP)
            for t in vi.get(2, ())[-1:]:
                tensor = self.scan(t, 3, TYPE_KEEP).get(1)
                if tensor and not self.scan(tensor[-1], 4, TENSOR_TYPE_KEEP).get(2):
                    out.append(self.utf8(vi.get(1)))
        return out


def check_model(
    data: Buffer,
    *,
    max_bytes: int,
    allowed_domains: frozenset[str] = DEFAULT_DOMAINS,
    max_nodes: int = 100_000,
    max_tensor_bytes: int | None = None,
    max_function_depth: int = 8,
    max_loop_trips: int = 1 << 24,
) -> ModelSummary:
    """Check serialized ONNX ``data`` against the policy in this module's docstring.

    ``max_bytes`` caps the plan size; ``allowed_domains`` are the op domains nodes may use (add
    ``"ai.onnx.ml"`` via :data:`ML_DOMAINS` to opt in); ``max_nodes`` caps the node count, subgraphs and
    training graphs included, and after local functions are inlined; ``max_function_depth`` caps how deep
    local functions call each other; ``max_tensor_bytes`` (default ``max_bytes``) caps any tensor whose size
    the plan fixes (declared dims, densified sparse tensors, outputs of ConstantOfShape, Expand, Tile, Range
    and Resize with constant inputs); ``max_loop_trips`` caps a Loop's constant trip count. Returns a
    :class:`ModelSummary`; raises :class:`PlanRejected` otherwise (:class:`PlanTooLarge` for the caps).
    """
    buf: Buffer = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B")
    size = len(buf)
    if size > max_bytes:
        raise PlanRejected(f"plan is {human_size(size)}, over the worker limit of {human_size(max_bytes)}")
    if size > PROTOBUF_LIMIT:
        raise PlanRejected(f"plan is {human_size(size)}, over protobuf's 2 GiB limit")
    if bytes(buf[4:8]) == b"ORTM":
        raise PlanRejected("plan carries the ORT-format identifier 'ORTM'; only ONNX protobuf plans are accepted")
    checker = _Checker(
        buf, frozenset(allowed_domains), max_bytes, max_nodes, max_tensor_bytes, max_function_depth, max_loop_trips
    )
    return checker.model()
