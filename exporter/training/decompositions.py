"""Aten decompositions that make training graphs exportable to plain ONNX.

Tracing a backward pass with ``make_fx`` emits backward ops (``convolution_backward``,
``max_pool2d_with_indices_backward``, ``avg_pool2d_backward``, ``_adaptive_avg_pool2d_backward``) that
neither torch nor onnxscript's torchlib decompose, so the ONNX export of any CNN's gradient fails. The
modules beside this one rewrite them into forward ops that have ONNX translations: :mod:`.conv_backward`
(Conv, ConvTranspose, per-tap MatMuls), :mod:`.pool_backward` (MaxUnpool, ScatterElements, MatMul) and
:mod:`.batch_norm` (batch norm in training mode, leaner than torch's). Every one is checked against torch
autograd in tests/test_training_decomp.py.

This module holds the tables: :func:`training_decompositions` is the one the training pipeline traces
with: torch's core aten set, a few torch decompositions outside it (batch norm and dropout, so their
running statistics and random masks become explicit ops rather than ONNX training-mode kernels), the
functions of those modules and the two below (cross-entropy's backward, a factory op).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._decomp import core_aten_decompositions, decomposition_table

from planwire.exporter.training.batch_norm import batch_norm_backward, batch_norm_training
from planwire.exporter.training.conv_backward import convolution_backward
from planwire.exporter.training.pool_backward import (
    adaptive_avg_pool2d_backward,
    avg_pool2d_backward,
    max_pool2d_backward_onnx,
    max_pool2d_with_indices_backward,
)

aten = torch.ops.aten


def nll_loss_backward(
    grad_output: Tensor,
    inp: Tensor,
    target: Tensor,
    weight: Tensor | None,
    reduction: int,
    ignore_index: int,
    total_weight: Tensor,
) -> Tensor:
    """``nll_loss_backward`` (and so cross-entropy's) for (N, C) scores without class weights, as a
    one-hot select: ``-grad`` where ``target == arange(C)``, 0 elsewhere and on ignored rows.

    torch's decomposition scatters -1.0 into zeros and multiplies by the masked gradient; this gives the
    same values (``-1.0 * g == -g``, ``0 * g == 0``; only the sign of some zeros can differ, and a NaN
    upstream gradient stays in the target column) in half the ONNX nodes: no Shape, Expand,
    ConstantOfShape or ScatterElements. A target equal to an ``ignore_index`` outside [0, C) (-100 by
    default) matches no class, so only an index inside needs a mask. Other shapes and class weights
    take torch's decomposition.
    """
    if weight is not None or inp.dim() != 2 or target.dim() != 1 or not isinstance(inp.shape[1], int):
        return decomposition_table[aten.nll_loss_backward.default](
            grad_output, inp, target, weight, reduction, ignore_index, total_weight
        )
    if reduction == 1:  # mean
        grad_output = grad_output / total_weight
    target = target.unsqueeze(1)
    if grad_output.dim() > 0:  # reduction="none": one gradient per row
        grad_output = grad_output.unsqueeze(1)
    if 0 <= ignore_index < inp.shape[1]:  # else an ignored row matches no class: nothing to mask
        grad_output = torch.where(target != ignore_index, grad_output, 0)
    classes = torch.arange(inp.shape[1], device=target.device, dtype=target.dtype)
    return torch.where(target == classes, -grad_output, 0)


def empty_permuted(
    size: Sequence[int],
    physical_layout: Sequence[int],
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
) -> Tensor:
    """``empty_permuted`` (what ``ones_like``/``empty_like`` trace to) as ``empty`` + ``permute``.

    torchlib has no translation for it; the permute keeps the strides that later decompositions see.
    """
    physical = [size[axis] for axis in physical_layout]
    inverse = sorted(range(len(physical_layout)), key=lambda i: physical_layout[i])
    out = aten.empty.memory_format(physical, dtype=dtype, layout=layout, device=device, pin_memory=pin_memory)
    return out.permute(inverse)


# Backward ops with no torch or torchlib decomposition, supplied here (and one factory op).
BACKWARD_DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {
    aten.convolution_backward.default: convolution_backward,
    aten.max_pool2d_with_indices_backward.default: max_pool2d_with_indices_backward,
    aten.avg_pool2d_backward.default: avg_pool2d_backward,
    aten._adaptive_avg_pool2d_backward.default: adaptive_avg_pool2d_backward,
    aten.empty_permuted.default: empty_permuted,
}

# Ops torch does decompose, replaced by exact equivalents that export to fewer, cheaper ONNX nodes.
LEANER_DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {
    aten._native_batch_norm_legit.default: batch_norm_training,
    aten.native_batch_norm_backward.default: batch_norm_backward,
    aten.nll_loss_backward.default: nll_loss_backward,
}

# ONNX translations of aten ops that the decompositions above leave in the graph (NotImplemented), passed
# to the exporter as its custom_translation_table: faster in onnxruntime than any decomposition.
ONNX_TRANSLATIONS: dict[torch._ops.OpOverload, Callable] = {
    aten.max_pool2d_with_indices_backward.default: max_pool2d_backward_onnx,
}

# Torch decompositions outside the core set that the training graph wants: batch norm in training mode
# as explicit statistics (its running-stat update then is plain arithmetic, not ONNX's training-mode
# BatchNormalization), dropout as rand_like + compare (ONNX RandomUniformLike, fresh on every run).
# Inference-mode batch norm (``_native_batch_norm_legit_no_training``) stays: ONNX's inference-mode
# BatchNormalization, one pass, which :func:`batch_norm_training` also uses.
_FROM_TORCH = (
    aten.native_dropout.default,
    aten.native_batch_norm.default,
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats,
    aten._native_batch_norm_legit_functional.default,
)


@functools.cache
def _table() -> dict[torch._ops.OpOverload, Callable]:
    table = dict(core_aten_decompositions())
    for op in _FROM_TORCH:
        if op in decomposition_table:
            table[op] = decomposition_table[op]
    table.update(BACKWARD_DECOMPOSITIONS)
    table.update(LEANER_DECOMPOSITIONS)
    return table


def training_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The decomposition table for tracing training steps (a fresh copy: callers may extend it)."""
    return dict(_table())
