"""ONNX models read straight off the protobuf wire format: field tables and one bounded reader.

Pure Python, no ``onnx`` package, no copies of tensor payloads (``raw_data`` and other large fields are
skipped by length): a worker-only install reads hostile plans with it (:mod:`.plancheck`, the policy) and
describes plans with it (metadata, initializer sizes). The tables below hold, for each message type
planwire reads, which field numbers may appear with which wire types, which are kept for the caller and
which are sub-messages walked generically; field numbers are those of onnx.proto of onnx 1.23.

The reader validates as it walks (truncated varints, lengths past the enclosing message, group or invalid
wire types, a known field with the wrong wire type, unknown fields in strict messages, nesting deeper than
:data:`MAX_DEPTH`, more than :data:`MAX_FIELDS` fields) and raises :class:`PlanRejected` naming the fault.
"""

from __future__ import annotations

from planwire.transport.errors import printable

MAX_DEPTH = 64
"""Deepest protobuf message nesting accepted (ModelProto is depth 0)."""
MAX_FIELDS = 5_000_000
"""Most protobuf fields walked in one plan; bounds the time spent on pathological encodings."""

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


# --- field tables -------------------------------------------------------------------------------------

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
SSE_KEEP = _Msg("StringStringEntryProto", False, _keep(1, 2))
OPSET = _Msg("OperatorSetIdProto", False, {**_keep(1), **_keep(2, mask=_V)})
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
MODEL = _Msg(
    "ModelProto",
    True,
    {
        **_keep(1, 5, mask=_V),
        **_keep(2, 3, 7, 8, 14, 20, 25),
        **_plain(4, 6),
        **_sub(_DEVICE, 26),
    },
)
GRAPH = _Msg(
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
NODE = _Msg(
    "NodeProto",
    True,
    {**_plain(6), **_keep(1, 2, 3, 4, 5, 7, 8), **_sub(_SSE, 9), **_sub(_NODE_DEVICE, 10)},
)
ATTRIBUTE = _Msg(
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
TENSOR = _Msg(
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
GRAPH_PORTS = _Msg("GraphProto", False, _keep(11, 12))
VALUE_INFO_KEEP = _Msg("ValueInfoProto", False, _keep(1, 2))
TYPE_KEEP = _Msg("TypeProto", False, _keep(1))
TENSOR_TYPE_KEEP = _Msg("TypeProto.Tensor", False, _keep(2))
# Describing a plan (its metadata and initializer sizes; read by the exporter's summary, checked or not).
MODEL_FACTS = _Msg("ModelProto", False, _keep(7, 14))
GRAPH_INITIALIZERS = _Msg("GraphProto", False, _keep(5))
TENSOR_NAME_DIMS = _Msg("TensorProto", False, {**_keep(1, mask=_V | _L), **_keep(8)})
SPARSE = _Msg("SparseTensorProto", True, {**_keep(1, 2), **_keep(3, mask=_V | _L)})
# Bits per element by TensorProto.DataType (onnxruntime densifies sparse tensors); unknown types: 128.
ELEM_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64}
ELEM_BITS.update({15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2})
ELEM_BITS.update({27: 6, 28: 6})
FUNCTION = _Msg(
    "FunctionProto",
    True,
    {**_keep(1, 7, 9, 10, 11, 13), **_plain(4, 5, 6, 8), **_sub(_VALUE_INFO, 12), **_sub(_SSE, 14)},
)
TRAINING = _Msg("TrainingInfoProto", True, {**_keep(1, 2), **_sub(_SSE, 3, 4)})

Span = tuple[int, int]
Fields = dict[int, list]


def signed64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def itemsize(f: Fields) -> float:
    """Bytes per element of a TensorProto (its fields), from its data type; unknown types: 16."""
    types = f.get(2)
    return ELEM_BITS.get(types[-1] if types else 1, 128) / 8


class Reader:
    """One walk over one serialized message. Spans are ``(start, end)`` offsets into ``buf``; nothing is
    copied. ``path`` names where the walk is, for error messages."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.path: list[str] = []
        self.fields = 0

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
        text = printable(raw.decode("utf-8", "replace"))  # names end up in logs and replies
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

    def raw(self, span: Span) -> bytes:
        """Exact bytes of a string field (value names: compared, never shown)."""
        return bytes(self.buf[span[0] : span[1]])

    def utf8(self, spans: list | None) -> str:
        if not spans:
            return ""
        s, e = spans[-1]
        return bytes(self.buf[s:e]).decode("utf-8", "replace")

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

    def scan(self, span: Span, depth: int, msg: _Msg) -> Fields:
        """Validate one message's fields; return stored fields; walk generic sub-messages."""
        if depth > MAX_DEPTH:
            raise self.reject(f"malformed plan: messages nested deeper than {MAX_DEPTH}")
        buf = self.buf
        pos, end = span
        table = msg.fields
        out: Fields = {}
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

    def ints(self, items: list, what: str, most: int = MAX_DEPTH) -> list[int]:
        """Up to ``most`` values of a repeated int64 field stored as varints and/or packed spans."""
        out: list[int] = []
        for item in items:
            if isinstance(item, int):
                out.append(signed64(item))
            else:
                pos, end = item
                while pos < end and len(out) <= most:
                    v, pos = self.varint(pos, end)
                    out.append(signed64(v))
            if len(out) > most:
                raise self.reject(f"{what} has more than {most} entries")
        return out
