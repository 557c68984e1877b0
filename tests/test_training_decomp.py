"""Backward decompositions and functional optimizers against torch itself (eager, no export: fast).

The decompositions are compared in float64 with the aten backward kernels they replace, over the
stride/padding/dilation/groups combinations the layers allow; the optimizers with torch.optim's
single-tensor implementation over several steps.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from planwire.exporter.optim import SGD, Adam
from planwire.exporter.training import batch_norm as B
from planwire.exporter.training import conv_backward as C
from planwire.exporter.training import decompositions as D
from planwire.exporter.training import pool_backward as P
from planwire.exporter.training import training_decompositions

aten = torch.ops.aten


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


CONV_CASES = [
    # (spatial dims, c_in, c_out, groups, kernel, stride, padding, dilation)
    *itertools.product([1, 2], [(2, 4, 1), (4, 6, 2), (3, 3, 3)], [1, 3], [1, 2, 3], [0, 2], [1, 2]),
    *[(3, (2, 4, 1), 3, 2, 1, 1), (3, (4, 4, 2), 2, 1, 0, 2)],
]


@pytest.mark.parametrize(("nd", "channels", "k", "stride", "pad", "dil"), CONV_CASES)
def test_convolution_backward_matches_aten(
    nd: int, channels: tuple[int, int, int], k: int, stride: int, pad: int, dil: int
) -> None:
    c_in, c_out, groups = channels
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, c_in, *[9] * nd, dtype=torch.float64, generator=gen)
    w = torch.randn(c_out, c_in // groups, *[k] * nd, dtype=torch.float64, generator=gen)
    args = ([stride] * nd, [pad] * nd, [dil] * nd, False, [0] * nd, groups)
    out = aten.convolution(x, w, None, *args)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    ref = aten.convolution_backward(grad, x, w, [c_out], *args, [True, True, True])
    ours = C.convolution_backward(grad, x, w, [c_out], *args, [True, True, True])
    for a, b in zip(ours, ref, strict=True):
        _close(a, b)
    assert ours[0].is_contiguous() and ours[1].is_contiguous()


@pytest.mark.parametrize(
    ("nd", "stride", "pad", "dil", "out_pad", "groups"),
    [(1, 2, 1, 1, 1, 1), (2, 2, 0, 2, 1, 2), (2, 3, 1, 1, 2, 1), (2, 1, 1, 2, 1, 2)],
)
def test_transposed_convolution_backward_matches_aten(
    nd: int, stride: int, pad: int, dil: int, out_pad: int, groups: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *[6] * nd, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 6 // groups, *[3] * nd, dtype=torch.float64, generator=gen)
    args = ([stride] * nd, [pad] * nd, [dil] * nd, True, [out_pad] * nd, groups)
    out = aten.convolution(x, w, None, *args)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    ref = aten.convolution_backward(grad, x, w, [6], *args, [True, True, True])
    ours = C.convolution_backward(grad, x, w, [6], *args, [True, True, True])
    for a, b in zip(ours, ref, strict=True):
        _close(a, b)


@pytest.mark.parametrize(
    ("k", "stride", "pad", "dil", "ceil"),
    [c for c in itertools.product([2, 3], [1, 2, 3], [0, 1], [1, 2], [False, True]) if c[2] <= c[0] // 2],
)
def test_max_pool2d_backward_matches_aten(k: int, stride: int, pad: int, dil: int, ceil: bool) -> None:
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[0, 0, :4, :4] = 1.0  # ties: overlapping windows pick the same element and must accumulate
    args = ([k, k], [stride, stride], [pad, pad], [dil, dil], ceil)
    out, idx = aten.max_pool2d_with_indices(x, *args)
    grad = torch.randn_like(out)
    ref = aten.max_pool2d_with_indices_backward(grad, x, *args, idx)
    _close(P.max_pool2d_backward_scatter(grad, x, idx), ref)  # the general path, for every configuration
    ours = P.max_pool2d_with_indices_backward(grad, x, *args, idx)
    if P.tiled_max_pool2d(x, grad, *args[:4]):  # left to the ONNX translation (tests/test_training_pool.py)
        assert ours is NotImplemented
    else:
        _close(ours, ref)


@pytest.mark.parametrize(
    ("kernel", "stride", "pad", "dil", "size", "tiled"),
    [
        ([2, 2], [2, 2], [0, 0], [1, 1], (8, 8), True),
        ([2], [], [0], [1], (9, 7), True),  # one-element lists, default stride, floor crops a row and a column
        ([2, 3], [2, 3], [0, 0], [1, 1], (6, 9), True),
        ([3, 3], [2, 2], [0, 0], [1, 1], (8, 8), False),  # overlapping
        ([2, 2], [2, 2], [1, 1], [1, 1], (8, 8), False),  # padded
        ([2, 2], [2, 2], [0, 0], [2, 2], (8, 8), False),  # dilated
    ],
)
def test_tiled_max_pool2d_detection(
    kernel: list[int], stride: list[int], pad: list[int], dil: list[int], size: tuple[int, int], tiled: bool
) -> None:
    x = torch.randn(2, 3, *size)
    out, _ = aten.max_pool2d_with_indices(x, kernel, stride, pad, dil, False)
    assert P.tiled_max_pool2d(x, out, kernel, stride, pad, dil) is tiled
    if tiled:  # ceil mode with a partial window is not tiled
        partial, _ = aten.max_pool2d_with_indices(x, kernel, stride, pad, dil, True)
        assert P.tiled_max_pool2d(x, partial, kernel, stride, pad, dil) is (partial.shape == out.shape)


@pytest.mark.parametrize(
    ("kernel", "stride", "pad", "ceil", "include_pad", "divisor"),
    [c for c in itertools.product([(2, 3), (3, 3)], [1, 2, 3], [0, 1], [False, True], [False, True], [None, 5])],
)
def test_avg_pool2d_backward_matches_aten(
    kernel: tuple[int, int], stride: int, pad: int, ceil: bool, include_pad: bool, divisor: int | None
) -> None:
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    args = (list(kernel), [stride, stride], [pad, pad], ceil, include_pad, divisor)
    out = aten.avg_pool2d(x, *args)
    grad = torch.randn_like(out)
    _close(P.avg_pool2d_backward(grad, x, *args), aten.avg_pool2d_backward(grad, x, *args))


@pytest.mark.parametrize("out_size", [(1, 1), (3, 4), (5, 7), (11, 10)])
def test_adaptive_avg_pool2d_backward_matches_aten(out_size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grad = torch.randn_like(aten._adaptive_avg_pool2d(x, list(out_size)))
    _close(P.adaptive_avg_pool2d_backward(grad, x), aten._adaptive_avg_pool2d_backward(grad, x))


@pytest.mark.parametrize("reduction", [0, 1, 2])  # none, mean, sum
@pytest.mark.parametrize("ignore_index", [-100, 0, 3, 7])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_backward_matches_aten(reduction: int, ignore_index: int, weighted: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(9, 5, dtype=torch.float64, generator=gen).log_softmax(1)
    target = torch.tensor([0, 3, 4, 3, ignore_index, 1, 0, ignore_index, 2])
    target = torch.where((target >= 0) & (target < 5), target, ignore_index)
    weight = torch.rand(5, dtype=torch.float64, generator=gen) if weighted else None
    out, total = aten.nll_loss_forward(scores, target, weight, reduction, ignore_index)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    ref = aten.nll_loss_backward(grad, scores, target, weight, reduction, ignore_index, total)
    ours = D.nll_loss_backward(grad, scores, target, weight, reduction, ignore_index, total)
    assert torch.equal(ours, ref)


def test_nll_loss_backward_unbatched_and_all_ignored() -> None:
    scores = torch.randn(4, dtype=torch.float64).log_softmax(0)
    target = torch.tensor(2)
    out, total = aten.nll_loss_forward(scores, target, None, 1, -100)
    grad = torch.ones((), dtype=torch.float64)
    assert torch.equal(
        D.nll_loss_backward(grad, scores, target, None, 1, -100, total),
        aten.nll_loss_backward(grad, scores, target, None, 1, -100, total),
    )
    scores = torch.randn(3, 4, dtype=torch.float64).log_softmax(1)
    target = torch.full((3,), -100)
    out, total = aten.nll_loss_forward(scores, target, None, 1, -100)  # 0 / 0: the loss is NaN
    ours = D.nll_loss_backward(grad, scores, target, None, 1, -100, total)
    assert torch.equal(ours, aten.nll_loss_backward(grad, scores, target, None, 1, -100, total))


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_training_matches_aten(affine: bool) -> None:
    """Output, saved statistics and the running statistics' update, as aten's training-mode kernel."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64, generator=gen) * 3 + 2
    weight = torch.randn(3, dtype=torch.float64, generator=gen) if affine else None
    bias = torch.randn(3, dtype=torch.float64, generator=gen) if affine else None
    stats = [torch.randn(3, dtype=torch.float64, generator=gen), torch.rand(3, dtype=torch.float64, generator=gen)]
    ours_stats, ref_stats = [t.clone() for t in stats], [t.clone() for t in stats]
    ours = B.batch_norm_training(x, weight, bias, *ours_stats, True, 0.1, 1e-5)
    ref = aten._native_batch_norm_legit(x, weight, bias, *ref_stats, True, 0.1, 1e-5)
    for o, r in zip([*ours, *ours_stats], [*ref, *ref_stats], strict=True):
        _close(o, r)


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_matches_aten(mask: tuple[bool, bool, bool], affine: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64, generator=gen) * 3 + 2
    weight = torch.randn(3, dtype=torch.float64, generator=gen) if affine else None
    grad = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    mean = x.mean([0, 2, 3])
    invstd = torch.rsqrt(x.var([0, 2, 3], correction=0) + 1e-5)
    args = (grad, x, weight, None, None, mean, invstd, True, 1e-5, list(mask))
    ours = B.batch_norm_backward(*args)
    ref = aten.native_batch_norm_backward(*args)
    for o, r, wanted in zip(ours, ref, mask, strict=True):
        if wanted:
            _close(o, r)
        else:
            assert o is None


