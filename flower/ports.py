"""A training plan's ports, read from its own ONNX metadata: what a Flower client needs, without torch.

A planwire training plan (see ``planwire.exporter.training.step``) lists every graph input and output in
its ``planwire.inputs``/``planwire.outputs`` metadata with a role, and each state output names the input
it replaces (``binds``). Its ``planwire.training`` entry holds the optimizer's default hyper-parameters.
That is all a client needs to run the step in plain onnxruntime: the plan bytes are the whole payload.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from planwire.transport import dtypes
from planwire.transport.plancheck import DEFAULT_DOMAINS, PlanRejected, check_model
from planwire.transport.spec import (
    META_INPUTS,
    META_KIND,
    META_NAME,
    META_OUTPUTS,
    META_TRAINING,
    PlanVariant,
    TensorSpec,
)

WEIGHT_ROLES = ("param", "frozen", "buffer")
STATE_ROLES = (*WEIGHT_ROLES, "optim")
_ROLES = {"arg", "hyper", *STATE_ROLES}


def fingerprint(plan: bytes) -> str:
    """A plan's sha256 (hex): the key a node caches it under; the same as its planwire plan id."""
    return hashlib.sha256(plan).hexdigest()


@dataclass(frozen=True)
class PlanPorts:
    """The typed ports of one training plan, by role, and how its outputs feed its next call."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    bindings: dict[str, str]  # output name -> the input it replaces on the next call
    hyper_defaults: dict[str, float]  # "hyper.lr" -> 0.05

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> PlanPorts:
        """Ports from ``metadata_props``; PlanRejected naming what is missing or inconsistent."""
        name = props.get(META_NAME, "") or "plan"
        if props.get(META_KIND) != "training":
            raise PlanRejected(
                f"plan {name!r} is not a planwire training plan (planwire.kind is {props.get(META_KIND)!r}); "
                "build it with planwire.training_plan"
            )
        try:
            ins = [_spec(e) for e in json.loads(props[META_INPUTS])]
            outs_raw = json.loads(props[META_OUTPUTS])
            outs = [_spec(e) for e in outs_raw]
            training = json.loads(props.get(META_TRAINING, "{}"))
            hyper = training.get("optimizer", {}).get("hyper", {})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanRejected(f"plan {name!r} has unreadable planwire port metadata: {e}") from None
        by_name = {s.name: s for s in ins}
        bindings: dict[str, str] = {}
        for raw, spec in zip(outs_raw, outs, strict=True):
            target = raw.get("binds")
            if target is None:
                if spec.role not in ("loss", "metric") or spec.shape != ():
                    raise PlanRejected(f"plan {name!r} output {spec.name!r} is neither a scalar result nor bound")
                continue
            bound = by_name.get(target)
            if bound is None or bound.role not in STATE_ROLES or (bound.dtype, bound.shape) != (spec.dtype, spec.shape):
                raise PlanRejected(f"plan {name!r} output {spec.name!r} binds {target!r}, which it cannot replace")
            bindings[spec.name] = target
        for spec in ins:
            if spec.role not in _ROLES:
                raise PlanRejected(f"plan {name!r} input {spec.name!r} has unknown role {spec.role!r}")
            if spec.role != "arg" and not all(isinstance(d, int) and d >= 0 for d in spec.shape):
                raise PlanRejected(f"plan {name!r} state input {spec.name!r} has a dynamic shape")
        if not any(s.role == "loss" for s in outs):
            raise PlanRejected(f"plan {name!r} has no loss output")
        defaults = {}
        for spec in ins:
            if spec.role == "hyper":
                value = hyper.get(spec.name.removeprefix("hyper."))
                if not isinstance(value, (int, float)):
                    raise PlanRejected(f"plan {name!r} has no default for hyper-parameter {spec.name!r}")
                defaults[spec.name] = float(value)
        return cls(name, tuple(ins), tuple(outs), bindings, defaults)

    @classmethod
    def check(
        cls, plan: bytes, *, max_bytes: int = 512 << 20, allowed_domains: frozenset[str] = DEFAULT_DOMAINS
    ) -> PlanPorts:
        """Run plan-worker's own plan checker on ``plan``, then read its ports (PlanRejected if unsafe)."""
        summary = check_model(plan, max_bytes=max_bytes, allowed_domains=allowed_domains)
        return cls.from_metadata(summary.metadata_props)

    def names(self, *roles: str) -> list[str]:
        return [s.name for s in self.inputs if s.role in roles]

    @cached_property
    def weights(self) -> dict[str, TensorSpec]:
        """What travels in a Flower ArrayRecord, by module path: parameters, frozen parameters, buffers."""
        return {_path(s.name): s for s in self.inputs if s.role in WEIGHT_ROLES}

    @cached_property
    def reported(self) -> dict[str, str]:
        """The outputs a step reports (loss and metrics, not bound to a state input), by output name: the
        key each one has in a reply's MetricRecord (``metric.accuracy`` -> ``accuracy``)."""
        return {o.name: o.name.removeprefix("metric.") for o in self.outputs if o.name not in self.bindings}

    @cached_property
    def args(self) -> tuple[TensorSpec, ...]:
        return tuple(s for s in self.inputs if s.role == "arg")

    def hyper_feeds(self, overrides: Mapping[str, float]) -> dict[str, np.ndarray]:
        """Hyper-parameter inputs in the plan's dtypes: its defaults, overridden by name without the
        ``hyper.`` prefix (``{"lr": 0.01}``, as a run config names them)."""
        return {
            s.name: np.asarray(
                float(overrides.get(s.name.removeprefix("hyper."), self.hyper_defaults[s.name])),
                dtypes.to_numpy(s.dtype),
            )
            for s in self.inputs
            if s.role == "hyper"
        }

    def initial_optimizer_state(self) -> dict[str, np.ndarray]:
        """A fresh optimizer state: zeros, as ``Optimizer.init_state`` makes it (a new one every round)."""
        return {s.name: np.zeros(s.shape, dtypes.to_numpy(s.dtype)) for s in self.inputs if s.role == "optim"}

    def variant(self, plan: bytes) -> PlanVariant:
        """The plan as planwire's transport sends it to a plan-worker."""
        return PlanVariant(plan, self.inputs, self.outputs)


def _path(name: str) -> str:
    return name.partition(".")[2]


def _spec(entry: dict) -> TensorSpec:
    dtypes.to_numpy(entry["dtype"])  # ValueError for an unknown dtype
    shape = tuple(d if isinstance(d, int) else str(d) for d in entry["shape"])
    return TensorSpec(str(entry["name"]), str(entry["dtype"]), shape, str(entry.get("role", "arg")))
