"""A plan's convolutions as onnxruntime's NCHWc kernels: a worker-side rewrite of an accepted plan's bytes.

onnxruntime's own NCHWc transformer blocks the activations by MLAS's channel block and pre-packs *constant*
weights for MLAS's direct convolution kernels; a training step's weights are graph inputs, so it leaves every
Conv on the generic im2col + SGEMM path. The kernels do not need constant weights (``com.microsoft.nchwc``
``Conv`` reads its filter as given each run), so :func:`rewrite` writes the transform into the graph: the
weight reordered each run by Reshape ``(C_out/b, b, C_in/b, b, kh, kw)``, Transpose to MLAS's OIHWBiBo (OIHWBo
for the stem form, whose few input channels stay NCHW), Reshape back to ``(C_out, C_in, kh, kw)``; then
``ReorderInput`` (one for the Convs that read the same input), the NCHWc ``Conv``, ``ReorderOutput``. A
ResNet training step takes 14-23% less CPU (bench/README.md, tenth pass).

Why here and not in the plan: the domain is one no client may name (transport/plandomains.py), because the
NCHWc ``Conv`` trusts its filter to be block-padded and does not check its bias's length, and the block is
this CPU's. So the rewrite takes only Convs whose weight shape is known by rule (transport/shapes.py, the
same at two batch sizes): 2-d, one group, no ``auto_pad``, float32, ``C_out`` a multiple of the block,
``C_in`` one too or below it, the weight not an initializer (onnxruntime's transformer handles constant ones).
And it does not trust that knowledge: Reshapes pin the filter to the shape the kernel trusts, the bias to
``C_out`` values and the input to ``C_in`` channels (``ReorderInput`` would zero-pad fewer channels up to the
block, and the kernel's check would then pass), so a graph whose inferred shapes lie fails in a Reshape or in
the kernels' own shape checks with a clean error, never inside MLAS and never with another result than the
plan's Conv gives. Every other byte of the model is kept.
"""

from __future__ import annotations

import functools

from planwire.transport import protowire as pw
from planwire.transport.estimate import input_shapes, walk
from planwire.transport.graph import FLOAT, Graph, Node, read_graph

DOMAIN = "com.microsoft.nchwc"
_KEPT = ("kernel_shape", "strides", "pads", "dilations")  # the Conv attributes the NCHWc Conv takes as they are


def rewrite(data: bytes, block: int) -> tuple[bytes, int]:
    """``data`` (a serialized ONNX model) with its eligible Convs as NCHWc kernels of ``block`` channels, and
    how many were rewritten (``data`` itself when none)."""
    if block <= 1:
        return data, 0
    g = read_graph(data)
    convs = _eligible(g, block)
    if not convs:
        return data, 0
    taken = {n for node in g.nodes for n in (*node.inputs, *node.outputs)} | set(g.initializers) | set(g.inputs)
    model = list(pw.spans(data))
    at = [i for i, (num, _, _) in enumerate(model) if num == 7]
    if len(at) != 1 or not isinstance(model[at[0]][2], memoryview):  # two graphs would merge: not one to rewrite
        return data, 0
    graph_at = at[0]
    nodes, added, reordered, count = [], [], {}, 0
    node_index = 0
    for num, raw, payload in pw.spans(model[graph_at][2]):
        if num != 1 or not isinstance(payload, memoryview):
            nodes.append(raw)
            continue
        node, node_index = g.nodes[node_index], node_index + 1
        shape = convs.get(id(node))
        p = node.outputs[0] + "/nchwc"
        if shape is None or any(n.startswith(p) for n in taken):
            nodes.append(raw)
            continue
        out, inputs = _conv(node, payload, shape, block, p, reordered)
        nodes += out
        added += inputs
        count += 1
    if not count:
        return data, 0
    graph = _field(7, b"".join(nodes) + b"".join(added))
    opset = _field(8, _str(1, DOMAIN) + _varint_field(2, 1))
    body = b"".join(graph if i == graph_at else raw for i, (_, raw, _) in enumerate(model))
    return body + opset, count


def _eligible(g: Graph, block: int) -> dict[int, tuple[int, ...]]:
    """id of each Conv node the rewrite may take -> its weight's shape."""
    if not any(n.op == "Conv" and not n.domain for n in g.nodes):
        return {}
    seen: list[dict[int, tuple[int, ...]]] = []
    for batch in (1, 2):  # a weight whose shape follows the batch is not known
        try:
            shapes = input_shapes(g, batch=batch)
        except ValueError:
            return {}
        found = {}
        for node, ins, _ in walk(g, shapes):
            if (
                node.op != "Conv"
                or node.domain
                or len(ins) < 2
                or node.inputs[1] in g.initializers
                or not (node.outputs and node.outputs[0])
            ):
                continue
            x, w = ins[0], ins[1]
            dims = w.shape if w is not None else None
            if x is None or x.elem != FLOAT or w.elem != FLOAT or dims is None or len(dims) != 4 or 0 in dims:
                continue
            co, ci = dims[0], dims[1]
            auto = node.attrs.get("auto_pad") or "NOTSET"
            if (
                node.attrs.get("group", 1) == 1
                and auto == "NOTSET"
                and co % block == 0
                and (ci % block == 0 or ci < block)
            ):
                found[id(node)] = tuple(dims)
        if not found:
            return {}
        seen.append(found)
    return {k: v for k, v in seen[0].items() if seen[1].get(k) == v}


