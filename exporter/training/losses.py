"""Losses and metrics of training steps: which torch loss a callable is, what targets it takes, accuracy."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Metric = Callable[..., Tensor]

# Losses whose target dtype and accuracy rule are known, by function and by module class.
_LOSSES: dict[object, str] = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll_loss",
    F.mse_loss: "mse_loss",
    F.l1_loss: "l1_loss",
    F.smooth_l1_loss: "smooth_l1_loss",
    F.huber_loss: "huber_loss",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
    F.binary_cross_entropy: "binary_cross_entropy",
    nn.CrossEntropyLoss: "cross_entropy",
    nn.NLLLoss: "nll_loss",
    nn.MSELoss: "mse_loss",
    nn.L1Loss: "l1_loss",
    nn.SmoothL1Loss: "smooth_l1_loss",
    nn.HuberLoss: "huber_loss",
    nn.BCEWithLogitsLoss: "binary_cross_entropy_with_logits",
    nn.BCELoss: "binary_cross_entropy",
}
CLASS_INDEX_LOSSES = {"cross_entropy", "nll_loss"}


def loss_kind(loss: Callable[..., Tensor]) -> str | None:
    """The torch loss behind ``loss`` (a functional or an ``nn`` loss module), or None if unknown."""
    return _LOSSES.get(loss) or _LOSSES.get(type(loss))


def check_targets(kind: str | None, dtypes: Sequence[torch.dtype], n_targets: int) -> None:
    """TypeError naming the targets argument when its dtype cannot work with a known loss."""
    if kind is None or n_targets != 1:
        return
    index = len(dtypes) - 1
    dtype = dtypes[index]
    if kind in CLASS_INDEX_LOSSES:
        if kind == "nll_loss" and dtype != torch.int64:
            raise TypeError(f"targets (args_dtypes[{index}]) must be int64 class indices for nll_loss, got {dtype}")
        if dtype != torch.int64 and not dtype.is_floating_point:
            raise TypeError(
                f"targets (args_dtypes[{index}]) must be int64 class indices (or floating class "
                f"probabilities) for cross_entropy, got {dtype}"
            )
    elif not dtype.is_floating_point:
        raise TypeError(f"targets (args_dtypes[{index}]) must be floating point for {kind}, got {dtype}")


def _accuracy(kind: str | None) -> Metric:
    """Fraction of correct predictions for a classification loss."""
    if kind in CLASS_INDEX_LOSSES:

        def accuracy(output: Tensor, target: Tensor) -> Tensor:
            if target.is_floating_point():  # class probabilities
                target = target.argmax(1)
            return (output.argmax(1) == target).to(torch.float32).mean()

    elif kind in ("binary_cross_entropy_with_logits", "binary_cross_entropy"):
        threshold = 0.0 if kind == "binary_cross_entropy_with_logits" else 0.5

        def accuracy(output: Tensor, target: Tensor) -> Tensor:
            return ((output > threshold) == (target > 0.5)).to(torch.float32).mean()

    else:
        raise ValueError(
            f"metric 'accuracy' needs a classification loss (cross_entropy, nll_loss, binary cross "
            f"entropy); got {kind or 'an unknown loss'}: pass metrics={{'accuracy': fn}} instead"
        )
    return accuracy


def resolve_metrics(metrics: Sequence[str] | Mapping[str, Metric], kind: str | None) -> dict[str, Metric]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    builtin = {"accuracy": lambda: _accuracy(kind)}
    resolved = {}
    for name in metrics:
        if name not in builtin:
            raise ValueError(f"unknown metric {name!r}; built in: {sorted(builtin)} (or pass a name->fn mapping)")
        resolved[name] = builtin[name]()
    return resolved
