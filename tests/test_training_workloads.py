"""The bench's real workloads as training plans, and the graph changes made for their speed.

The ResNet-style CNN (convolutions with stride and padding, BatchNorm, residual additions) and the causal
transformer LM of bench/workloads.py run several onnxruntime steps against eager torch + torch.optim at batch
sizes other than the traced one (tests/test_training_step.check_parity: loss, every parameter, every buffer,
rtol 1e-4), with SGD + momentum, which carries a gradient's rounding into the parameters linearly. Adam does
not: its first step divides each gradient by its own magnitude, so a gradient near zero that float32 sums by
cancellation (BatchNorm and LayerNorm weight gradients) in a different order than torch's kernels moves its
parameter by a visibly different amount; with these models' 37k and 12k weights one element in ~10^4 exceeded
rtol 1e-4 that way, in the LM too (already before its LayerNorm weight and bias gradient sums became ones @ x
MatMuls, leading_sums_as_products: another summation order). Adam itself is checked against torch.optim in
tests/test_training_decomp.py and on small models in tests/test_training_step.py.
The graph checks pin what the decompositions changed: ReLU's backward is a mask multiply (no Where over
activations), a 2-d convolution's weight gradient is per-tap MatMuls (per sample on the larger layers), and a
stride-1 input gradient is a Conv with the flipped kernel rather than a ConvTranspose.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import workloads
from planwire.exporter.training import conv_backward as C
from tests.test_training_step import check_parity

aten = torch.ops.aten


def small_resnet() -> nn.Module:
    """The bench's ResNet on 8x8 inputs (the same layers; the stages' strides bring it to 2x2)."""
    return workloads.resnet(seed=int(torch.randint(0, 1000, ())))


def _ops(step: object) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in step.model.graph.node)  # type: ignore[attr-defined]


@pytest.mark.timeout(1800)  # a ResNet build takes minutes on a loaded 2-core host
def test_resnet_steps_match_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def batch(n: int, gen: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)]

    # the 8x8 and 4x4 layers' weight gradients as per-sample products (as the bench's 32x32 and 16x16
    # layers), the 2x2 layers' as one MatMul over the batch (as its 8x8 layers): both forms in one build
    monkeypatch.setattr(C, "PER_SAMPLE_TAPS", 16)
    step = check_parity(small_resnet, F.cross_entropy, "sgd", [(-1, 3, 8, 8), (-1,)], batch)
    ops = _ops(step)
    # per-sample taps: a MatMul of the (N, C_out, Y) gradient as it stands; 9 per 3x3 convolution of the
    # stem and the first two stages (5), one for the 1x1 shortcut; the last stage's 19 over the batch
    inferred = onnx.shape_inference.infer_shapes(step.model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    matmuls = collections.Counter(ranks.get(n.input[0]) for n in inferred.graph.node if n.op_type == "MatMul")
    assert matmuls[3] == 9 * 5 + 1
    assert matmuls[2] >= 9 * 2 + 1
    # each tap's window is one Slice of the channels-last input, except the centre tap of the 5 stride-1
    # 3x3 convolutions, which reads that input as it is (the 2 stride-2 3x3 and the 2 1x1 shortcuts: all)
    windows = collections.Counter(
        _source(inferred.graph, n.input[1]) for n in inferred.graph.node if n.op_type == "MatMul"
    )
    assert windows["Slice"] == 8 * 5 + 9 * 2 + 2
    assert windows["Transpose"] >= 5
    # the forward's 9 (stem, 2 per block, 2 shortcuts) and 4 stride-1 input gradients (flipped kernel);
    # no weight-gradient Conv; ConvTranspose only for the 4 stride-2 input gradients (none for the stem)
    assert (ops["Conv"], ops["ConvTranspose"]) == (13, 4)
    assert ops["Where"] <= 3  # the loss's; none over activations


def _source(graph: onnx.GraphProto, name: str) -> str | None:
    """The op that computes ``name``, looking through Reshape and Identity (which copy nothing)."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(name)
    while node is not None and node.op_type in ("Reshape", "Identity"):
        node = producers.get(node.input[0])
    return node.op_type if node is not None else None