def _conv(
    node: Node, payload: memoryview, shape: tuple[int, ...], block: int, p: str, reordered: dict[str, str]
) -> tuple[list[bytes], list[bytes]]:
    """The nodes that replace one Conv (its raw attributes kept), and the shape constants they read."""
    co, ci, kh, kw = shape
    stem = ci < block
    blocked = [co // block, block, ci, kh, kw] if stem else [co // block, block, ci // block, block, kh, kw]
    perm = [0, 2, 3, 4, 1] if stem else [0, 2, 4, 5, 3, 1]
    consts = [_int64s(p + "/blocked", blocked), _int64s(p + "/shape", list(shape)), _int64s(p + "/co", [co])]
    out = [
        _node("Reshape", [node.inputs[1], p + "/blocked"], [p + "/w6"]),
        _node("Transpose", [p + "/w6"], [p + "/wt"], _ints_attr("perm", perm)),
        _node("Reshape", [p + "/wt", p + "/shape"], [p + "/w"]),  # pins the filter shape the kernel trusts
    ]
    x = node.inputs[0]
    if not stem:
        if x not in reordered:  # X's channels pinned too: ReorderInput would zero-pad fewer up to the block
            consts.append(_int64s(p + "/cin", [0, ci, 0, 0]))
            out.append(_node("Reshape", [x, p + "/cin"], [p + "/xc"]))
            out.append(_node("ReorderInput", [p + "/xc"], [p + "/x"], domain=DOMAIN))
            reordered[x] = p + "/x"
        x = reordered[x]
    bias = []
    if len(node.inputs) > 2 and node.inputs[2]:
        out.append(_node("Reshape", [node.inputs[2], p + "/co"], [p + "/b"]))  # the kernel reads C_out values
        bias = [p + "/b"]
    attributes = ((raw, a) for num, raw, a in pw.spans(payload) if num == 5 and isinstance(a, memoryview))
    attrs = b"".join(raw for raw, a in attributes if _attr_name(a) in _KEPT)
    out.append(_node("Conv", [x, p + "/w", *bias], [p + "/y"], attrs, domain=DOMAIN))
    out.append(_node("ReorderOutput", [p + "/y"], node.outputs[:1], _int_attr("channels", co), domain=DOMAIN))
    return out, consts


def at_this_block(data: bytes) -> tuple[bytes, int, int]:
    """:func:`rewrite` at this CPU's :func:`block` (probed at the first plan that may have a Conv): the model,
    how many Convs were rewritten, the block."""
    if b"Conv" not in data:
        return data, 0, 0
    b = block()
    rewritten, count = rewrite(data, b)
    return rewritten, count, b


@functools.cache
def block() -> int:
    """MLAS's NCHWc channel block on this CPU (8 with AVX2, 16 with AVX-512F; onnxruntime reports it nowhere):
    the channels ReorderInput pads 4 to, probed once per process at first need; 1 when there is none."""
    try:
        import numpy as np
        import onnxruntime as ort

        from planwire.transport.ortoptions import session_options

        float_type = _field(2, _field(1, _varint_field(1, FLOAT)))  # TypeProto.tensor_type.elem_type
        graph = (
            _node("ReorderInput", ["x"], ["y"], domain=DOMAIN)
            + _field(11, _str(1, "x") + float_type)
            + _field(12, _str(1, "y") + float_type)
        )
        model = (
            _varint_field(1, 8)
            + _field(8, _str(1, "") + _varint_field(2, 17))
            + _field(8, _str(1, DOMAIN) + _varint_field(2, 1))
            + _field(7, _str(2, "probe") + graph)
        )
        session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
        return int(session.run(None, {"x": np.zeros((1, 4, 1, 1), np.float32)})[0].shape[1])
    except Exception:  # no NCHWc kernels in this build or on this CPU: no rewrite
        return 1


# --- a minimal protobuf writer ---------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append(n & 0x7F | 0x80)
        n >>= 7


def _field(num: int, payload: bytes | memoryview) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + bytes(payload)


def _varint_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _str(num: int, text: str) -> bytes:
    return _field(num, text.encode())


def _node(op: str, inputs: list[str], outputs: list[str], attrs: bytes = b"", *, domain: str = "") -> bytes:
    """A NodeProto field of a graph: inputs 1, outputs 2, op_type 4, attribute 5, domain 7."""
    body = b"".join(_str(1, n) for n in inputs) + b"".join(_str(2, n) for n in outputs) + _str(4, op) + attrs
    return _field(1, body + (_str(7, domain) if domain else b""))


def _int_attr(name: str, value: int) -> bytes:
    return _field(5, _str(1, name) + _varint_field(3, value) + _varint_field(20, 2))  # type INT


def _ints_attr(name: str, values: list[int]) -> bytes:
    return _field(5, _str(1, name) + b"".join(_varint_field(8, v) for v in values) + _varint_field(20, 7))  # INTS


def _int64s(name: str, values: list[int]) -> bytes:
    """An int64 initializer field of a graph: dims 1, data_type 2, int64_data 7 (packed), name 8."""
    body = _varint_field(1, len(values)) + _varint_field(2, 7)
    return _field(5, body + _field(7, b"".join(_varint(v) for v in values)) + _str(8, name))


def _attr_name(payload: memoryview) -> str:
    return next((pw.text(v) for num, v in pw.fields(payload) if num == 1), "")
