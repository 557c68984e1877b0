"""The plan review's cost estimate (FLOPs, peak memory) with numbers, and one renderer for both sides: the
exporter's ``plan.review()`` prints what ``plan-worker review`` prints for the same bytes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from planwire.transport.estimate import estimate, input_shapes
from planwire.transport.graph import read_graph
from planwire.transport.review import format_review, review
from tests import handmade

IN, OUT = 7, 5


def weights(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def linear(bias: bool = True) -> bytes:
    """A Linear(IN, OUT) as torch exports it: Gemm(x, W, b) with transB."""
    ins = ["x", "W", "b"] if bias else ["x", "W"]
    inits = [weights("W", OUT, IN)] + ([weights("b", OUT)] if bias else [])
    v = handmade.variant(
        [helper.make_node("Gemm", ins, ["y"], transB=1)],
        [("x", "float", ["N", IN])],
        [("y", "float", ["N", OUT])],
        inits,
    )
    return v.data


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


def cost(data: bytes, shapes=None, batch: int = 1):
    g = read_graph(data)
    return estimate(g, input_shapes(g, shapes, batch))


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_a_linear_costs_two_flops_per_multiply_add_plus_its_bias(batch):
    assert cost(linear(bias=False), batch=batch).flops == 2 * batch * IN * OUT
    e = cost(linear(), batch=batch)
    assert e.flops == 2 * batch * IN * OUT + batch * OUT
    assert e.flops_by_op == {"Gemm": e.flops} and not e.uncounted and not e.unknown_values
    assert e.initializer_bytes == 4 * (OUT * IN + OUT) and e.input_bytes == 4 * batch * IN
    assert e.output_bytes == e.intermediate_peak_bytes == 4 * batch * OUT
    assert e.peak_bytes == 4 * (OUT * IN + OUT + batch * IN + batch * OUT)


def test_a_matmul_over_batched_operands():
    v = handmade.variant(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        [("a", "float", ["B", 4, 6]), ("b", "float", [6, 3])],
        [("y", "float", ["B", 4, 3])],
    )
    assert cost(v.data, {"a": [10, 4, 6]}).flops == 2 * 10 * 4 * 6 * 3


def test_a_conv_with_stride_and_padding():
    """x [N, 3, 8, 8] * W [4, 3, 3, 3], stride 2, pad 1 -> [N, 4, 4, 4]: 2 * out * 3 * 9 (+ out for the bias),
    then a 2x2 max-pool -> [N, 4, 2, 2], 4 comparisons per output."""
    v = handmade.variant(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
        ],
        [("x", "float", ["N", 3, 8, 8])],
        [("y", "float", ["N", 4, 2, 2])],
        [weights("W", 4, 3, 3, 3), weights("B", 4)],
    )
    e = cost(v.data, batch=5)
    out = 5 * 4 * 4 * 4
    assert e.flops_by_op == {"Conv": 2 * out * 3 * 9 + out, "MaxPool": 5 * 4 * 2 * 2 * 4}
    assert e.intermediate_peak_bytes == 4 * (out + 5 * 4 * 2 * 2)  # c and y alive while the pool runs


def test_peak_memory_follows_the_node_order_and_frees_what_is_no_longer_read():
    """a = relu(x); b = exp(a); c = a + b; y = neg(c): a, b, c are alive at once at the Add (3 * 4N bytes),
    a and b are freed after it, so y's node sees c and y (2 * 4N)."""
    v = handmade.variant(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Exp", ["a"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("Neg", ["c"], ["y"]),
        ],
        [("x", "float", ["N", 10])],
        [("y", "float", ["N", 10])],
    )
    e = cost(v.data, batch=4)
    assert e.intermediate_peak_bytes == 3 * 4 * 40 and e.input_bytes == 4 * 40
    assert e.flops == 4 * 40 and e.flops_by_op == {"Relu": 40, "Exp": 40, "Add": 40, "Neg": 40}


def test_a_dynamic_reshape_is_followed_through_shape_arithmetic():
    """Reshape(x, Concat(Gather(Shape(x), 0), [6])) then MatMul with W [6, 4]: no declared intermediate
    shapes, the target comes from following the small int64 tensors."""
    v = handmade.variant(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"]),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
            helper.make_node("Concat", ["n1", "six"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["y"]),
        ],
        [("x", "float", ["N", 2, 3])],
        [("y", "float", ["N", 4])],
        [
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(np.array([6], np.int64), "six"),
            weights("W", 6, 4),
        ],
    )
    e = cost(v.data, batch=9)
    assert e.flops == 2 * 9 * 6 * 4 and not e.uncounted and not e.unknown_values