@pytest.mark.timeout(1800)
def test_transformer_lm_steps_match_eager() -> None:
    def batch(n: int, gen: torch.Generator) -> list[torch.Tensor]:
        seq = torch.randint(0, workloads.LM_VOCAB, (n, 9), generator=gen)
        return [seq[:, :-1].contiguous(), seq[:, 1:].contiguous()]

    def lm_small() -> nn.Module:
        return workloads.lm(seed=int(torch.randint(0, 1000, ())))

    step = check_parity(lm_small, workloads.lm_loss, "sgd", [(-1, 8), (-1, 8)], batch, args_dtypes=[torch.int64] * 2)
    # the linear layers' weight gradients read their (N*T, out) gradient transposed in a Gemm (9 linear
    # layers: 4 per block and the head); no MatMul reads a 2-d Transpose
    nodes = step.model.graph.node  # type: ignore[attr-defined]
    gemms = [n for n in nodes if n.op_type == "Gemm"]
    assert sum(a.name == "transA" and a.i == 1 for n in gemms for a in n.attribute) == 9
    flips = {n.output[0] for n in nodes if n.op_type == "Transpose" and len(n.attribute[0].ints) == 2}
    assert not [n.name for n in nodes if n.op_type == "MatMul" and flips & set(n.input)]


@pytest.mark.parametrize(
    ("kernel", "stride", "pad", "dil", "size"),
    [
        ((3, 3), (1, 1), (1, 1), (1, 1), (8, 8)),
        ((3, 3), (2, 2), (1, 1), (1, 1), (9, 8)),
        ((1, 1), (2, 2), (0, 0), (1, 1), (8, 8)),
        ((3, 2), (2, 1), (0, 2), (2, 1), (9, 7)),
        # from PER_SAMPLE_TAPS output pixels per image: per-sample products summed over the batch
        ((3, 3), (1, 1), (1, 1), (1, 1), (16, 17)),
        ((3, 3), (2, 2), (1, 1), (1, 1), (33, 32)),
        ((1, 1), (2, 2), (0, 0), (1, 1), (32, 32)),
        ((3, 2), (1, 1), (0, 2), (2, 1), (18, 16)),
        # stride 1, output as large as the input: the tap at the padding's offset reads the input unsliced
        ((3, 3), (1, 1), (2, 2), (2, 2), (9, 8)),
        ((1, 1), (1, 1), (0, 0), (1, 1), (16, 17)),
        ((3, 1), (1, 1), (1, 0), (1, 1), (16, 16)),
    ],
)
def test_conv_weight_grad_by_taps_matches_aten(
    kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int], dil: tuple[int, int], size: tuple[int, int]
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, *size, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 3, *kernel, dtype=torch.float64, generator=gen)
    args = (list(stride), list(pad), list(dil), False, [0, 0], 1)
    grad = torch.randn(aten.convolution(x, w, None, *args).shape, dtype=torch.float64, generator=gen)
    ref = aten.convolution_backward(grad, x, w, None, *args, [False, True, False])[1]
    ours = C._conv_weight_grad_taps(grad, x, w.shape, stride, pad, dil)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    strided = grad.transpose(2, 3).contiguous().transpose(2, 3)  # a gradient that is not contiguous
    torch.testing.assert_close(C._conv_weight_grad_taps(strided, x, w.shape, stride, pad, dil), ref)


