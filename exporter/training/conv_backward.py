"""The backward of a convolution (``aten.convolution_backward``, which neither torch nor torchlib
decomposes) as forward ops with ONNX translations: Conv or ConvTranspose for the input gradient, per-tap
MatMuls (or a Conv) for the weight gradient. Part of the training decomposition table
(:mod:`.decompositions`); checked against aten in tests/test_training_decomp.py and
tests/test_training_workloads.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

aten = torch.ops.aten


def per_axis(value: int | Sequence[int], n: int) -> list[int]:
    """Expand an int or a one-element list to n spatial entries, as the aten kernels do."""
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    return value * n if len(value) == 1 else value


def _conv_weight_grad(
    grad_output: Tensor,
    inp: Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """Gradient of a (non-transposed) convolution's weight: a convolution with batch and channel swapped.

    grad_w[o, i, k] = sum_{n, y} grad[n, o, y] * inp[n, i, y*stride - pad + k*dilation], which is a
    convolution of the input (batch as channels) with grad_output as the kernel, stride and dilation
    exchanged. Groups become a grouped convolution over (group, batch) channels.
    """
    if groups == 1 and inp.dim() == 4 and all(isinstance(d, int) for d in (*inp.shape[1:], *grad_output.shape[1:])):
        return _conv_weight_grad_taps(grad_output, inp, weight_shape, stride, padding, dilation)
    n_batch, c_in = inp.shape[0], inp.shape[1]
    spatial = inp.shape[2:]
    cin_g = c_in // groups
    # input: (N, C_in, *S) -> (C_in/g, g*N, *S), channel index = group*N + n
    x = inp.reshape(n_batch, groups, cin_g, *spatial)
    x = x.permute(2, 1, 0, *range(3, 3 + len(spatial))).reshape(cin_g, groups * n_batch, *spatial)
    # kernel: (N, C_out, *So) -> (C_out, N, *So); output channel o uses input channels of its group
    w = grad_output.transpose(0, 1)
    out = aten.convolution(x, w, None, list(dilation), list(padding), list(stride), False, [0] * len(spatial), groups)
    # out: (C_in/g, C_out, *K') -> (C_out, C_in/g, *K), cropped to the kernel size
    out = out.transpose(0, 1)
    for axis, k in enumerate(weight_shape[2:]):
        if out.shape[2 + axis] != k:
            out = out.narrow(2 + axis, 0, k)
    return out.contiguous()  # as aten's kernel returns it; strided results trip later decompositions


# Output pixels per image from which a weight-gradient tap is a batched MatMul per sample (N products
# (C_out, Y) x (Y, C_in), then a sum over the batch) rather than one MatMul over the whole batch (which
# needs the gradient transposed to (C_out, N*Y) first). onnxruntime spreads a batched MatMul's products
# over its threads; one (C_out, N*Y) x (N*Y, C_in) product with C_out, C_in <= 64 measured no faster at
# 2 threads than at 1. Below this size the per-sample products are too short. Measured per layer in
# onnxruntime (Pad + Transpose + taps + stack, best of 30, loaded host): on the bench ResNet's 8x8 layers
# (Y = 64) the per-sample form was 15-25% slower than one MatMul; on its 16x16 and 32x32 layers 2-8%
# faster at 1 thread and 2-28% at 2, and the gradient's transpose is gone.
PER_SAMPLE_TAPS = 256


def _conv_weight_grad_taps(
    grad_output: Tensor,
    inp: Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """The weight gradient of a 2-d convolution (one group, static spatial sizes) as one MatMul per tap.

    grad_w[o, i, kh, kw] = sum_{n, y} grad[n, o, y] * x_pad[n, i, y*stride + (kh, kw)*dilation]: for
    each of the kh*kw kernel taps, the window of the padded input that tap sees, times the gradient, as
    one MatMul (C_out, N*Y) x (N*Y, C_in) whose inner dimension runs over the whole batch, or, from
    :data:`PER_SAMPLE_TAPS` output pixels per image, a batched MatMul (N, C_out, Y) x (N, Y, C_in) over
    the gradient as it stands, then a sum over the batch. The input is moved to channels-last once, so
    that each tap's window (one strided Slice) copies rows of W*C_in contiguous values and is the
    MatMul's right operand as it stands. Measured in onnxruntime on the bench ResNet's layers, ~2x faster
    than a batched MatMul per tap over channels-first windows, which was itself ~10x faster than the
    convolution form (:func:`_conv_weight_grad`: a convolution whose kernel is the whole gradient image,
    run through a generic im2col).
    """
    c_out, c_in, k_h, k_w = weight_shape
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = stride, padding, dilation
    out_h, out_w = grad_output.shape[2], grad_output.shape[3]
    # (N, H, W, C_in), moved before it is padded: convolutions that read the same input (a block's first
    # convolution and its 1x1 shortcut) then share one Transpose (onnxruntime merges equal nodes)
    unpadded = aten.clone(inp.permute(0, 2, 3, 1), memory_format=torch.contiguous_format)
    x = aten.constant_pad_nd(unpadded, [0, 0, p_w, p_w, p_h, p_h]) if p_h or p_w else unpadded
    # a stride-1 convolution whose output has the input's size: the tap at the padding's offset sees the
    # whole input as it is, so that tap reads it without a Slice (the centre tap of a 3x3, padding 1)
    whole = (s_h, s_w) == (1, 1) and (out_h, out_w) == (inp.shape[2], inp.shape[3])
    # aten ops with the sizes spelled out: tracing infers no -1 and checks no broadcast, which made this
    # decomposition half of a warm ResNet build's trace (sizes are symbolic in the batch)
    n_batch, per_image = grad_output.shape[0], out_h * out_w
    per_sample = per_image >= PER_SAMPLE_TAPS
    if per_sample:  # the gradient as it stands, (N, C_out, Y): no transpose
        grad = grad_output
        if not grad.is_contiguous():
            grad = aten.clone(grad, memory_format=torch.contiguous_format)
        grad = aten.view(grad, [n_batch, c_out, per_image])
        window_shape = [n_batch, per_image, c_in]
    else:
        rows = n_batch * per_image
        grad = aten.clone(grad_output.transpose(0, 1), memory_format=torch.contiguous_format).view(c_out, rows)
        window_shape = [rows, c_in]
    taps = []
    for i in range(k_h):
        window_rows = aten.slice(x, 1, i * d_h, i * d_h + (out_h - 1) * s_h + 1, s_h)
        for j in range(k_w):
            if whole and (i * d_h, j * d_w) == (p_h, p_w):
                window = aten.view(unpadded, window_shape)
            else:
                window = aten.slice(window_rows, 2, j * d_w, j * d_w + (out_w - 1) * s_w + 1, s_w)
                window = aten.clone(window, memory_format=torch.contiguous_format).view(window_shape)
            taps.append(aten.bmm(grad, window) if per_sample else aten.mm(grad, window))
    # stacked on a new first axis (a Concat of whole blocks: on the last axis onnxruntime copies element
    # by element), summed over the batch (per-sample products), then the small (taps, C_out, C_in) result
    # moved to the weight's layout
    stacked = torch.stack(taps, 0)
    if per_sample:
        stacked = aten.sum.dim_IntList(stacked, [1])
    return stacked.permute(1, 2, 0).reshape(c_out, c_in, k_h, k_w).contiguous()


def convolution_backward(
    grad_output: Tensor,
    inp: Tensor,
    weight: Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``aten.convolution_backward`` for 1-3 spatial dims, any stride/padding/dilation/groups.

    Regular convolution: grad_input is a transposed convolution of grad_output with the same weight (its
    output_padding chosen to restore the input size), grad_weight is :func:`_conv_weight_grad`.
    Transposed convolution: grad_input is a regular convolution, and grad_weight is the weight gradient
    of the regular convolution that maps grad_output to the input.
    """
    nd = inp.dim() - 2
    stride, padding, dilation = per_axis(stride, nd), per_axis(padding, nd), per_axis(dilation, nd)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        if transposed:
            grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, False, [0] * nd, groups)
            for i in range(nd):  # output_padding >= stride (allowed when < dilation) adds positions
                if grad_input.shape[2 + i] != inp.shape[2 + i]:
                    grad_input = grad_input.narrow(2 + i, 0, inp.shape[2 + i])
            grad_input = grad_input.contiguous()
        else:
            extra = []
            for i in range(nd):
                size = (grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                size = size + dilation[i] * (weight.shape[2 + i] - 1) + 1
                extra.append(inp.shape[2 + i] - size)
            flipped_pad = [dilation[i] * (weight.shape[2 + i] - 1) - padding[i] for i in range(nd)]
            if groups == 1 and set(stride) == {1} and not any(extra) and min(flipped_pad) >= 0:
                # stride 1: a plain convolution with the flipped, transposed kernel computes the same sums;
                # onnxruntime's Conv (NCHWc path) is faster than its ConvTranspose (col2im)
                kernel = weight.flip(list(range(2, 2 + nd))).transpose(0, 1)
                grad_input = aten.convolution(
                    grad_output, kernel, None, stride, flipped_pad, dilation, False, [0] * nd, groups
                )
            else:
                grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, groups)
    if output_mask[1]:
        if transposed:
            grad_weight = _conv_weight_grad(inp, grad_output, weight.shape, stride, padding, dilation, groups)
        else:
            grad_weight = _conv_weight_grad(grad_output, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_bias = grad_output.sum([0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias
