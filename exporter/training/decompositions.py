"""Aten decompositions that make training graphs exportable to plain ONNX.

Tracing a backward pass with ``make_fx`` emits backward ops (``convolution_backward``,
``max_pool2d_with_indices_backward``, ``avg_pool2d_backward``, ``_adaptive_avg_pool2d_backward``) that
neither torch nor onnxscript's torchlib decompose, so the ONNX export of any CNN's gradient fails. The
functions here rewrite them into forward ops that have ONNX translations (Conv, ConvTranspose,
ScatterElements, MatMul). Every one is checked against torch autograd in tests/test_training_decomp.py.

:func:`training_decompositions` is the table the training pipeline traces with: torch's core aten set,
a few torch decompositions outside it (batch norm and dropout, so their running statistics and random
masks become explicit ops rather than ONNX training-mode kernels), and the functions below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._decomp import core_aten_decompositions, decomposition_table

from planwire.exporter.training.batch_norm import batch_norm_backward, batch_norm_training

aten = torch.ops.aten


def _tuple(value: int | Sequence[int], n: int) -> list[int]:
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
    x = aten.constant_pad_nd(inp, [p_w, p_w, p_h, p_h]) if p_h or p_w else inp
    x = x.permute(0, 2, 3, 1)  # (N, H, W, C_in)
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
    stride, padding, dilation = _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd)
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


def max_pool2d_with_indices_backward(
    grad_output: Tensor,
    inp: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: Tensor,
) -> Tensor:
    """Scatter-add each output gradient to the input position its window picked (per-plane indices).

    Overlapping windows that pick the same element accumulate, as torch's kernel does. Windows that
    tile the input (the usual ``MaxPool2d(k)``) are left as they are (NotImplemented): the ONNX export
    translates them with :func:`max_pool2d_backward_onnx`, without indices or a scatter.
    """
    if tiled_max_pool2d(inp, grad_output, kernel_size, stride, padding, dilation):
        return NotImplemented
    return max_pool2d_backward_scatter(grad_output, inp, indices)


def max_pool2d_backward_scatter(grad_output: Tensor, inp: Tensor, indices: Tensor) -> Tensor:
    """The general max-pool backward: a scatter-add of ``grad_output`` at the per-plane ``indices``."""
    *lead, height, width = inp.shape
    planes = grad_output.reshape(*lead, -1)
    flat = torch.zeros(*lead, height * width, dtype=grad_output.dtype, device=grad_output.device)
    flat = flat.scatter_add(-1, indices.reshape(*lead, -1), planes)
    return flat.reshape(inp.shape)


def tiled_max_pool2d(
    inp: Tensor,
    grad_output: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> bool:
    """Whether max-pool windows tile the input: stride == kernel, no padding or dilation, and every
    window whole (floor mode, or ceil mode that adds no partial window); a float input of 3 or 4 dims."""
    kh, kw = _tuple(kernel_size, 2)
    sh, sw = _tuple(stride, 2) if stride else (kh, kw)
    if (sh, sw) != (kh, kw) or any(_tuple(padding, 2)) or _tuple(dilation, 2) != [1, 1]:
        return False
    if inp.dim() not in (3, 4) or inp.dtype not in (torch.float32, torch.float64, torch.float16):
        return False
    sizes = (inp.shape[-2], inp.shape[-1], grad_output.shape[-2], grad_output.shape[-1])
    if not all(isinstance(d, int) for d in sizes):
        return False
    height, width, out_h, out_w = sizes
    return (out_h, out_w) == (height // kh, width // kw)


def max_pool2d_backward_onnx(
    grad_output: Any,
    inp: Any,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: Any,
) -> Any:
    """ONNX translation of ``max_pool2d_with_indices_backward`` for tiling windows (see
    :func:`tiled_max_pool2d`, which the decomposition checked): MaxPool's own Indices, then MaxUnpool.

    onnxruntime's MaxPool picks the first maximum of a window in row-major order (strict ``>``, and the
    first element of an all ``-inf`` window), as torch's kernel does; ties are common after a ReLU.
    Windows do not overlap, so every index is written once and MaxUnpool's zero fill is the rest of the
    gradient (rows and columns past the last whole window included). The forward's per-plane indices
    are not read, so the exporter's index arithmetic for them becomes dead code. A window holding NaN
    differs: torch picks the (last) NaN, onnxruntime the largest number.
    """
    from onnxscript.onnx_opset import opset18 as op

    kernel = _tuple(kernel_size, 2)
    unbatched = len(inp.shape) == 3
    if unbatched:
        inp, grad_output = op.Unsqueeze(inp, [0]), op.Unsqueeze(grad_output, [0])
    # the attributes torchlib gives the forward's MaxPool, so that trace.tidy_max_pools can merge the
    # two after the export: one MaxPool then serves the forward output and these indices
    _, raw = op.MaxPool(
        inp, ceil_mode=ceil_mode, dilations=[1, 1], kernel_shape=kernel, pads=[0, 0, 0, 0], strides=kernel
    )
    grad = op.MaxUnpool(grad_output, raw, op.Shape(inp), kernel_shape=kernel, strides=kernel)
    return op.Squeeze(grad, [0]) if unbatched else grad


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


def _pool_divisors(
    size: int, out: int, kernel: int, stride: int, pad: int, count_include_pad: bool
) -> list[tuple[int, int, int]]:
    """(start, end, divisor) of each 1-d average-pooling window, clipped exactly as aten's kernel does."""
    windows = []
    for o in range(out):
        start = o * stride - pad
        end = min(start + kernel, size + pad)
        pool = end - start
        start, end = max(start, 0), min(end, size)
        windows.append((start, end, pool if count_include_pad else end - start))
    return windows