def test_batch_norm_outside_training_4d_takes_torchs_decomposition() -> None:
    x = torch.randn(6, 3, dtype=torch.float64)
    stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    ref = aten._native_batch_norm_legit(x, None, None, *[t.clone() for t in stats], True, 0.1, 1e-5)
    ours = B.batch_norm_training(x, None, None, *stats, True, 0.1, 1e-5)
    for o, r in zip(ours, ref, strict=True):
        _close(o, r)


def test_empty_permuted_keeps_shape_and_strides() -> None:
    ref = aten.empty_permuted([2, 3, 4], [2, 0, 1])
    ours = D.empty_permuted([2, 3, 4], [2, 0, 1])
    assert ours.shape == ref.shape and ours.stride() == ref.stride()


def test_table_extends_core_aten_with_the_backward_ops() -> None:
    table = training_decompositions()
    for op in D.BACKWARD_DECOMPOSITIONS:
        assert table[op] is D.BACKWARD_DECOMPOSITIONS[op]
    for op in D.LEANER_DECOMPOSITIONS:  # torch's own decomposition replaced
        assert table[op] is D.LEANER_DECOMPOSITIONS[op]
    assert aten.native_dropout.default in table and aten._native_batch_norm_legit.default in table
    assert aten._native_batch_norm_legit_no_training.default not in table  # ONNX's BatchNormalization
    table.clear()  # a copy: the module's table is untouched
    assert aten.convolution_backward.default in training_decompositions()


