"""Pooling backward ops (max, average, adaptive average) that neither torch nor torchlib decomposes, as
ops with ONNX translations: MaxUnpool or a scatter-add, constant window matrices. Part of the training
decomposition table (:mod:`.decompositions`); checked against aten in tests/test_training_decomp.py and
tests/test_training_pool.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from planwire.exporter.training.conv_backward import per_axis


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
    kh, kw = per_axis(kernel_size, 2)
    sh, sw = per_axis(stride, 2) if stride else (kh, kw)
    if (sh, sw) != (kh, kw) or any(per_axis(padding, 2)) or per_axis(dilation, 2) != [1, 1]:
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

    kernel = per_axis(kernel_size, 2)
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
    kh, kw = per_axis(kernel_size, 2)
    sh, sw = per_axis(stride, 2) if stride else (kh, kw)
    ph, pw = per_axis(padding, 2)
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