def _pool_matrix(windows: list[tuple[int, int, int]], size: int, divide: bool, like: Tensor) -> Tensor:
    """Constant (size, out) matrix M with M[h, o] = 1/divisor (or 1) when input h lies in window o.

    Built from Python lists so that tracing records one constant, not a chain of slice assignments.
    """
    rows = [[0.0] * len(windows) for _ in range(size)]
    for o, (start, end, div) in enumerate(windows):
        for h in range(start, end):
            rows[h][o] = 1.0 / div if divide else 1.0
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def avg_pool2d_backward(
    grad_output: Tensor,
    inp: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Tensor:
    """Spread each output gradient over its window divided by that window's divisor.

    A window's divisor is the product of its 1-d extents (with or without padding), so the backward is
    separable: grad_input = M_h @ grad_output @ M_w^T with constant (static-shape) window matrices.
    """
    kh, kw = _tuple(kernel_size, 2)
    sh, sw = _tuple(stride, 2) if stride else (kh, kw)
    ph, pw = _tuple(padding, 2)
    height, width = inp.shape[-2], inp.shape[-1]
    out_h, out_w = grad_output.shape[-2], grad_output.shape[-1]
    if not all(isinstance(d, int) for d in (height, width, out_h, out_w)):
        return NotImplemented  # dynamic spatial sizes: leave the op for the caller to report
    divide = divisor_override is None
    rows = _pool_divisors(height, out_h, kh, sh, ph, count_include_pad)
    cols = _pool_divisors(width, out_w, kw, sw, pw, count_include_pad)
    m_h = _pool_matrix(rows, height, divide, grad_output)
    m_w = _pool_matrix(cols, width, divide, grad_output)
    grad = grad_output if divide else grad_output / divisor_override
    return torch.matmul(torch.matmul(m_h, grad), m_w.t())


def _adaptive_windows(size: int, out: int) -> list[tuple[int, int, int]]:
    """(start, end, length) of each adaptive-pooling window: [floor(o*S/O), ceil((o+1)*S/O))."""
    windows = []
    for o in range(out):
        start = (o * size) // out
        end = -((-(o + 1) * size) // out)
        windows.append((start, end, end - start))
    return windows


def adaptive_avg_pool2d_backward(grad_output: Tensor, inp: Tensor) -> Tensor:
    """``_adaptive_avg_pool2d_backward`` as two constant window matrices (see :func:`avg_pool2d_backward`)."""
    height, width = inp.shape[-2], inp.shape[-1]
    out_h, out_w = grad_output.shape[-2], grad_output.shape[-1]
    if not all(isinstance(d, int) for d in (height, width, out_h, out_w)):
        return NotImplemented
    m_h = _pool_matrix(_adaptive_windows(height, out_h), height, True, grad_output)
    m_w = _pool_matrix(_adaptive_windows(width, out_w), width, True, grad_output)
    return torch.matmul(torch.matmul(m_h, grad_output), m_w.t())


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