# --------------------------------------------------------------------------------------------------
# Functional optimizers vs torch.optim


OPTIMIZERS = [
    (SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1, foreach=False)),
    (
        SGD(0.05, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False),
    ),
    (
        SGD(0.05, momentum=0.8, weight_decay=0.1, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, weight_decay=0.1, nesterov=True, foreach=False),
    ),
    (Adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01, foreach=False)),
    (
        Adam(0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False),
    ),
    (
        Adam(0.02, weight_decay=0.1, decoupled_weight_decay=True),
        lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1, foreach=False),
    ),
]


@pytest.mark.parametrize(("ours", "make_torch"), OPTIMIZERS, ids=lambda o: None if callable(o) else repr(o))
def test_functional_optimizer_matches_torch_optim(ours, make_torch) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(5)
    start = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    leaves = {k: v.clone().requires_grad_() for k, v in start.items()}
    reference = make_torch(list(leaves.values()))
    params, state, hyper = dict(start), ours.init_state(start), ours.hyper_tensors()
    for _ in range(6):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in start.items()}
        for k, leaf in leaves.items():
            leaf.grad = grads[k].clone()
        reference.step()
        params, state = ours.update(params, grads, state, hyper)
        for k, leaf in leaves.items():
            torch.testing.assert_close(params[k], leaf.detach(), rtol=1e-6, atol=1e-7)
            for slot in ours.slots:
                ref_state = reference.state[leaf][slot]
                torch.testing.assert_close(state[f"{k}.{slot}"], ref_state, rtol=1e-6, atol=1e-7)


def test_optimizer_hyper_parameters_and_state_layout() -> None:
    assert list(SGD(0.1).hyper()) == ["lr", "weight_decay"] and SGD(0.1).slots == ()
    assert list(SGD(0.1, momentum=0.9).hyper()) == ["lr", "momentum", "weight_decay"]
    assert list(Adam().hyper()) == ["lr", "beta1", "beta2", "eps", "weight_decay"]
    state = Adam().init_state({"w": torch.ones(2, 2)})
    assert set(state) == {"w.exp_avg", "w.exp_avg_sq", "step"} and state["step"].dtype == torch.float32
    hyper = Adam().hyper_tensors(lr=0.5)
    assert hyper["lr"].dtype == torch.float64 and hyper["lr"].item() == 0.5
    with pytest.raises(KeyError, match="momentum"):
        Adam().hyper_tensors(momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(0.1, nesterov=True)