def test_shapes_no_rule_knows_come_from_the_plans_declared_symbols():
    """Pad has no shape rule here: its output is the declared ``N + 2`` (a torch.export-style expression);
    without a declaration it is unknown, said, and counted 0."""
    pad = helper.make_node("Pad", ["x", "pads"], ["p"])
    v = handmade.variant([pad], [("x", "float", ["N"])], [("p", "float", ["M"])])
    assert cost(v.data, {"x": [30]}).unknown_values == 1
    pad = helper.make_node("Pad", ["x", "pads"], ["p"])
    v = handmade.variant(
        [pad, helper.make_node("Relu", ["p"], ["y"])],
        [("x", "float", ["N"])],
        [("y", "float", ["N + 2"])],
        [numpy_helper.from_array(np.array([1, 1], np.int64), "pads")],
    )
    model = onnx.load_from_string(v.data)
    model.graph.value_info.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N + 2"]))
    e = cost(model.SerializeToString(), {"x": [30]})
    assert e.flops_by_op == {"Relu": 32} and e.output_bytes == 4 * 32 and not e.unknown_values


def test_what_it_cannot_size_is_reported_not_guessed():
    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["x"], ["v"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v", 1, None)],
    )
    v = handmade.variant(
        [helper.make_node("Loop", ["trips", ""], ["y"], body=loop_body)],
        [("x", "float", ["N"]), ("trips", "int64", [])],
        [("y", "float", ["T", "N"])],
    )
    r = review(v.data, batch=2)
    assert r.estimate.uncounted == {"Loop": 1} and r.estimate.unknown_values == 1
    text = format_review(r)
    assert "NOT counted (control-flow bodies, local functions, unknown shapes): Loop 1" in text
    assert "counted 0, so this is a lower bound" in text


def test_bad_shapes_name_the_input_and_what_fits():
    data = linear()
    with pytest.raises(ValueError, match="no input named 'z'; the plan's inputs are x"):
        review(data, {"z": [1, IN]})
    with pytest.raises(ValueError, match=r"input 'x' axis 1 is fixed at 7, got shape \[2, 8\]"):
        review(data, {"x": [2, 8]})
    with pytest.raises(ValueError, match=r"input 'x' has rank 2 \[\?, 7\], got shape \[2\]"):
        review(data, {"x": [2]})


def test_the_review_text_shows_the_estimate_at_the_given_batch(tmp_path):
    path = tmp_path / "linear.onnx"
    path.write_bytes(linear())
    done = cli("planwire.worker", "review", str(path), "--shape", "x=3,7")
    assert done.returncode == 0, done.stderr
    assert "cost at x=[3, 7]" in done.stdout
    assert f"FLOPs {2 * 3 * IN * OUT + 3 * OUT:,} " in done.stdout and "Gemm 225" in done.stdout
    assert "peak memory 304 B: initializers 160 B, inputs 84 B, intermediates at most 60 B" in done.stdout
    bad = cli("planwire", "review", str(path), "--shape", "x=3")
    assert bad.returncode == 2 and "input 'x' has rank 2" in bad.stderr


def test_the_exporter_prints_the_review_the_worker_prints(tmp_path):
    """One renderer: ``plan.review()`` on the data scientist's side == ``plan-worker review`` of the same
    bytes on the owner's side, for a real exported Linear (whose FLOPs are known exactly)."""
    torch = pytest.importorskip("torch")
    import planwire as sy

    class Linear(sy.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(IN, OUT)

        def forward(self, x):
            return torch.relu(self.fc(x))

    plan = Linear()
    plan.build(torch.zeros(2, IN), dynamic_axes=[[0]])
    text = plan.review(batch=16)
    assert f"FLOPs {2 * 16 * IN * OUT + 16 * OUT + 16 * OUT:,} " in text  # Gemm with its bias, then Relu
    assert f"fingerprint {plan.variants[0].id}" in text and "PRIVATE-DERIVED from x" in text
    path = plan.save(tmp_path / "linear.onnx")
    done = cli("planwire.worker", "review", str(path), "--batch", "16")
    assert done.returncode == 0, done.stderr
    assert done.stdout == text + "\n"
    assert plan.review({"x": [16, IN]}, batch=16) == text
