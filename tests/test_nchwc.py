"""worker/nchwc.py: a plan's Convs rewritten as onnxruntime's NCHWc kernels compute what the Convs did, the
rewrite takes only the Convs it may, and a graph whose shapes lie fails cleanly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as oh

from planwire.transport.ortoptions import session_options
from planwire.worker.nchwc import DOMAIN, block, rewrite


def _session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])


def _ops(data: bytes) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load_from_string(data).graph.node]


def test_the_block_is_mlas_and_probed_once() -> None:
    b = block()
    assert b in (8, 16)  # AVX2 or AVX-512F: every host these tests run on has one
    assert block() == b and block.cache_info().hits >= 1


def test_rewritten_convs_compute_what_the_convs_did() -> None:
    """A stem of 3 channels, 3x3 with stride and bias, 1x1, two Convs reading one input, a weight computed in
    the graph, dilation and asymmetric pads: rewritten, the same results at two batch sizes. A grouped Conv,
    one whose output channels are not a whole block and one whose weight is an initializer stay."""
    b = block()
    c = 2 * b
    weights = {"w0": [c, 3, 3, 3], "w1": [c, c, 3, 3], "w2": [c, c, 1, 1], "w3": [c, b, 3, 3], "w4": [5, c, 3, 3]}
    weights["w5"] = [b, c, 1, 1]
    rng = np.random.default_rng(0)
    const = rng.standard_normal((c, 5, 1, 1), dtype=np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "w0"], ["y0"], pads=[1] * 4),
        oh.make_node("Relu", ["y0"], ["r0"]),
        oh.make_node("Conv", ["r0", "w1", "bias"], ["y1"], pads=[1] * 4, strides=[2, 2]),
        oh.make_node("Conv", ["y1", "w2"], ["y2"]),
        oh.make_node("Conv", ["r0", "w5"], ["y6"], strides=[2, 2]),  # reads r0 as the Conv of w1 does
        oh.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0, 3, 2]),  # a weight the graph computes
        oh.make_node("Conv", ["y2", "w1t"], ["y3"], pads=[0, 1, 2, 1], dilations=[1, 2]),
        oh.make_node("Conv", ["y3", "w3"], ["y4"], pads=[1] * 4, group=2),
        oh.make_node("Conv", ["y4", "w4"], ["y5"]),
        oh.make_node("Conv", ["y5", "wc"], ["y7"]),  # a constant weight: onnxruntime's own transformer's
    ]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])]
    inputs += [oh.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in weights.items()]
    inputs += [oh.make_tensor_value_info("bias", TensorProto.FLOAT, [c])]
    outputs = [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y3", "y7", "y6")]
    init = [onnx.numpy_helper.from_array(const, "wc")]
    graph = oh.make_graph(nodes, "convs", inputs, outputs, initializer=init)
    before = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()

    after, count = rewrite(before, b)
    assert count == 5
    ops = _ops(after)
    assert ops.count((DOMAIN, "Conv")) == 5 and ops.count(("", "Conv")) == 3
    assert ops.count((DOMAIN, "ReorderInput")) == 3  # r0's shared; none for the stem, whose 3 channels stay NCHW
    assert [n for n in onnx.load_from_string(after).graph.node if n.op_type == "Conv" and not n.domain][-1].input[
        1
    ] == "wc"
    sessions = [_session(before), _session(after)]
    for n in (1, 3):
        feeds = {"x": rng.standard_normal((n, 3, 12, 12), dtype=np.float32)}
        feeds |= {k: rng.standard_normal(v, dtype=np.float32) for k, v in weights.items()}
        feeds["bias"] = rng.standard_normal(c, dtype=np.float32)
        want, got = (s.run(None, feeds) for s in sessions)
        for w, g in zip(want, got, strict=True):
            assert w.shape == g.shape
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))


def test_a_model_without_candidates_comes_back_as_it_was() -> None:
    b = block()
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["y"], group=2),
        oh.make_node("Conv", ["x", "v"], ["z"], auto_pad="SAME_UPPER"),
    ]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2 * b, 4, 4])]
    inputs += [
        oh.make_tensor_value_info(n, TensorProto.FLOAT, s)
        for n, s in (("w", [2 * b, b, 3, 3]), ("v", [b, 2 * b, 3, 3]))
    ]
    outputs = [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yz"]
    data = oh.make_model(oh.make_graph(nodes, "g", inputs, outputs)).SerializeToString()
    assert rewrite(data, b) == (data, 0)
    assert rewrite(data, 1)[1] == 0