def _select_model(zero_first: bool, dtype: int) -> bytes:
    """``y = Where(x <= 0, 0, g)`` (or ``Where(x > 0, g, 0)``) over (n, 5) tensors of ``dtype``."""
    from onnx import helper

    values = [helper.make_tensor_value_info(n, dtype, ["n", 5]) for n in ("x", "g")]
    cond = helper.make_node("LessOrEqual" if zero_first else "Greater", ["x", "zero"], ["c"])
    where = helper.make_node("Where", ["c", "zero", "g"] if zero_first else ["c", "g", "zero"], ["y"])
    graph = helper.make_graph(
        [cond, where],
        "select",
        values,
        [helper.make_tensor_value_info("y", dtype, ["n", 5])],
        initializer=[helper.make_tensor("zero", dtype, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return model.SerializeToString()


@pytest.mark.parametrize("zero_first", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_guarded_zero_select_equals_where_for_every_gradient(zero_first: bool, dtype: str) -> None:
    """The pass keeps Where's values (torch's ``threshold_backward``) where the gradient is inf or NaN at a
    masked position, where a bare mask multiply gives NaN."""
    import onnx
    import onnxruntime as ort

    from planwire.exporter.training.graph_passes import guard_zero_selects
    from planwire.worker.arenas import sizes_follow_shapes

    onnx_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    data = _select_model(zero_first, onnx_type)
    proto = onnx.ModelProto.FromString(data)
    assert guard_zero_selects(proto) == 1
    assert collections.Counter(n.op_type for n in proto.graph.node)["If"] == 1
    assert "Where" not in [n.op_type for n in proto.graph.node]
    onnx.checker.check_model(proto, full_check=True)
    assert sizes_follow_shapes(proto.SerializeToString())  # branches sized by shapes: an arena (worker/arenas.py)
    plain = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    guarded = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(dtype)
    x[0, :3] = [0.0, -0.0, np.nan]
    for bad in (None, np.inf, -np.inf, np.nan):
        g = rng.standard_normal((6, 5)).astype(dtype)
        if bad is not None:
            g[x <= 0] = bad  # non-finite exactly where the mask zeroes it
            g[1, 1] = bad if x[1, 1] > 0 else g[1, 1]
        want = plain.run(None, {"x": x, "g": g})[0]
        got = guarded.run(None, {"x": x, "g": g})[0]
        np.testing.assert_array_equal(got, want, err_msg=f"gradient {bad}")
        assert got.dtype == want.dtype and np.isnan(got).sum() == np.isnan(want).sum()


def test_guard_leaves_other_selects() -> None:
    """Integer selects, selects between two tensors and non-zero constants keep their Where."""
    from onnx import TensorProto, helper

    from planwire.exporter.training.graph_passes import guard_zero_selects

    nodes = [
        helper.make_node("Where", ["c", "i", "izero"], ["a"]),  # int64: nothing to guard
        helper.make_node("Where", ["c", "f", "f"], ["b"]),  # two tensors
        helper.make_node("Where", ["c", "one", "f"], ["d"]),  # a non-zero constant
    ]
    graph = helper.make_graph(
        nodes,
        "selects",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, [3]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("f", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info(n, t, [3]) for n, t in (("a", 7), ("b", 1), ("d", 1))],
        initializer=[
            helper.make_tensor("izero", TensorProto.INT64, [], [0]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    before = proto.SerializeToString()
    assert guard_zero_selects(proto) == 0
    assert proto.SerializeToString() == before


def test_relu_backward_of_a_non_finite_gradient_matches_torch() -> None:
    """``sqrt(relu(z))`` has an infinite gradient wherever the ReLU outputs 0, and torch's ReLU backward
    zeroes it there: the parameters stay finite, in the plan as in torch (a bare mask multiply gave NaN)."""

    def sqrt_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out.sqrt() - target) ** 2).mean()

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU())

    def batch(n: int, gen: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(n, 4, generator=gen), torch.rand(n, 16, generator=gen)]

    step = check_parity(model, sqrt_loss, "sgd", [(-1, 4), (-1, 16)], batch)
    assert "If" in _ops(step)


def test_merge_slices_one_copy_for_two_axes() -> None:
    """Slice(Slice(x)) over disjoint axes becomes one Slice with the same result; an inner Slice that
    something else reads stays for it; overlapping axes are left alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from planwire.exporter.training.graph_passes import merge_slices

    def ints(name: str, values: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    nodes = [
        helper.make_node("Slice", ["x", "s1", "e1", "a1", "p1"], ["rows"]),  # rows 1, 3, 5 of axis 1
        helper.make_node("Slice", ["rows", "s2", "e2", "a2"], ["a"]),  # then columns 2..-1 of axis 2
        helper.make_node("Slice", ["rows", "s3", "e3", "a3"], ["b"]),  # then channels 0..2 of axis 3
        helper.make_node("Slice", ["a", "s2", "e2", "a2"], ["c"]),  # the same axis again: not merged
        helper.make_node("Neg", ["rows"], ["d"]),  # the inner Slice still read here in the second graph
    ]
    inits = [
        *(ints(n, v) for n, v in [("s1", [1]), ("e1", [6]), ("a1", [1]), ("p1", [2])]),
        *(ints(n, v) for n, v in [("s2", [2]), ("e2", [-1]), ("a2", [2]), ("s3", [0]), ("e3", [2]), ("a3", [3])]),
    ]
    x = np.arange(2 * 7 * 8 * 3, dtype=np.float32).reshape(2, 7, 8, 3)
    for outputs in (["a", "b", "c"], ["a", "b", "c", "d"]):
        used = [n for n in nodes if n.output[0] in outputs or n.output[0] == "rows"]
        graph = helper.make_graph(
            used,
            "slices",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 8, 3])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * 4) for o in outputs],
            initializer=inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        assert merge_slices(proto) == 2
        onnx.checker.check_model(proto)
        slices = [n for n in proto.graph.node if n.op_type == "Slice"]
        assert len(slices) == (3 if outputs[-1] == "c" else 4)  # a, b, c (+ rows, still read by Neg)
        assert [n.input[0] for n in slices if n.output[0] in ("a", "b")] == ["x", "x"]
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_transposes_into_gemm_same_products() -> None:
    """MatMul(Transpose(a), b) and MatMul(a, Transpose(b)) of 2-d floats become Gemms reading the
    untransposed input, with the same products; a Transpose something else reads, a 3-d product and an
    integer product are left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from planwire.exporter.training.graph_passes import transposes_into_gemm

    def vi(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, shape)

    nodes = [
        helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
        helper.make_node("MatMul", ["at", "b"], ["ab"]),  # (5, 7) x (7, 3)
        helper.make_node("Transpose", ["c"], ["ct"], perm=[1, 0]),
        helper.make_node("MatMul", ["b", "ct"], ["bc"]),  # (7, 3) x (3, 4)
        helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
        helper.make_node("MatMul", ["bt", "a"], ["ba"]),  # bt is also read below: stays a MatMul
        helper.make_node("Neg", ["bt"], ["nbt"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xt", "b"], ["xb"]),  # 3-d: stays
        helper.make_node("Transpose", ["i"], ["it"], perm=[1, 0]),
        helper.make_node("MatMul", ["it", "i"], ["ii"]),  # integers: stays
    ]
    inputs = [vi("a", [7, 5]), vi("b", [7, 3]), vi("c", [4, 3]), vi("x", [2, 7, 3]), vi("i", [3, 3], TensorProto.INT64)]
    outputs = [vi("ab", [5, 3]), vi("bc", [7, 4]), vi("ba", [3, 5]), vi("nbt", [3, 7]), vi("xb", [2, 3, 3])]
    outputs.append(vi("ii", [3, 3], TensorProto.INT64))
    inferred = [vi("at", [5, 7]), vi("ct", [3, 4]), vi("bt", [3, 7]), vi("xt", [2, 3, 7]), vi("it", [3, 3], 7)]
    graph = helper.make_graph(nodes, "products", inputs, outputs, value_info=inferred)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]) for v in inputs}
    feeds = {k: v.astype(np.int64 if k == "i" else np.float32) for k, v in feeds.items()}
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert transposes_into_gemm(proto) == 2
    onnx.checker.check_model(proto, full_check=True)
    gemms = {
        n.output[0]: (list(n.input), {a.name: a.i for a in n.attribute})
        for n in proto.graph.node
        if n.op_type == "Gemm"
    }
    assert gemms == {"ab": (["a", "b"], {"transA": 1, "transB": 0}), "bc": (["b", "c"], {"transA": 0, "transB": 1})}
    assert sorted(n.output[0] for n in proto.graph.node if n.op_type == "Transpose") == ["bt", "it", "xt"]
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_leading_sums_as_products_same_sums() -> None:
    """ReduceSum of float32 over leading axes becomes ones @ x with the same sums and shapes (keepdims
    either way, negative axes, a leading size that changes between runs, an empty one; sums over leading
    sizes named alike share their ones); a sum over other axes, over a trailing axis of unknown size and
    over integers is left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from planwire.exporter.training.graph_passes import leading_sums_as_products

    def axes(name: str, values: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    sums = [  # (input, axes, keepdims, output, its shape)
        ("x", [0], 1, "rows", [1, 6]),  # (R, 6) -> (1, 6)
        ("x", [0], 0, "rows_flat", [6]),
        ("y", [0, 1], 0, "both", [4]),  # (R, 3, 4) -> (4,)
        ("y", [-3], 1, "first", [1, 3, 4]),
        ("y", [1], 1, "middle", ["R", 1, 4]),  # not leading: stays
        ("z", [0], 1, "unknown", [1, "C"]),  # (R, ?): stays
        ("i", [0], 1, "ints", [1, 6]),  # integers: stays
    ]
    nodes = [
        helper.make_node("ReduceSum", [x, f"a{k}"], [o], keepdims=keep) for k, (x, _, keep, o, _) in enumerate(sums)
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["R", 6]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", 3, 4]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["R", "C"]),
        helper.make_tensor_value_info("i", TensorProto.INT64, ["R", 6]),
    ]
    outputs = [
        helper.make_tensor_value_info(o, TensorProto.INT64 if o == "ints" else TensorProto.FLOAT, shape)
        for *_, o, shape in sums
    ]
    inits = [axes(f"a{k}", a) for k, (_, a, *_) in enumerate(sums)]
    proto = helper.make_model(
        helper.make_graph(nodes, "sums", inputs, outputs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    before = proto.SerializeToString()
    assert leading_sums_as_products(proto) == 4
    onnx.checker.check_model(proto, full_check=True)
    assert sorted(n.output[0] for n in proto.graph.node if n.op_type == "ReduceSum") == ["ints", "middle", "unknown"]
    assert sum(n.op_type == "MatMul" for n in proto.graph.node) == 4
    assert sum(n.op_type == "ConstantOfShape" for n in proto.graph.node) == 2  # ones for (R,) and for (R, 3)
    want_session = ort.InferenceSession(before, providers=["CPUExecutionProvider"])
    got_session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for rows in (5, 64, 0):
        feeds = {
            "x": rng.standard_normal((rows, 6), dtype=np.float32),
            "y": rng.standard_normal((rows, 3, 4), dtype=np.float32),
            "z": rng.standard_normal((rows, 2), dtype=np.float32),
            "i": rng.integers(-9, 9, (rows, 6)),
        }
        for g, w in zip(got_session.run(None, feeds), want_session.run(None, feeds), strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_session.run(["both"], feeds)[0], feeds["y"].sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_leading_sums_as_products_share_no_ones_made_below_an_if() -> None:
    """Ones made from a value downstream of an If are that sum's alone: the worker's estimate of a plan's work
    (transport/shapes.py) sees no shape through an If, and would miss every product that shared them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from planwire.exporter.training.graph_passes import leading_sums_as_products

    row = ["R", 6]
    branch = [
        helper.make_graph([helper.make_node(op, ["x"], [f"{op}_out"])], op, [], [
            helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, row)
        ])
        for op in ("Identity", "Neg")
    ]  # fmt: skip
    nodes = [
        helper.make_node("If", ["c"], ["w"], then_branch=branch[0], else_branch=branch[1]),
        helper.make_node("ReduceSum", ["w", "a0"], ["sw"]),  # below the If: ones of its own
        helper.make_node("ReduceSum", ["x", "a0"], ["sx"]),  # these two share theirs
        helper.make_node("ReduceSum", ["x", "a0"], ["sx_flat"], keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, row),
    ]
    outputs = [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, shape)
        for o, shape in (("sw", [1, 6]), ("sx", [1, 6]), ("sx_flat", [6]))
    ]
    graph = helper.make_graph(nodes, "sums", inputs, outputs, [helper.make_tensor("a0", TensorProto.INT64, [1], [0])])
    graph.value_info.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, row))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    before = proto.SerializeToString()
    assert leading_sums_as_products(proto) == 3
    onnx.checker.check_model(proto, full_check=True)
    shapes_of = sorted(n.input[0] for n in proto.graph.node if n.op_type == "Shape")
    assert shapes_of == ["w", "x"], shapes_of
    x = np.random.default_rng(1).standard_normal((7, 6), dtype=np.float32)
    for c in (True, False):
        feeds = {"c": np.array(c), "x": x}
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        want = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, feeds)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
