"""BatchNorm2d in training mode, decomposed for onnxruntime: fewer full-size passes than torch's
decomposition, with torch's formulas (see :func:`batch_norm_training`, :func:`batch_norm_backward`).
Part of the training decomposition table (:mod:`.decompositions`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._decomp import decomposition_table

aten = torch.ops.aten


def _batch_norm_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` per channel (axis 1) in one pass: ONNX's inference-mode BatchNormalization with
    mean 0, variance 1 and epsilon 0, which onnxruntime runs as exactly that multiply-add."""
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    return aten._native_batch_norm_legit_no_training(x, scale, shift, zeros, ones, 0.0, 0.0)[0]


def _leaner_batch_norm(x: Tensor, training: bool) -> bool:
    """Whether :func:`batch_norm_training` and :func:`batch_norm_backward` take a batch norm: training
    mode over a float32/float64 (N, C, H, W) input; the rest keeps torch's decompositions."""
    return training and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)


def batch_norm_training(
    inp: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``_native_batch_norm_legit`` in training mode: the batch statistics as ops, the normalization as
    ONNX's inference-mode BatchNormalization fed with them.

    torch's decomposition normalizes with four full-size passes (``x - mean``, ``* rstd``, ``* weight``,
    ``+ bias``) after computing the mean twice (once inside ``var_mean``); onnxruntime's BatchNormalization
    computes ``x * (weight * rstd) + (bias - mean * weight * rstd)`` in one pass, the very formula of
    torch's CPU kernel. The running statistics are updated as torch's decomposition does.
    """
    table = decomposition_table[aten._native_batch_norm_legit.default]
    if not _leaner_batch_norm(inp, training):
        return table(inp, weight, bias, running_mean, running_var, training, momentum, eps)
    dims = [0, 2, 3]
    channels = inp.shape[1]
    save_mean = inp.mean(dims)
    centered = inp - save_mean.reshape(1, channels, 1, 1)  # as the backward computes it: one Sub for both
    var = (centered * centered).mean(dims)
    save_rstd = torch.rsqrt(var + eps)
    scale = weight if weight is not None else torch.ones_like(var)
    shift = bias if bias is not None else torch.zeros_like(var)
    output = aten._native_batch_norm_legit_no_training(inp, scale, shift, save_mean, var, momentum, eps)[0]
    if running_mean is not None:
        running_mean.copy_(momentum * save_mean + (1 - momentum) * running_mean)
    if running_var is not None:
        n = inp.numel() / channels
        running_var.copy_(momentum * (var * (n / (n - 1))) + (1 - momentum) * running_var)
    return output, save_mean, save_rstd


def batch_norm_backward(
    grad_out: Tensor,
    inp: Tensor,
    weight: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    save_mean: Tensor | None,
    save_invstd: Tensor | None,
    train: bool,
    eps: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``native_batch_norm_backward`` in training mode with torch's formulas and fewer full-size passes.

    ``grad_input = (grad - (centered * proj + grad_mean)) * weight * invstd``, the bracket as one
    per-channel multiply-add (:func:`_batch_norm_affine`) where torch's decomposition takes a multiply and
    two subtractions; ``centered`` (``x - mean``) is the forward's, which onnxruntime computes once.
    """
    if save_mean is None or save_invstd is None or not _leaner_batch_norm(inp, train):
        return decomposition_table[aten.native_batch_norm_backward.default](
            grad_out, inp, weight, running_mean, running_var, save_mean, save_invstd, train, eps, output_mask
        )
    dims = [0, 2, 3]
    channels = inp.shape[1]
    norm = 1.0 / (inp.numel() / channels)
    centered = inp - save_mean.reshape(1, channels, 1, 1)
    grad_sum = grad_out.sum(dims)
    dot = (grad_out * centered).sum(dims)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        proj = (dot * norm) * (save_invstd * save_invstd)
        grad_scale = save_invstd * weight if weight is not None else save_invstd
        projected = _batch_norm_affine(centered, proj, grad_sum * norm)
        grad_input = (grad_out - projected) * grad_scale.reshape(1, channels, 1, 1)
    if output_mask[1]:
        grad_weight = dot * save_invstd
    if output_mask[2]:
        grad_bias = grad_sum
    return grad_input, grad_weight, grad_bias
