"""Functional optimizers that a training plan runs inside its ONNX graph.

A training step plan holds the optimizer update as ordinary graph ops, so the optimizer must be a pure
function: ``update(params, grads, state, hyper) -> (new_params, new_state)`` on plain tensors, with its
state (momentum buffers, Adam moments, step count) as explicit tensors that the plan takes as inputs and
returns updated. Hyper-parameters arrive as 0-d float64 tensors, graph inputs rather than constants, so
a caller can change the learning rate between calls without rebuilding the plan.

The arithmetic follows torch.optim's single-tensor CPU implementation operation by operation (scalars
computed in double precision, then rounded to the parameter dtype where torch rounds them), so K steps
of a plan match K steps of ``torch.optim.SGD``/``Adam`` to float rounding. Structural choices that would
change the graph (whether momentum buffers exist, nesterov, decoupled weight decay) are fixed when the
plan is built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

Tensors = Mapping[str, Tensor]


class Optimizer(ABC):
    """A functional optimizer: named hyper-parameters, per-parameter state slots, a pure update."""

    name: str = ""
    #: state kept once per parameter, stored under ``f"{param}.{slot}"``
    slots: tuple[str, ...] = ()
    #: state shared by all parameters (Adam's step count), stored under its own name
    shared: tuple[str, ...] = ()

    @abstractmethod
    def hyper(self) -> dict[str, float]:
        """Default hyper-parameter values by name, in graph-input order."""

    def init_state(self, params: Tensors) -> dict[str, Tensor]:
        """The state before the first step: zeros shaped like each parameter, and zero shared scalars."""
        state = {f"{name}.{slot}": torch.zeros_like(p) for name, p in params.items() for slot in self.slots}
        for slot in self.shared:
            state[slot] = torch.zeros((), dtype=torch.float32)
        return state

    def hyper_tensors(self, **overrides: float) -> dict[str, Tensor]:
        """Hyper-parameters as the 0-d float64 tensors that ``update`` and the plan take."""
        values = self.hyper()
        unknown = set(overrides) - set(values)
        if unknown:
            raise KeyError(f"{self.name} has no hyper-parameter {sorted(unknown)}; it has {list(values)}")
        values.update(overrides)
        return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}

    @abstractmethod
    def update(
        self, params: Tensors, grads: Tensors, state: Tensors, hyper: Tensors
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One step: the new parameters and the new state (same keys as given); inputs are not mutated."""

    def describe(self) -> dict[str, object]:
        """JSON-able description for plan metadata: name, structural flags and default hyper-parameters."""
        return {"name": self.name, "hyper": self.hyper()}

    def check_hyper(self) -> dict[str, float]:
        """Hyper-parameters for a build check: updated parameters then show gradient errors clearly.

        A step of size ~1 makes a wrong gradient visible in the parameters; subclasses also remove
        what would amplify float noise (Adam's division by a tiny second moment).
        """
        return {**self.hyper(), "lr": 1.0}


def _scalar(hyper: Tensors, key: str, like: Tensor) -> Tensor:
    """A float64 hyper-parameter rounded to the parameter's dtype, as torch rounds a Python scalar."""
    return hyper[key].to(like.dtype)


