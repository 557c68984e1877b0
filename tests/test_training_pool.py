"""Max-pool backward for windows that tile the input: the ONNX translation (MaxPool indices + MaxUnpool)
against torch's kernel, exactly, with many ties (torch gives a tied window's gradient to its first
maximum in row-major order), other batch sizes than the exported one, unbatched inputs, floor-mode crops."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from planwire.exporter.optim import SGD
from planwire.exporter.torch_compat import cached_registry
from planwire.exporter.training import build_training_step
from planwire.exporter.training.decompositions import ONNX_TRANSLATIONS

aten = torch.ops.aten


class PoolBackward(nn.Module):
    def __init__(self, kernel: list[int]) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _, idx = aten.max_pool2d_with_indices(x, self.kernel, self.kernel, [0, 0], [1, 1], False)
        return aten.max_pool2d_with_indices_backward(grad, x, self.kernel, self.kernel, [0, 0], [1, 1], False, idx)


def tied(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ReLU'd integers: most windows hold several equal maxima (zeros, small integers), some all -inf."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul(1.5).round().relu()
    x[..., :2, :2] = float("-inf")
    return x


@pytest.mark.parametrize(
    ("kernel", "size", "unbatched"),
    [
        ([2, 2], (8, 8), False),
        ([2, 2], (9, 7), False),  # floor mode: the last row and column get no gradient
        ([3, 3], (9, 9), False),
        ([2, 3], (6, 9), False),
        ([2, 2], (6, 6), True),
    ],
)
def test_onnx_translation_matches_torch_exactly(kernel: list[int], size: tuple[int, int], unbatched: bool) -> None:
    lead = (3,) if unbatched else (4, 3)
    x = tied((*lead, *size), 0)
    out, _ = aten.max_pool2d_with_indices(x, kernel, kernel, [0, 0], [1, 1], False)
    grad = torch.randn(out.shape)
    dynamic = None if unbatched else ({0: torch.export.Dim.DYNAMIC}, {0: torch.export.Dim.DYNAMIC})
    with cached_registry():
        program = torch.onnx.export(
            PoolBackward(kernel).eval(),
            (grad, x),
            dynamo=True,
            verbose=False,
            dynamic_shapes=dynamic,
            custom_translation_table=dict(ONNX_TRANSLATIONS),
        )
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert "MaxUnpool" in ops and "ScatterElements" not in ops
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seed in ((lead[0], 0), (1, 1), (7, 2)) if not unbatched else ((lead[0], 0),):
        x = tied((batch, *lead[1:], *size), seed)
        out, idx = aten.max_pool2d_with_indices(x, kernel, kernel, [0, 0], [1, 1], False)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        want = aten.max_pool2d_with_indices_backward(grad, x, kernel, kernel, [0, 0], [1, 1], False, idx)
        (got,) = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (grad, x), strict=True)})
        np.testing.assert_array_equal(got, want.numpy())


def test_training_step_with_tied_pooling_windows_matches_torch() -> None:
    """A whole CNN step on inputs whose pooled activations are mostly tied, at several batch sizes."""

    def make() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
        )

    step = build_training_step(make(), F.cross_entropy, SGD(lr=0.5), [(-1, 1, 8, 8), (-1,)])
    ops = {n.op_type for n in step.model.graph.node}
    assert "MaxUnpool" in ops
    # one MaxPool: its output is the forward's, its indices feed MaxUnpool (tidy_max_pools merged the two)
    (pool,) = [n for n in step.model.graph.node if n.op_type == "MaxPool"]
    readers = {i: n.op_type for n in step.model.graph.node for i in n.input}
    assert len(pool.output) == 2 and readers[pool.output[1]] == "MaxUnpool" and pool.output[0] in readers
    # ReLU's backward mask moved before the unpool: it compares the pooled maxima, not the ReLU output
    pooled = {n.output[0] for n in step.model.graph.node if n.op_type == "MaxPool"}
    assert [n.input[0] in pooled for n in step.model.graph.node if n.op_type == "LessOrEqual"] == [True]
    sess = ort.InferenceSession(step.data, providers=["CPUExecutionProvider"])
    for batch in (1, 6, 33):
        model = make()
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 1, 8, 8, generator=gen).round()  # integer images: tied conv outputs, dead ReLUs
        x[:, :, :4] = 0.0
        y = torch.randint(0, 5, (batch,), generator=gen)
        state = step.initial_state(model)
        outputs = dict(zip(step.output_names, sess.run(None, step.feeds([x, y], state)), strict=True))
        reference = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        reference.step()
        for name, p in model.named_parameters():
            # a gradient routed to another tied position would differ by whole values, not by rounding
            np.testing.assert_allclose(
                outputs[f"new.param.{name}"], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name}, batch {batch}"
            )
            assert grads[name].abs().sum() > 0


def test_relu_mask_moves_before_the_unpool_only_where_exact() -> None:
    """The rewrite applies to ReLU -> tiled MaxPool; an overlapping pool (scatter path) keeps its mask."""
    from planwire.exporter.training import rewrites

    counts = []
    original = rewrites.mask_before_unpool

    def spy(gm: torch.fx.GraphModule) -> int:
        counts.append(original(gm))
        return counts[-1]

    import planwire.exporter.training.trace as trace

    for pool in (nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2)):
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.LazyLinear(3))
        model(torch.zeros(1, 1, 8, 8))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trace, "mask_before_unpool", spy)
            build_training_step(model, F.cross_entropy, SGD(lr=0.5), [(-1, 1, 8, 8), (-1,)])
    assert counts == [1, 0]


def test_tidy_max_pools_drops_unread_indices_and_merges_pools() -> None:
    import onnx
    from onnx import TensorProto, helper

    from planwire.exporter.onnx_passes import tidy_max_pools

    attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("MaxPool", ["x"], ["y", "unread"], **attrs),  # forward, its indices unread
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("MaxPool", ["x"], ["y2", "idx"], **attrs),  # the backward's pool, same input
        helper.make_node("MaxUnpool", ["r", "idx"], ["g"], **attrs),
        helper.make_node("MaxPool", ["x"], ["other"], kernel_shape=[2, 2]),  # stride 1: not the same pool
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 4, 4])  # noqa: E731
    other = helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, 2, 3, 3])
    graph = helper.make_graph(nodes, "g", [value("x")], [value("g"), other])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert tidy_max_pools(model) == 2
    onnx.checker.check_model(model, full_check=True)  # still topologically sorted
    ops = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert ops == [
        ("MaxPool", ["x"], ["y2", "idx"]),
        ("Relu", ["y2"], ["r"]),
        ("MaxUnpool", ["r", "idx"], ["g"]),
        ("MaxPool", ["x"], ["other"]),
    ]
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert got[0].shape == x.shape and got[1].shape == (1, 2, 3, 3)
