"""Reject hostile ONNX plans before onnxruntime sees them.

A plan arrives from a network peer as serialized ``onnx.ModelProto`` bytes. :func:`check_model` walks the
protobuf wire format directly (pure Python, no ``onnx`` package, no copies of tensor payloads: ``raw_data``
and other large fields are skipped by length) and raises :class:`PlanRejected` unless the plan is safe to
hand to ``onnxruntime.InferenceSession``.

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

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_DOMAINS",
    "MAX_DEPTH",
    "MAX_FIELDS",
    "ML_DOMAINS",
    "ModelSummary",
    "PlanRejected",
    "check_model",
]

DEFAULT_DOMAINS: frozenset[str] = frozenset({"", "ai.onnx"})
"""The standard ONNX operator set only."""
ML_DOMAINS: frozenset[str] = DEFAULT_DOMAINS | {"ai.onnx.ml"}
"""Standard operators plus the classical-ML operator set (opt-in)."""
MAX_DEPTH = 64
"""Deepest protobuf message nesting accepted (ModelProto is depth 0)."""
MAX_FIELDS = 5_000_000
"""Most protobuf fields walked in one plan; bounds the time spent on pathological encodings."""
PROTOBUF_LIMIT = 2**31 - 1
"""Protobuf cannot parse a message of 2 GiB or more."""

_ONNX_ALIASES = frozenset({"", "ai.onnx"})
# Domains in which onnxruntime or a known execution provider registers operators (checked as prefixes).
_RESERVED_PREFIXES = ("ai.onnx", "onnx", "com.microsoft", "com.ms", "org.pytorch", "pkg.onnxruntime", "trt")
_NAME_LIMIT = 120
_TEXT_LIMIT = 4096

Buffer = bytes | bytearray | memoryview


class PlanRejected(ValueError):
    """The plan is unsafe or malformed; the message names what is at fault. ``code``: the wire error code."""

    code = "bad_plan"


class PlanTooLarge(PlanRejected):
    """The plan would need more than the worker allows (nodes, nesting, memory, loop trips), knowably
    before it runs."""

    code = "plan_too_large"


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


# --- wire-format schemas -------------------------------------------------------------------------------

_V, _I64, _L, _I32 = 1 << 0, 1 << 1, 1 << 2, 1 << 5  # allowed-wire-type masks
_WT_NAMES = {0: "varint", 1: "fixed64", 2: "length-delimited", 5: "fixed32"}


class _Msg:
    """Field table of one message type: number -> (wire-type mask, generic sub-message, store?)."""

    __slots__ = ("fields", "name", "strict")

    def __init__(self, name: str, strict: bool, fields: dict[int, tuple[int, _Msg | None, bool]]) -> None:
        self.name = name
        self.strict = strict  # unknown fields rejected (messages that can carry ops or tensors)
        self.fields = fields


def _plain(*nums: int, mask: int = _L) -> dict[int, tuple[int, _Msg | None, bool]]:
    return {n: (mask, None, False) for n in nums}


def _keep(*nums: int, mask: int = _L) -> dict[int, tuple[int, _Msg | None, bool]]:
    return {n: (mask, None, True) for n in nums}


def _sub(msg: _Msg, *nums: int) -> dict[int, tuple[int, _Msg | None, bool]]:
    return {n: (_L, msg, False) for n in nums}


# Leaf messages: walked generically (structure and depth only), unknown fields tolerated.
_SSE = _Msg("StringStringEntryProto", False, _plain(1, 2))
_SSE_KEEP = _Msg("StringStringEntryProto", False, _keep(1, 2))
_OPSET = _Msg("OperatorSetIdProto", False, {**_keep(1), **_keep(2, mask=_V)})
_DIM = _Msg("TensorShapeProto.Dimension", False, {**_plain(1, mask=_V), **_plain(2, 3)})
_SHAPE = _Msg("TensorShapeProto", False, _sub(_DIM, 1))
_TENSOR_TYPE = _Msg("TypeProto.Tensor", False, {**_plain(1, mask=_V), **_sub(_SHAPE, 2)})
_TYPE = _Msg("TypeProto", False, {})
_SEQ_TYPE = _Msg("TypeProto.Sequence", False, _sub(_TYPE, 1))
_MAP_TYPE = _Msg("TypeProto.Map", False, {**_plain(1, mask=_V), **_sub(_TYPE, 2)})
_OPT_TYPE = _Msg("TypeProto.Optional", False, _sub(_TYPE, 1))
_OPAQUE_TYPE = _Msg("TypeProto.Opaque", False, _plain(1, 2))
_TYPE.fields.update(
    {
        **_sub(_TENSOR_TYPE, 1, 8),
        **_sub(_SEQ_TYPE, 4),
        **_sub(_MAP_TYPE, 5),
        **_sub(_OPT_TYPE, 9),
        **_sub(_OPAQUE_TYPE, 7),
        **_plain(6),
    }
)
_VALUE_INFO = _Msg("ValueInfoProto", False, {**_plain(1, 3), **_sub(_TYPE, 2), **_sub(_SSE, 4)})
_TENSOR_ANN = _Msg("TensorAnnotation", False, {**_plain(1), **_sub(_SSE, 2)})
_SEGMENT = _Msg("TensorProto.Segment", False, _plain(1, 2, mask=_V))
_INT_LIST = _Msg("IntIntListEntryProto", False, {**_plain(1, mask=_V), **_plain(2, mask=_V | _L)})
_SIMPLE_DIM = _Msg("SimpleShardedDimProto", False, {**_plain(1, 3, mask=_V), **_plain(2)})
_SHARDED_DIM = _Msg("ShardedDimProto", False, {**_plain(1, mask=_V), **_sub(_SIMPLE_DIM, 2)})
_SHARDING = _Msg(
    "ShardingSpecProto",
    False,
    {**_plain(1), **_plain(2, mask=_V | _L), **_sub(_INT_LIST, 3), **_sub(_SHARDED_DIM, 4)},
)
_NODE_DEVICE = _Msg("NodeDeviceConfigurationProto", False, {**_plain(1), **_sub(_SHARDING, 2), **_plain(3, mask=_V)})
_DEVICE = _Msg("DeviceConfigurationProto", False, {**_plain(1, 3), **_plain(2, mask=_V)})

# Structural messages: walked by hand, unknown fields rejected.
_MODEL = _Msg(
    "ModelProto",
    True,
    {
        **_keep(1, 5, mask=_V),
        **_keep(2, 3, 7, 8, 14, 20, 25),
        **_plain(4, 6),
        **_sub(_DEVICE, 26),
    },
)
_GRAPH = _Msg(
    "GraphProto",
    True,
    {
        **_keep(1, 2, 5, 15),
        **_plain(10),
        **{n: (_L, _VALUE_INFO, True) for n in (11, 12)},
        **_sub(_VALUE_INFO, 13),
        **_sub(_TENSOR_ANN, 14),
        **_sub(_SSE, 16),
    },
)
_NODE = _Msg(
    "NodeProto",
    True,
    {**_plain(6), **_keep(1, 2, 3, 4, 5, 7, 8), **_sub(_SSE, 9), **_sub(_NODE_DEVICE, 10)},
)
_ATTRIBUTE = _Msg(
    "AttributeProto",
    True,
    {
        **_keep(1, 5, 6, 10, 11, 22, 23),
        **_plain(4, 9, 13, 21),
        **_keep(3, mask=_V),
        **_plain(20, mask=_V),
        **_plain(2, mask=_I32),
        **_plain(7, mask=_I32 | _L),
        **_keep(8, mask=_V | _L),
        **_sub(_TYPE, 14, 15),
    },
)
_TENSOR = _Msg(
    "TensorProto",
    True,
    {
        **_keep(1, 5, 7, mask=_V | _L),
        **_plain(11, mask=_V | _L),
        **_keep(2, mask=_V),
        **_sub(_SEGMENT, 3),
        **_keep(4, mask=_I32 | _L),
        **_plain(6, 12),
        **_keep(8, 9, 13),
        **_keep(10, mask=_I64 | _L),
        **_keep(14, mask=_V),
        **_sub(_SSE, 16),
    },
)
# Reading graph ports (walked already: these only keep what says whether a port has a shape).
_GRAPH_PORTS = _Msg("GraphProto", False, _keep(11, 12))
_VALUE_INFO_KEEP = _Msg("ValueInfoProto", False, _keep(1, 2))
_TYPE_KEEP = _Msg("TypeProto", False, _keep(1))
_TENSOR_TYPE_KEEP = _Msg("TypeProto.Tensor", False, _keep(2))
_SPARSE = _Msg("SparseTensorProto", True, {**_keep(1, 2), **_keep(3, mask=_V | _L)})
# Bits per element by TensorProto.DataType (onnxruntime densifies sparse tensors); unknown types: 128.
_ELEM_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64}
_ELEM_BITS.update({15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2})
_ELEM_BITS.update({27: 6, 28: 6})
_FUNCTION = _Msg(
    "FunctionProto",
    True,
    {**_keep(1, 7, 9, 10, 11, 13), **_plain(4, 5, 6, 8), **_sub(_VALUE_INFO, 12), **_sub(_SSE, 14)},
)
_TRAINING = _Msg("TrainingInfoProto", True, {**_keep(1, 2), **_sub(_SSE, 3, 4)})

_Span = tuple[int, int]
_Fields = dict[int, list]

# Standard ops whose output size constants can decide (checked against max_tensor_bytes), and Loop.
_SIZED_OPS = frozenset({"Constant", "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Loop"})
_SMALL = 64
"""Most elements of a constant whose values are read (shapes, repeats, scalars)."""
_PACKED = {1: "<f", 6: "<i", 7: "<q", 11: "<d", 10: "<e", 12: "<I", 13: "<Q", 2: "<B", 3: "<b", 4: "<H", 5: "<h"}


@dataclass
class _Const:
    """A tensor the plan fixes before it runs (initializer or Constant): its type, dims, and values when
    small enough to matter."""

    dtype: int
    dims: list[int]
    values: list[float] | None


def _itemsize(f: _Fields) -> float:
    types = f.get(2)
    return _ELEM_BITS.get(types[-1] if types else 1, 128) / 8


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _signed64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def _domain_list(domains: frozenset[str]) -> str:
    return ", ".join(repr(d) for d in sorted(domains)) or "(none)"


def _reserved(domain: str) -> bool:
    return domain == "" or domain.startswith(_RESERVED_PREFIXES)


class _Checker:
    """One walk over one plan. Spans are ``(start, end)`` offsets into ``buf``; nothing is copied."""

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
        self.buf = buf
        self.max_bytes = max_bytes
        self.max_tensor_bytes = max_bytes if max_tensor_bytes is None else max_tensor_bytes
        self.max_function_depth = max_function_depth
        self.max_loop_trips = max_loop_trips
        self.all_nodes = 0  # every node walked: main graph, subgraphs, functions, training graphs
        self.consts: dict[str, _Const] = {}  # small constants of the scope being walked, by value name
        self.shown = allowed
        self.allowed = allowed | _ONNX_ALIASES if allowed & _ONNX_ALIASES else allowed
        self.max_nodes = max_nodes
        self.path: list[str] = []
        self.fields = 0
        self.functions: dict[tuple[str, str, str], int] = {}
        self.function_domains: frozenset[str] = frozenset()
        self.calls: list[int] = []  # local-function calls made from the scope being walked
        self.nodes = 0  # nodes in the scope being walked

    # -- errors and strings --

    def reject(self, msg: str, cls: type[PlanRejected] = PlanRejected) -> PlanRejected:
        where = f" (in {' > '.join(self.path)})" if self.path else ""
        return cls(msg + where)

    def too_large(self, msg: str) -> PlanRejected:
        return self.reject(msg, PlanTooLarge)

    def malformed(self, msg: str, pos: int) -> PlanRejected:
        return self.reject(f"malformed plan: {msg} at byte {pos}")

    def label(self, spans: list | None) -> str:
        """Last value of a string field, for messages: lossy and length-capped."""
        if not spans:
            return ""
        s, e = spans[-1]
        raw = bytes(self.buf[s : min(e, s + 4 * _NAME_LIMIT)])
        text = raw.decode("utf-8", "replace")
        if not text.isprintable():  # names end up in logs and replies: no control characters
            text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
        return text[:_NAME_LIMIT] + "..." if len(text) > _NAME_LIMIT or e - s > 4 * _NAME_LIMIT else text

    def text(self, spans: list | None, what: str) -> str:
        """Last value of a string field that decides policy: must be short, valid UTF-8."""
        if not spans:
            return ""
        s, e = spans[-1]
        if e - s > _TEXT_LIMIT:
            raise self.reject(f"{what} is {e - s} bytes long")
        try:
            return bytes(self.buf[s:e]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.reject(f"{what} is not valid UTF-8: {self.label(spans)!r}") from None

    # -- wire format --

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        buf = self.buf
        result = shift = 0
        start = pos
        while True:
            if pos >= end:
                raise self.malformed("truncated varint", start)
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos
            shift += 7
            if shift >= 70:
                raise self.malformed("varint longer than 10 bytes", start)

    def scan(self, span: _Span, depth: int, msg: _Msg) -> _Fields:
        """Validate one message's fields; return stored fields; walk generic sub-messages."""
        if depth > MAX_DEPTH:
            raise self.reject(f"malformed plan: messages nested deeper than {MAX_DEPTH}")
        buf = self.buf
        pos, end = span
        table = msg.fields
        out: _Fields = {}
        count = 0
        budget = MAX_FIELDS - self.fields
        while pos < end:
            at = pos
            tag = buf[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = self.varint(pos, end)
            fno, wt = tag >> 3, tag & 7
            if fno == 0 or tag > 0xFFFFFFFF:
                raise self.malformed(f"invalid field number {fno} in {msg.name}", at)
            if wt == 0:
                if pos < end and buf[pos] < 0x80:
                    val: object = buf[pos]
                    pos += 1
                else:
                    val, pos = self.varint(pos, end)
            elif wt == 2:
                if pos < end and buf[pos] < 0x80:
                    n = buf[pos]
                    pos += 1
                else:
                    n, pos = self.varint(pos, end)
                if n > end - pos:
                    raise self.malformed(f"field {fno} of {msg.name} runs past the end of its message", at)
                val = (pos, pos + n)
                pos += n
            elif wt == 5 or wt == 1:
                pos += 4 if wt == 5 else 8
                if pos > end:
                    raise self.malformed(f"field {fno} of {msg.name} runs past the end of its message", at)
                val = None
            else:
                raise self.malformed(f"invalid wire type {wt} (field {fno} of {msg.name})", at)
            count += 1
            if count > budget:
                raise self.reject(f"plan has more than {MAX_FIELDS} protobuf fields")
            entry = table.get(fno)
            if entry is None:
                if msg.strict:
                    raise self.malformed(f"unknown field {fno} in {msg.name}", at)
                continue
            mask, sub, store = entry
            if not (mask >> wt) & 1:
                raise self.malformed(f"field {fno} of {msg.name} has wire type {_WT_NAMES[wt]}", at)
            if wt == 2 and mask != _L:  # packed numbers: no partial element at the end
                if mask & _V:
                    partial = pos > val[0] and buf[pos - 1] >= 0x80  # type: ignore[index]
                else:
                    partial = (pos - val[0]) % (4 if mask & _I32 else 8)  # type: ignore[index]
                if partial:
                    raise self.malformed(f"packed field {fno} of {msg.name} ends in a partial element", at)
            if sub is not None:
                self.scan(val, depth + 1, sub)  # type: ignore[arg-type]
            if store:
                kept = out.get(fno)
                if kept is None:
                    out[fno] = [val]
                elif wt == 2 or len(kept) < 128:
                    kept.append(val)
                else:  # a long run of varints (unpacked repeated numbers): enough to judge, and the last
                    kept[-1] = val
        self.fields += count
        return out

    # -- structural walk --

    def tensor(self, span: _Span, depth: int, role: str) -> _Fields:
        f = self.scan(span, depth, _TENSOR)
        entries = f.get(13)
        external = any(f.get(14, ()))  # DataLocation: DEFAULT=0, EXTERNAL=1; refuse anything but 0
        if not entries and not external:
            dims = f.get(1)
            if dims:  # a declared size is allocated as declared (and checked against the data only later)
                what = f"{role} '{self.label(f.get(8))}'"
                self.bound(self.ints(dims, f"{what} dims"), _itemsize(f), what)
            return f
        location = None
        for entry in entries or ():
            kv = self.scan(entry, depth + 1, _SSE_KEEP)
            if self.label(kv.get(1)) == "location":
                location = self.label(kv.get(2))
        detail = f"location '{location}'" if location is not None else "data_location EXTERNAL"
        raise self.reject(f"{role} '{self.label(f.get(8))}' uses external data ({detail})")

    def sparse(self, spans: list, depth: int, role: str) -> None:
        """One sparse tensor, given as every occurrence of a singular field (protobuf merges them)."""
        dims: list = []
        values: _Fields = {}
        for span in spans:
            f = self.scan(span, depth, _SPARSE)
            dims += f.get(3, [])
            for s in f.get(1, ()):
                for k, v in self.tensor(s, depth + 1, f"{role} values").items():
                    values.setdefault(k, []).extend(v)
            for s in f.get(2, ()):
                self.tensor(s, depth + 1, f"{role} indices")
        # onnxruntime turns sparse tensors into dense ones: a few bytes could demand gigabytes.
        dtypes = values.get(2)
        bits = _ELEM_BITS.get(dtypes[-1] if dtypes else 0, 128)
        limit = self.max_tensor_bytes * 8 // bits
        count = 1
        for dim in self.ints(dims, f"{role} '{self.label(values.get(8))}' dims"):
            count *= dim
            if dim < 0 or count > limit:
                if dim < 0:
                    raise self.reject(f"{role} '{self.label(values.get(8))}' densifies to a negative size")
                raise self.too_large(
                    f"{role} '{self.label(values.get(8))}' densifies to more than {_human(self.max_tensor_bytes)}, "
                    "over the worker limit"
                )

    def raw(self, span: _Span) -> bytes:
        """Exact bytes of a string field (value names: compared, never shown)."""
        return bytes(self.buf[span[0] : span[1]])

    def bound(self, dims: Sequence[float], itemsize: float, what: str) -> None:
        """plan_too_large when a tensor of ``dims`` would pass max_tensor_bytes."""
        limit = self.max_tensor_bytes
        count = 1.0
        for d in dims:
            count *= max(d, 0)
        if count * itemsize > limit:
            shown = [int(d) if math.isfinite(d) else d for d in dims][:8]
            raise self.too_large(
                f"{what} would make a tensor of {count:.3g} elements (shape {shown}"
                f"{'...' if len(dims) > 8 else ''}), more than {_human(limit)}, the worker's limit per tensor"
            )

    def constant(self, f: _Fields, name: bytes | None = None) -> None:
        """Remember a small or sized constant tensor (fields of a TensorProto) under its value name."""
        key = self.raw(f[8][-1]) if name is None and f.get(8) else name
        if not key:
            return
        dims = self.ints(f.get(1, []), "constant dims")
        types = f.get(2)
        dtype = types[-1] if types else 1
        count = 1
        for d in dims:
            count *= max(d, 0)
        values = self.values(f, dtype, count) if count <= _SMALL else None
        self.consts[key] = _Const(dtype, dims, values)

    def values(self, f: _Fields, dtype: int, count: int) -> list[float] | None:
        """Values of a small tensor from raw_data or its typed field; None when unreadable."""
        raw = f.get(9)
        if raw:
            fmt = _PACKED.get(dtype)
            s, e = raw[-1]
            if fmt is None or (e - s) != count * struct.calcsize(fmt):
                return None
            return [v for (v,) in struct.iter_unpack(fmt, bytes(self.buf[s:e]))]
        if dtype in (6, 7, 2, 3, 4, 5, 9) and f.get(5 if dtype != 7 else 7):  # int32_data holds small ints
            out = self.ints(f[5 if dtype != 7 else 7], "constant values", most=_SMALL)
            return [float(v) for v in out] if len(out) == count else None
        packed = {1: (4, "<f"), 11: (10, "<d")}.get(dtype)
        if packed and f.get(packed[0]):
            spans = [x for x in f[packed[0]] if isinstance(x, tuple)]
            data = b"".join(bytes(self.buf[a:b]) for a, b in spans[:_SMALL])
            if len(data) != count * struct.calcsize(packed[1]):
                return None
            return [v for (v,) in struct.iter_unpack(packed[1], data)]
        return [] if count == 0 else None

    def sized(self, op: str, desc: str, ins: list[bytes], outs: list[bytes], attrs: dict[str, _Fields]) -> None:
        """Refuse a standard op whose constant inputs make its output (or trip count) too large."""
        consts = self.consts

        def const(i: int) -> _Const | None:
            return consts.get(ins[i]) if i < len(ins) and ins[i] else None

        def vals(i: int) -> list[float] | None:
            c = const(i)
            return c.values if c is not None else None

        if op == "Constant":
            a = attrs.get("value")
            if a and a.get(5) and outs:
                s = a[5][-1]
                self.constant(self.scan(s, 0, _TENSOR), outs[0])
            elif outs and (a := attrs.get("value_ints") or attrs.get("value_int")):
                key = 8 if "value_ints" in attrs else 3
                v = [float(x) for x in self.ints(a.get(key, []), "value_ints", most=_SMALL)]
                consts[outs[0]] = _Const(7, [len(v)] if key == 8 else [], v)
            return
        if op == "ConstantOfShape":
            shape = vals(0)
            a = attrs.get("value")
            size = _itemsize(self.scan(a[5][-1], 0, _TENSOR)) if a and a.get(5) else 4
            if shape is not None:
                self.bound(shape, size, desc)
        elif op == "Expand":
            shape, x = vals(1), const(0)
            if shape is not None:
                self.bound(shape, _ELEM_BITS.get(x.dtype, 8) / 8 if x else 1, desc)
        elif op == "Tile":
            reps, x = vals(1), const(0)
            if reps is not None:
                base = x.dims if x else []
                self.bound([*base, *reps], _ELEM_BITS.get(x.dtype, 8) / 8 if x else 1, desc)
        elif op == "Range":
            start, limit, delta = vals(0), vals(1), vals(2)
            if start and limit and delta and delta[0]:
                span = (limit[0] - start[0]) / delta[0]
                n = math.ceil(span) if math.isfinite(span) else math.inf
                c = const(0)
                self.bound([n], _ELEM_BITS.get(c.dtype if c else 7, 64) / 8, desc)
        elif op == "Resize":
            x = const(0)
            sizes, scales = vals(3), vals(2)
            size = _ELEM_BITS.get(x.dtype, 8) / 8 if x else 1
            if sizes:
                self.bound(sizes, size, desc)
            elif scales:
                base = x.dims if x and len(x.dims) == len(scales) else [1] * len(scales)
                out = [math.floor(d * c) if math.isfinite(c) else math.inf for d, c in zip(base, scales, strict=True)]
                self.bound(out, size, desc)
        elif op == "Loop":
            trips = vals(0) if ins and ins[0] else None
            cond = vals(1) if len(ins) > 1 and ins[1] else None
            has_cond = len(ins) > 1 and bool(ins[1])
            if not (ins and ins[0]) and not has_cond:
                raise self.too_large(f"{desc} has neither a trip count nor a condition: it never ends")
            always = not has_cond or (cond is not None and len(cond) == 1 and cond[0] != 0)
            if trips and always and trips[0] > self.max_loop_trips:
                raise self.too_large(
                    f"{desc} runs {int(trips[0])} times, more than the worker's limit of {self.max_loop_trips} "
                    "loop trips"
                )

    def ints(self, items: list, what: str, most: int = MAX_DEPTH) -> list[int]:
        """Up to ``most`` values of a repeated int64 field stored as varints and/or packed spans."""
        out: list[int] = []
        for item in items:
            if isinstance(item, int):
                out.append(_signed64(item))
            else:
                pos, end = item
                while pos < end and len(out) <= most:
                    v, pos = self.varint(pos, end)
                    out.append(_signed64(v))
            if len(out) > most:
                raise self.reject(f"{what} has more than {most} entries")
        return out

    def graph(self, span: _Span, depth: int, label: bool) -> tuple[int, int]:
        """Walk a graph; returns (initializer count, initializer bytes) of this graph level."""
        f = self.scan(span, depth, _GRAPH)
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

    def node(self, span: _Span, depth: int, index: int) -> None:
        f = self.scan(span, depth, _NODE)
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
            called = self.functions.get((domain, op, overload))
            if called is None:
                if domain in self.function_domains:
                    raise self.reject(f"{desc} calls '{domain}::{op}', which is not a function defined in the plan")
                raise self.reject(
                    f"{desc} uses domain '{domain}' which is not allowed; allowed: {_domain_list(self.shown)}"
                )
            self.calls.append(called)
        attrs: dict[str, _Fields] = {}
        if f.get(5):
            self.path.append(desc)
            for s in f[5]:
                af = self.attribute(s, depth + 1)
                attrs[self.label(af.get(1))] = af
            self.path.pop()
        if domain in _ONNX_ALIASES and op in _SIZED_OPS:
            ins = [self.raw(s) for s in f.get(1, ())]
            outs = [self.raw(s) for s in f.get(2, ())]
            self.sized(op, desc, ins, outs, attrs)

    def attribute(self, span: _Span, depth: int) -> _Fields:
        f = self.scan(span, depth, _ATTRIBUTE)
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

    def opsets(self, spans: list, depth: int, allowed: frozenset[str], where: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in spans:
            f = self.scan(s, depth, _OPSET)
            domain = self.text(f.get(1), f"{where} domain")
            if domain not in allowed:
                raise self.reject(f"{where} domain '{domain}' is not allowed; allowed: {_domain_list(self.shown)}")
            versions = f.get(2)
            out[domain] = _signed64(versions[-1]) if versions else 0
        return out

    def model(self) -> ModelSummary:
        size = len(self.buf)
        f = self.scan((0, size), 0, _MODEL)
        if not f.get(7):
            raise self.reject("not an ONNX model: no graph")

        metadata: dict[str, str] = {}
        for s in f.get(14, ()):
            kv = self.scan(s, 1, _SSE_KEEP)
            key, value = self._utf8(kv.get(1)), self._utf8(kv.get(2))
            if key == "ort_config":
                raise self.reject("metadata_props key 'ort_config' (onnxruntime session options) is not allowed")
            metadata[key] = value

        # Local functions: collect signatures first, so nodes anywhere can be matched against them.
        functions: list[tuple[str, _Fields]] = []
        for s in f.get(25, ()):
            ff = self.scan(s, 1, _FUNCTION)
            name = self.text(ff.get(1), "function name")
            domain = self.text(ff.get(10), f"domain of function '{name}'")
            overload = self.text(ff.get(13), f"overload of function '{name}'")
            qual = f"{domain}::{name}" + (f" (overload '{overload}')" if overload else "")
            if domain in self.allowed or _reserved(domain):
                raise self.reject(
                    f"function '{qual}' uses domain '{domain}', which is reserved for built-in operators "
                    "(onnxruntime would run a built-in op instead); local functions need their own domain"
                )
            if (domain, name, overload) in self.functions:
                raise self.reject(f"function '{qual}' is defined twice")
            self.functions[(domain, name, overload)] = len(functions)
            functions.append((qual, ff))
        self.function_domains = frozenset(d for d, _, _ in self.functions)
        opset_ok = self.allowed | self.function_domains

        fn_nodes: list[int] = []
        fn_calls: list[list[int]] = []
        for qual, ff in functions:
            self.path = [f"function '{qual}'"]
            self.calls, self.nodes, self.consts = [], 0, {}
            for i, s in enumerate(ff.get(7, ())):
                self.node(s, 2, i)
            for s in ff.get(11, ()):
                self.attribute(s, 2)
            self.opsets(ff.get(9, []), 2, opset_ok, "opset_import")
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
            tf = self.scan(s, 1, _TRAINING)
            for field, part in ((1, "initialization"), (2, "algorithm")):
                for g in tf.get(field, ()):
                    self.path, self.calls, self.consts = [f"training_info[{i}] {part}"], [], {}
                    self.graph(g, 2, label=False)
        self.path = []
        opsets = self.opsets(f.get(8, []), 1, opset_ok, "opset_import")
        expanded = self.expand(node_count, main_calls, fn_nodes, fn_calls, [q for q, _ in functions])

        ir = f.get(1)
        return ModelSummary(
            size_bytes=size,
            ir_version=_signed64(ir[-1]) if ir else 0,
            producer_name=self._utf8(f.get(2)),
            producer_version=self._utf8(f.get(3)),
            opsets=opsets,
            node_count=node_count,
            expanded_node_count=expanded,
            initializer_count=n_init,
            initializer_bytes=n_bytes,
            function_count=len(functions),
            metadata_props=metadata,
            unknown_rank=unknown_rank,
        )

    def expand(
        self, nodes: int, calls: list[int], fn_nodes: list[int], fn_calls: list[list[int]], names: list[str]
    ) -> int:
        """Node count after inlining; rejects recursion and expansion past ``max_nodes``."""
        cap = self.max_nodes + 1
        pending = [len(set(c)) for c in fn_calls]
        callers: list[list[int]] = [[] for _ in fn_calls]
        for i, c in enumerate(fn_calls):
            for j in set(c):
                callers[j].append(i)
        cost = [0] * len(fn_calls)
        depth = [0] * len(fn_calls)  # levels of functions inside one call, itself included
        ready = [i for i, p in enumerate(pending) if p == 0]
        done = 0
        while ready:  # leaves first (Kahn's algorithm on the call graph)
            i = ready.pop()
            done += 1
            cost[i] = min(cap, fn_nodes[i] - len(fn_calls[i]) + sum(cost[j] for j in fn_calls[i]))
            depth[i] = 1 + max((depth[j] for j in fn_calls[i]), default=0)
            if depth[i] > self.max_function_depth:
                raise self.too_large(
                    f"local function {names[i]!r} nests {depth[i]} levels of function calls, more than the "
                    f"worker's limit of {self.max_function_depth}"
                )
            for k in callers[i]:
                pending[k] -= 1
                if pending[k] == 0:
                    ready.append(k)
        if done < len(fn_calls):
            stuck = ", ".join(repr(names[i]) for i, p in enumerate(pending) if p)
            raise self.reject(f"local functions call themselves recursively: {stuck}")
        total = nodes - len(calls) + sum(cost[j] for j in calls)  # a call is replaced by its body
        if total > self.max_nodes:
            raise self.too_large(f"plan expands to more than {self.max_nodes} nodes once local functions are inlined")
        return total

    def unknown_rank(self, graph: _Span) -> list[str]:
        """Names of the graph's tensor inputs and outputs whose type has no shape (unknown rank)."""
        f = self.scan(graph, 1, _GRAPH_PORTS)
        out = []
        for s in f.get(11, []) + f.get(12, []):
            vi = self.scan(s, 2, _VALUE_INFO_KEEP)
            for t in vi.get(2, ())[-1:]:
                tensor = self.scan(t, 3, _TYPE_KEEP).get(1)
                if tensor and not self.scan(tensor[-1], 4, _TENSOR_TYPE_KEEP).get(2):
                    out.append(self._utf8(vi.get(1)))
        return out

    def _utf8(self, spans: list | None) -> str:
        if not spans:
            return ""
        s, e = spans[-1]
        return bytes(self.buf[s:e]).decode("utf-8", "replace")


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
        raise PlanRejected(f"plan is {_human(size)}, over the worker limit of {_human(max_bytes)}")
    if size > PROTOBUF_LIMIT:
        raise PlanRejected(f"plan is {_human(size)}, over protobuf's 2 GiB limit")
    if bytes(buf[4:8]) == b"ORTM":
        raise PlanRejected("plan carries the ORT-format identifier 'ORTM'; only ONNX protobuf plans are accepted")
    checker = _Checker(
        buf, frozenset(allowed_domains), max_bytes, max_nodes, max_tensor_bytes, max_function_depth, max_loop_trips
    )
    return checker.model()