@dataclass(frozen=True)
class SGD(Optimizer):
    """``torch.optim.SGD(lr, momentum, weight_decay=..., nesterov=...)`` (dampening 0, not maximizing).

    Momentum buffers exist in the plan only when it is built with ``momentum != 0`` (or nesterov); they
    start at zero, which reproduces torch's first step exactly (``0 * m + g == g``).
    """

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    name = "sgd"

    def __post_init__(self) -> None:
        if self.nesterov and self.momentum <= 0:
            raise ValueError("SGD: nesterov momentum requires momentum > 0")

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("momentum_buffer",) if self.momentum != 0 or self.nesterov else ()

    def hyper(self) -> dict[str, float]:
        values = {"lr": float(self.lr)}
        if self.slots:
            values["momentum"] = float(self.momentum)
        values["weight_decay"] = float(self.weight_decay)
        return values

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "nesterov": self.nesterov}

    def update(
        self, params: Tensors, grads: Tensors, state: Tensors, hyper: Tensors
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        new_params: dict[str, Tensor] = {}
        new_state: dict[str, Tensor] = {}
        for name, p in params.items():
            g = grads[name] + _scalar(hyper, "weight_decay", p) * p
            if self.slots:
                momentum = _scalar(hyper, "momentum", p)
                buf = state[f"{name}.momentum_buffer"] * momentum + g
                new_state[f"{name}.momentum_buffer"] = buf
                g = g + momentum * buf if self.nesterov else buf
            new_params[name] = p - _scalar(hyper, "lr", p) * g
        return new_params, new_state


@dataclass(frozen=True)
class Adam(Optimizer):
    """``torch.optim.Adam(lr, betas, eps, weight_decay)``; ``decoupled_weight_decay=True`` is AdamW.

    State: ``exp_avg`` and ``exp_avg_sq`` per parameter and one float32 ``step`` count shared by all
    (torch keeps one per parameter, always equal). Bias corrections are computed in float64 from the
    float64 betas, as torch does with Python floats.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False

    name = "adam"
    slots = ("exp_avg", "exp_avg_sq")
    shared = ("step",)

    def hyper(self) -> dict[str, float]:
        return {
            "lr": float(self.lr),
            "beta1": float(self.betas[0]),
            "beta2": float(self.betas[1]),
            "eps": float(self.eps),
            "weight_decay": float(self.weight_decay),
        }

    def describe(self) -> dict[str, object]:
        name = "adamw" if self.decoupled_weight_decay else self.name
        return {**super().describe(), "name": name}

    def check_hyper(self) -> dict[str, float]:
        # eps=1: the first step is g / (|g| + 1), smooth in g; with eps ~1e-8 it is ~sign(g), which
        # float noise flips for gradients near zero (valid plans would fail the check)
        return {**super().check_hyper(), "eps": 1.0}

    def update(
        self, params: Tensors, grads: Tensors, state: Tensors, hyper: Tensors
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        step = state["step"] + 1
        new_state: dict[str, Tensor] = {"step": step}
        lr, beta1, beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
        step64 = step.to(torch.float64)
        bias_correction1 = 1 - beta1**step64
        bias_correction2_sqrt = torch.sqrt(1 - beta2**step64)
        neg_step_size = -(lr / bias_correction1)
        new_params: dict[str, Tensor] = {}
        for name, p in params.items():
            g = grads[name]
            if self.decoupled_weight_decay:
                p = p * (1 - lr * hyper["weight_decay"]).to(p.dtype)
            else:
                g = g + _scalar(hyper, "weight_decay", p) * p
            # torch's lerp(m, g, 1 - beta1), whose branch on the runtime weight exports as a Where over the
            # whole tensor (a slow kernel in onnxruntime); exact at beta1 = 0 and 1, rounding apart between
            exp_avg = state[f"{name}.exp_avg"] * beta1.to(p.dtype) + (1 - beta1).to(p.dtype) * g
            exp_avg_sq = state[f"{name}.exp_avg_sq"] * beta2.to(p.dtype) + (1 - beta2).to(p.dtype) * g * g
            denom = torch.sqrt(exp_avg_sq) / bias_correction2_sqrt.to(p.dtype) + _scalar(hyper, "eps", p)
            new_params[name] = p + neg_step_size.to(p.dtype) * exp_avg / denom
            new_state[f"{name}.exp_avg"] = exp_avg
            new_state[f"{name}.exp_avg_sq"] = exp_avg_sq
        return new_params, new_state


def resolve(optimizer: object) -> Optimizer:
    """``optimizer`` if it is a planwire optimizer instance (None: ``SGD()``), else a TypeError saying what
    to pass instead: for a ``torch.optim`` optimizer, the planwire.optim equivalent with its settings."""
    if optimizer is None:
        return SGD()
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        raise TypeError(
            f"optimizer=planwire.optim.{optimizer.__name__} is a class: pass an instance, "
            f"e.g. optimizer=planwire.optim.{optimizer.__name__}(lr=0.01)"
        )
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if issubclass(cls, torch.optim.Optimizer):
        ours, settings = _equivalent(cls, getattr(optimizer, "defaults", None) or {})
        instead = (
            f"planwire.optim.{ours}({settings})" if ours else f"one of planwire.optim's optimizers ({', '.join(_MINE)})"
        )
        raise TypeError(
            f"optimizer=torch.optim.{cls.__name__}: a training plan runs the optimizer inside its ONNX graph, so it "
            f"takes a functional optimizer from planwire.optim (no model.parameters()): use {instead}"
        )
    raise TypeError(
        f"optimizer must be a planwire.optim optimizer ({', '.join(_MINE)}), got {cls.__module__}.{cls.__qualname__}"
    )


_MINE = ("SGD", "Adam")


def _equivalent(cls: type, defaults: dict[str, object]) -> tuple[str | None, str]:
    """(planwire.optim class name, its keyword arguments as code) matching a torch.optim class and settings."""
    name = {"SGD": "SGD", "Adam": "Adam", "AdamW": "Adam"}.get(cls.__name__)
    if name is None:
        return None, ""
    ours = {"SGD": SGD, "Adam": Adam}[name]
    values = {f.name: getattr(ours(), f.name) for f in fields(ours)}
    if cls.__name__ == "AdamW":
        defaults = {**defaults, "decoupled_weight_decay": True}
    args = []
    for key, default in values.items():
        value = defaults.get(key, default)
        if isinstance(value, list):
            value = tuple(value)
        if key == "lr" or value != default:
            args.append(f"{key}={value!r}")
    return name, ", ".join(args)


__all__ = ["SGD", "Adam", "Optimizer", "resolve"]
