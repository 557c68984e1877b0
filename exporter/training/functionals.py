"""Functionals that do not trace (or export) as they are, swapped for equivalents while tracing.

:func:`traceable_functionals` swaps dropout, 3-d linear and scaled-dot-product attention for
equivalents that trace with a symbolic batch and export; dropout then becomes ``rand_like`` (ONNX
``RandomUniformLike``), drawing a fresh mask on every run of the plan.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def _dropout(x: Tensor, p: float, training: bool, feature: bool) -> Tensor:
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    if not feature or x.dim() < 2:
        return torch.ops.aten.native_dropout(x, p, True)[0]
    # channel dropout: one scaled keep/drop factor per (sample, channel), as torch's feature_dropout
    ones = torch.ones(*x.shape[:2], *([1] * (x.dim() - 2)), dtype=x.dtype, device=x.device)
    return x * torch.ops.aten.native_dropout(ones, p, True)[0]


def _dropout_fn(feature: bool) -> Callable[..., Tensor]:
    def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        return _dropout(input, p, training, feature)

    return dropout


def _linear_fn(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if input.dim() < 3 or bias is None:
            return original(input, weight, bias)
        out = original(input.reshape(-1, input.shape[-1]), weight, bias)
        return out.reshape(*input.shape[:-1], out.shape[-1])

    return linear


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` in plain ops (its documented reference implementation)."""
    length, source = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = _dropout(scores.softmax(-1), dropout_p, True, False)
    return weights @ value


@contextlib.contextmanager
def traceable_functionals() -> Iterator[None]:
    """Swap a few ``torch.nn.functional`` entries for equivalents that trace and export, while tracing.

    * ``dropout``/``dropout1d/2d/3d`` -> ``native_dropout``: the composite ``aten.dropout`` reads the
      numel as an int under a ``torch.func`` transform and fails with a symbolic batch.
    * ``linear`` on inputs of 3+ dims -> a 2-d linear between reshapes: aten's fused path reads the
      sizes as ints and silently fixes the batch axis to its traced size.
    * ``scaled_dot_product_attention`` -> plain ops: the fused kernels' backward ops do not export.

    The module attributes are swapped (not a TorchFunctionMode) so that functionals calling these by
    their global name (``multi_head_attention_forward``) get them too. Same math, so other threads
    calling them meanwhile are unaffected in substance; callers hold the export lock.
    """
    swaps = {
        "dropout": _dropout_fn(False),
        "dropout1d": _dropout_fn(True),
        "dropout2d": _dropout_fn(True),
        "dropout3d": _dropout_fn(True),
        "linear": _linear_fn(F.linear),
        "scaled_dot_product_attention": _attention,
    }
    saved = {name: getattr(F, name) for name in swaps}
    try:
        for name, fn in swaps.items():
            setattr(F, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
