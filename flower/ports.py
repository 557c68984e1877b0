"""A training plan's ports, read from its own ONNX metadata: what a Flower client needs, without torch.

A planwire training plan (see ``planwire.exporter.training.step``) lists every graph input and output in
its ``planwire.inputs``/``planwire.outputs`` metadata with a role, and each state output names the input
it replaces (``binds``). Its ``planwire.training`` entry holds the optimizer's default hyper-parameters.
That is all a client needs to run the step in plain onnxruntime: the plan bytes are the whole payload.

The bindings and defaults are read by the one reader of them, transport/bound.py's :class:`BoundPlan`
(which also steps such a plan on a plan-worker); :class:`PlanPorts` holds it to what a Flower round needs
and adds the views a round uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from planwire.transport import dtypes
from planwire.transport.bound import BoundPlan, hyper_array
from planwire.transport.plancheck import DEFAULT_DOMAINS, PlanRejected, check_model
from planwire.transport.spec import (
    META_INPUTS,
    META_KIND,
    META_NAME,
    META_OUTPUTS,
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
    """The typed ports of one training plan, by role, and how its outputs feed its next call: its
    :class:`BoundPlan` (``bound``), checked for what a Flower round needs (a training plan with a loss, every
    other output a scalar metric or bound to a state input, state of static shapes)."""

    bound: BoundPlan  # its variant's bytes are the plan's when read by ``check`` (empty from ``from_metadata``)

    @property
    def name(self) -> str:
        return self.bound.name

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.bound.variant.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.bound.variant.outputs

    @property
    def bindings(self) -> Mapping[str, str]:
        """Output name -> the input it replaces on the next call."""
        return self.bound.bindings

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], *, plan: bytes = b"") -> PlanPorts:
        """Ports from ``metadata_props`` (of ``plan``); PlanRejected naming what is missing or inconsistent."""
        name = props.get(META_NAME, "") or "plan"
        if props.get(META_KIND) != "training":
            raise PlanRejected(
                f"plan {name!r} is not a planwire training plan (planwire.kind is {props.get(META_KIND)!r}); "
                "build it with planwire.training_plan"
            )
        try:
            ins = tuple(_spec(e) for e in json.loads(props[META_INPUTS]))
            outs = tuple(_spec(e) for e in json.loads(props[META_OUTPUTS]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanRejected(f"plan {name!r} has unreadable planwire port metadata: {e}") from None
        for spec in ins:
            if spec.role not in _ROLES:
                raise PlanRejected(f"plan {name!r} input {spec.name!r} has unknown role {spec.role!r}")
        try:
            bound = BoundPlan.from_metadata(PlanVariant(plan, ins, outs), props, name=name)
        except ValueError as e:  # a binding to what it cannot replace, a hyper-parameter without a default
            raise PlanRejected(str(e)) from None
        for spec in outs:
            if spec.name not in bound.bindings and (spec.role not in ("loss", "metric") or spec.shape != ()):
                raise PlanRejected(f"plan {name!r} output {spec.name!r} is neither a scalar result nor bound")
        for spec in bound.state:
            if not all(isinstance(d, int) and d >= 0 for d in spec.shape):
                raise PlanRejected(f"plan {name!r} state input {spec.name!r} has a dynamic shape")
        if not any(s.role == "loss" for s in outs):
            raise PlanRejected(f"plan {name!r} has no loss output")
        return cls(bound)

    @classmethod
    def check(
        cls, plan: bytes, *, max_bytes: int = 512 << 20, allowed_domains: frozenset[str] = DEFAULT_DOMAINS
    ) -> PlanPorts:
        """Run plan-worker's own plan checker on ``plan``, then read its ports (PlanRejected if unsafe)."""
        summary = check_model(plan, max_bytes=max_bytes, allowed_domains=allowed_domains)
        return cls.from_metadata(summary.metadata_props, plan=plan)

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

    @property
    def args(self) -> tuple[TensorSpec, ...]:
        return self.bound.args

    @cached_property
    def hyper_defaults(self) -> dict[str, float]:
        """``"hyper.lr"`` -> 0.05: the default of each hyper-parameter, as the plan takes it (read once, with the
        bindings, by :class:`BoundPlan`)."""
        return {name: value.item() for name, value in self.bound.hyper.items()}

    @cached_property
    def hyper_names(self) -> dict[str, TensorSpec]:
        """The hyper-parameter inputs by the name a run config gives them (``lr`` for ``hyper.lr``)."""
        return {s.name.removeprefix("hyper."): s for s in self.inputs if s.role == "hyper"}

    def hyper_feeds(self, overrides: Mapping[str, object]) -> dict[str, np.ndarray]:
        """Hyper-parameter inputs in the plan's dtypes: its defaults, overridden by name without the
        ``hyper.`` prefix (``{"lr": 0.01}``, as a run config names them; other names are not the plan's and
        are left alone). ValueError naming the input for an override that is no number (``true`` included) or
        that its dtype cannot hold: a run config comes from the server, held to the rules of the defaults."""
        feeds = dict(self.bound.hyper)
        for key, value in overrides.items():
            spec = self.hyper_names.get(key)
            if spec is None:
                continue
            feeds[spec.name] = hyper_array(spec, value)
        return feeds

    def initial_optimizer_state(self) -> dict[str, np.ndarray]:
        """A fresh optimizer state: zeros, as ``Optimizer.init_state`` makes it (a new one every round)."""
        return {s.name: np.zeros(s.shape, dtypes.to_numpy(s.dtype)) for s in self.bound.state if s.role == "optim"}

    def variant(self, plan: bytes) -> PlanVariant:
        """The plan as planwire's transport sends it to a plan-worker."""
        return self.bound.variant if plan == self.bound.variant.data else PlanVariant(plan, self.inputs, self.outputs)


def _path(name: str) -> str:
    return name.partition(".")[2]


def _spec(entry: dict) -> TensorSpec:
    dtypes.to_numpy(entry["dtype"])  # ValueError for an unknown dtype
    shape = tuple(d if isinstance(d, int) else str(d) for d in entry["shape"])
    return TensorSpec(str(entry["name"]), str(entry["dtype"]), shape, str(entry.get("role", "arg")))
