"""ONNX translations of aten ops that torch.onnx's own (onnxscript's torchlib) gets wrong for plans.

Passed to ``torch.onnx.export`` as its ``custom_translation_table`` by :func:`planwire.exporter.export.export_model`.

* ``_native_batch_norm_legit_functional`` (a BatchNorm layer in training mode, after torch.export's
  functionalization): torchlib 0.7 forces ``training = False`` ("ORT only supports training mode with
  opset < 14") and normalizes with the *running* statistics, so a module in training mode exported as a
  graph computing what the module computes in eval mode. :func:`batch_norm_functional` normalizes with the
  batch's own statistics, as eager torch does in training mode: mean and biased variance over every axis
  but the channel axis (1), then ONNX's inference-mode BatchNormalization fed with them (one pass). Its
  running-statistics outputs follow torch's update (unbiased variance, ``momentum``); a plan drops them
  (plans are stateless: :mod:`planwire.exporter.modes` warns about it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten


def batch_norm_functional(
    inp: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Any, Any, Any, Any, Any]:
    """``_native_batch_norm_legit_functional``: (output, save_mean, save_rstd, new running_mean, new
    running_var), with torch's ``momentum`` (ONNX's is one minus it).

    Statistics of float16/bfloat16 inputs are computed in float32, as torch's kernels do (opmath); the
    output is cast back to the input's type.
    """
    from onnxscript import ir
    from onnxscript.onnx_opset import opset20 as op

    rank = len(inp.shape)
    axes = op.Constant(value_ints=[a for a in range(rank) if a != 1])
    channels = op.Shape(inp, start=1, end=2)
    low = inp.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    x = op.Cast(inp, to=ir.DataType.FLOAT) if low else inp
    scale = op.Expand(op.CastLike(1.0, x), channels) if weight is None else op.CastLike(weight, x)
    shift = op.Expand(op.CastLike(0.0, x), channels) if bias is None else op.CastLike(bias, x)
    if not training:
        mean, var = op.CastLike(running_mean, x), op.CastLike(running_var, x)
    else:
        kept = op.ReduceMean(x, axes, keepdims=True)  # (1, C, 1, ...): one pass serves both uses
        mean = op.Reshape(kept, channels)
        centered = op.Sub(x, kept)
        var = op.ReduceMean(op.Mul(centered, centered), axes, keepdims=False)
    out = op.BatchNormalization(x, scale, shift, mean, var, epsilon=eps, momentum=1.0 - momentum, training_mode=0)
    if low:
        out = op.CastLike(out, inp)
    rstd = op.Reciprocal(op.Sqrt(op.Add(var, op.CastLike(eps, var))))
    save_mean, save_rstd = op.Cast(mean, to=ir.DataType.FLOAT), op.Cast(rstd, to=ir.DataType.FLOAT)
    if not training:
        return out, save_mean, save_rstd, op.Identity(running_mean), op.Identity(running_var)
    count = op.CastLike(op.Div(op.Size(x), op.Squeeze(channels)), var)
    unbiased = op.Div(op.Mul(var, count), op.Sub(count, op.CastLike(1.0, var)))
    new_mean = _blend(op, mean, running_mean, momentum)
    new_var = _blend(op, unbiased, running_var, momentum)
    return out, save_mean, save_rstd, new_mean, new_var


def _blend(op: Any, batch: Any, running: Any, momentum: float) -> Any:
    """``momentum * batch + (1 - momentum) * running``, in the running statistic's type."""
    batch = op.CastLike(batch, running)
    return op.Add(op.Mul(batch, op.CastLike(momentum, running)), op.Mul(running, op.CastLike(1.0 - momentum, running)))


TRANSLATIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    aten._native_batch_norm_legit_functional.default: batch_norm_functional,
}


@functools.cache
def translations_source() -> str:
    """The code of these translations (part of a plan's cache key: an edited one must re-export)."""
    return "\n".join(inspect.getsource(fn) for fn in (*TRANSLATIONS.values(), _blend))
