"""The bench's real workloads as training plans, and the graph changes made for their speed.

The ResNet-style CNN (convolutions with stride and padding, BatchNorm, residual additions) and the causal
transformer LM of bench/workloads.py run several onnxruntime steps against eager torch + torch.optim at
batch sizes other than the traced one (tests/test_training_step.check_parity: loss, every parameter,
every buffer, rtol 1e-4), with SGD + momentum, which carries a gradient's rounding into the parameters
linearly. Adam does not: its first step divides each gradient by its own magnitude, so a gradient near
zero that float32 sums by cancellation (BatchNorm and LayerNorm weight gradients) in a different order
than torch's kernels moves its parameter by a visibly different amount; with these models' 37k and 12k
weights one element in ~10^4 exceeded rtol 1e-4 that way, in the LM too, whose graph the changes here do
not touch. Adam itself is checked against torch.optim in tests/test_training_decomp.py and on small
models in tests/test_training_step.py. The graph checks pin what the decompositions changed: ReLU's backward is a
mask multiply (no Where over activations), a 2-d convolution's weight gradient is per-tap MatMuls, and
a stride-1 input gradient is a Conv with the flipped kernel rather than a ConvTranspose.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import workloads
from planwire.exporter.training import decompositions as D
from tests.test_training_step import check_parity

aten = torch.ops.aten


def small_resnet() -> nn.Module:
    """The bench's ResNet on 8x8 inputs (the same layers; the stages' strides bring it to 2x2)."""
    return workloads.resnet(seed=int(torch.randint(0, 1000, ())))


def _ops(step: object) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in step.model.graph.node)  # type: ignore[attr-defined]


@pytest.mark.timeout(1800)  # a ResNet build takes minutes on a loaded 2-core host
def test_resnet_steps_match_eager() -> None:
    def batch(n: int, gen: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)]

    step = check_parity(small_resnet, F.cross_entropy, "sgd", [(-1, 3, 8, 8), (-1,)], batch)
    ops = _ops(step)
    # the forward's 9 (stem, 2 per block, 2 shortcuts) and 4 stride-1 input gradients (flipped kernel);
    # no weight-gradient Conv; ConvTranspose only for the 4 stride-2 input gradients (none for the stem)
    assert (ops["Conv"], ops["ConvTranspose"]) == (13, 4)
    assert ops["Where"] <= 3  # the loss's; none over activations


@pytest.mark.timeout(1800)
def test_transformer_lm_steps_match_eager() -> None:
    def batch(n: int, gen: torch.Generator) -> list[torch.Tensor]:
        seq = torch.randint(0, workloads.LM_VOCAB, (n, 9), generator=gen)
        return [seq[:, :-1].contiguous(), seq[:, 1:].contiguous()]

    def lm_small() -> nn.Module:
        return workloads.lm(seed=int(torch.randint(0, 1000, ())))

    check_parity(lm_small, workloads.lm_loss, "sgd", [(-1, 8), (-1, 8)], batch, args_dtypes=[torch.int64] * 2)


@pytest.mark.parametrize(
    ("kernel", "stride", "pad", "dil", "size"),
    [
        ((3, 3), (1, 1), (1, 1), (1, 1), (8, 8)),
        ((3, 3), (2, 2), (1, 1), (1, 1), (9, 8)),
        ((1, 1), (2, 2), (0, 0), (1, 1), (8, 8)),
        ((3, 2), (2, 1), (0, 2), (2, 1), (9, 7)),
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
    ours = D._conv_weight_grad_taps(grad, x, w.shape, stride, pad, dil)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_threshold_backward_matches_aten_and_passes_nan_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen)
    x[0, 0, :3] = torch.tensor([0.0, float("nan"), -0.0])
    grad = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    for threshold in (0.0, 0.5):
        ref = aten.threshold_backward(grad, x, threshold)
        ours = D.threshold_backward(grad, x, threshold)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert ours[0, 0, 1] == grad[0, 0, 1]  # NaN input: torch passes the gradient, so do we
