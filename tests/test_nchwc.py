"""worker/nchwc.py: a plan's Convs rewritten as onnxruntime's NCHWc kernels compute what the Convs did, the
rewrite takes only the Convs it may, and a graph whose shapes lie fails cleanly."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx import helper as oh

from planwire.transport.ortoptions import session_options
from planwire.worker.nchwc import DOMAIN, block, rewrite
from tests.conftest import RawWorker


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


def _left_alone(b: int, repeats: str) -> bytes:
    """A grouped Conv, one with auto_pad, and one whose weight is tiled by ``repeats``: "reps", the input's batch
    size and ones (its filters follow the batch: whole blocks at batch 1 and 2, but not one shape), or "ones"."""
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2 * b, 4, 4])
    consts = [
        oh.make_tensor("ones3", TensorProto.INT64, [3], [1] * 3),
        oh.make_tensor("ones", TensorProto.INT64, [4], [1] * 4),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["y"], group=2),
        oh.make_node("Conv", ["x", "v"], ["z"], auto_pad="SAME_UPPER"),
        oh.make_node("Shape", ["x"], ["s"], end=1),
        oh.make_node("Concat", ["s", "ones3"], ["reps"], axis=0),
        oh.make_node("Tile", ["u", repeats], ["ut"]),
        oh.make_node("Conv", ["x", "ut"], ["t"]),
    ]
    weights = (("w", [2 * b, b, 3, 3]), ("v", [b, 2 * b, 3, 3]), ("u", [2 * b, 2 * b, 1, 1]))
    inputs = [x] + [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in weights]
    outputs = [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yzt"]
    return oh.make_model(oh.make_graph(nodes, "g", inputs, outputs, initializer=consts)).SerializeToString()


def test_a_model_without_candidates_comes_back_as_it_was() -> None:
    b = block()
    data = _left_alone(b, "reps")
    assert rewrite(data, b) == (data, 0)
    assert rewrite(_left_alone(b, "ones"), b)[1] == 1  # the tiled weight of one shape is taken
    assert rewrite(data, 1) == (data, 0)


def _cnn(c: int) -> torch.nn.Module:
    """Convs of a stem (3 input channels), stride 1 and stride 2 with ``c`` (a whole number of blocks) channels."""
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(c * 16, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def cnn_plan() -> tuple:
    import planwire as sy

    model = _cnn(2 * block())
    plan = sy.training_plan(
        copy.deepcopy(model),
        F.cross_entropy,
        sy.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
        args_shape=[(-1, 3, 8, 8), (-1,)],
        args_dtypes=[torch.float32, torch.int64],
    )
    return plan, model


@pytest.mark.parametrize("extra", [(), ("--no-nchwc",)], ids=["nchwc", "no-nchwc"])
def test_a_training_plan_on_a_worker_matches_eager_torch_with_and_without_nchwc(
    raw_worker: RawWorker, cnn_plan: tuple, extra: tuple
) -> None:
    """Steps of a CNN's training plan on a real plan-worker, at batch sizes other than the traced one, give eager
    torch's losses and weights (tests/test_training_workloads.py's tolerance) with its Convs as NCHWc kernels
    (the registration's log line says how many and the block) and without (--no-nchwc: no such line)."""
    from planwire.transport import connect
    from tests.test_trainer import eager_steps

    plan, model = cnn_plan
    rewritten = rewrite(plan.step.variant.data, block())[1]
    assert rewritten >= 3  # the forward Convs and the stride-1 input gradient at least
    proc, _ = raw_worker("nchwc", kind="tcp", extra=extra)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (3, 7, 2, 5)]
    with connect(proc.url, timeout=60) as client:
        ptr = plan.send(client)
        losses = [ptr(x, y).get().item() for x, y in data]
        trained = ptr.state_dict()
    ref = copy.deepcopy(model).train()
    assert losses == pytest.approx(eager_steps(ref, data), rel=1e-4)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)
    logged = re.findall(r"runs (\d+) Convs as NCHWc kernels \(block (\d+)\)", proc.log())
    assert logged == ([] if extra else [(str(rewritten), str(block()))])


def _lying_plan(c: int) -> bytes:
    """A Conv whose weight and bias are Tiles of inputs by repeats the caller gives: declared (value_info) of
    the shapes the rewrite takes, which the repeats may make another."""
    nodes = [
        oh.make_node("Tile", ["w_half", "rw"], ["w"]),
        oh.make_node("Tile", ["b_half", "rb"], ["b"]),
        oh.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4),
    ]
    inputs = [
        oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4]),
        oh.make_tensor_value_info("w_half", TensorProto.FLOAT, [c // 2, c, 3, 3]),
        oh.make_tensor_value_info("rw", TensorProto.INT64, [4]),
        oh.make_tensor_value_info("b_half", TensorProto.FLOAT, [c // 2]),
        oh.make_tensor_value_info("rb", TensorProto.INT64, [1]),
    ]
    declared = [
        oh.make_tensor_value_info("w", TensorProto.FLOAT, [c, c, 3, 3]),
        oh.make_tensor_value_info("b", TensorProto.FLOAT, [c]),
    ]
    graph = oh.make_graph(nodes, "lies", inputs, [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph.value_info.extend(declared)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()


def test_a_weight_or_bias_not_of_the_inferred_shape_fails_cleanly_and_the_worker_goes_on(raw_worker: RawWorker) -> None:
    """The rewrite trusts the declared shapes of a computed weight and bias; the Reshapes it adds pin them,
    so a run whose weight or bias has another shape (where MLAS would read past them) fails with onnxruntime's
    error, and the worker then answers ping and keeps its tensors."""
    b = block()
    c = 2 * b
    data = _lying_plan(c)
    assert rewrite(data, b)[1] == 1
    proc, peer = raw_worker("lies", kind="tcp")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, 4, 4), dtype=np.float32)
    w_half = rng.standard_normal((c // 2, c, 3, 3), dtype=np.float32)
    b_half = rng.standard_normal(c // 2, dtype=np.float32)
    peer.put("kept", x)
    pid = peer.register(data, name="lies")["plan"]
    assert "runs 1 Convs as NCHWc kernels" in proc.log()
    whole = {"w_half": w_half, "rw": np.array([2, 1, 1, 1]), "b_half": b_half, "rb": np.array([2])}
    want = _session(data).run(None, {"x": x, **whole})[0]
    got = peer.run(pid, [x, *whole.values()], ["y"], fetch=[0]).array_list()[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    for rw, rb in (([1, 1, 1, 1], [2]), ([2, 1, 1, 1], [1])):  # a weight of c/2 filters; a bias of c/2 values
        header, frames = peer.run_header(pid, [x, w_half, np.array(rw), b_half, np.array(rb)], ["y"], fetch=[0])
        failed = peer.error(header, frames, code="run_failed")
        assert "Reshape" in failed["message"], failed["message"]
        assert proc.proc.poll() is None
        assert peer.ok({"type": "ping"}).kind == "ok"
        np.testing.assert_array_equal(peer.get1("kept", keep=True), x)


def test_an_input_with_fewer_channels_than_the_weight_fails_as_the_plans_conv_does(raw_worker: RawWorker) -> None:
    """ReorderInput zero-pads channels up to the block: an input of fewer channels than the weight reads (a
    dynamic channel axis) would pass the NCHWc kernel's own check and give a result the plan's Conv refuses.
    The rewrite pins the input's channels, so the run fails (in that Reshape) as without the rewrite."""
    b = block()
    c = 2 * b
    x_info = oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, "c", 8, 8])
    w_info = oh.make_tensor_value_info("w", TensorProto.FLOAT, [c, c, 3, 3])
    y_info = oh.make_tensor_value_info("y", TensorProto.FLOAT, None)
    conv = oh.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)
    graph = oh.make_graph([conv], "fewer", [x_info, w_info], [y_info])
    data = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()
    assert rewrite(data, b)[1] == 1
    rng = np.random.default_rng(0)
    w = rng.standard_normal((c, c, 3, 3), dtype=np.float32)
    x = rng.standard_normal((1, c, 8, 8), dtype=np.float32)
    fewer = rng.standard_normal((1, c - 4, 8, 8), dtype=np.float32)  # ReorderInput would pad c-4 back up to c
    proc, peer = raw_worker("fewer", kind="tcp")
    peer.put("kept", x)
    pid = peer.register(data, name="fewer")["plan"]
    assert "runs 1 Convs as NCHWc kernels" in proc.log()
    got = peer.run(pid, [x, w], ["y"], fetch=[0]).array_list()[0]
    want = _session(data).run(None, {"x": x, "w": w})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    with pytest.raises(Exception, match="channels"):  # what the plan's own Conv says of that input
        _session(data).run(None, {"x": fewer, "w": w})
    header, frames = peer.run_header(pid, [fewer, w], ["y"], fetch=[0])
    failed = peer.error(header, frames, code="run_failed")
    assert "Reshape" in failed["message"], failed["message"]
    assert proc.proc.poll() is None
    assert peer.ok({"type": "ping"}).kind == "ok"
    np.testing.assert_array_equal(peer.get1("kept", keep=True), x)
