"""Plans read back from .onnx files or bytes: sendable, runnable and inspectable, but never rebuilt.

Needs onnxruntime and numpy only (no torch, no onnx package), so a worker-only install can load, show
and run a plan: ports come from an onnxruntime session, the rest from the plan's metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort

from planwire.exporter import metadata, runtime, summary
from planwire.exporter.base import PlanRunner
from planwire.transport.bound import BoundPlan, BoundPointer
from planwire.transport.plancheck import PlanRejected, check_model
from planwire.transport.spec import PlanVariant

MAX_PLAN_BYTES = 2**31 - 1  # protobuf's limit


class LoadedPlan(PlanRunner):
    """A plan from ONNX bytes: one fixed variant; a call that does not fit raises TypeError.

    A plan whose outputs bind its inputs (a training step saved with ``TrainingPlan.save``) has
    :attr:`bound`, and ``send(worker, state=...)`` stores that state on the worker and returns a
    :class:`~planwire.transport.bound.BoundPointer` that steps it there.
    """

    def __init__(
        self,
        data: bytes,
        *,
        name: str | None = None,
        default_name: str = "plan",
    ) -> None:
        meta = summary.read_model(data).metadata
        try:
            session = runtime.make_session(data)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(f"onnxruntime cannot load it: {e}") from e
        info = metadata.read_session(session, meta, default_name=default_name)
        self.name = name or info.name
        self.kind = info.kind
        self.state_names = info.state
        variant = PlanVariant(data, info.inputs, info.outputs)
        self._variants = [variant]
        self._sessions: dict[str, ort.InferenceSession] = {variant.id: session}
        self.bound = BoundPlan.from_metadata(variant, meta, name=self.name) if BoundPlan.declared(meta) else None

    def send(self, worker: Any, *, state: Mapping[str, Any] | None = None) -> Any:
        """Register the plan on ``worker``: its PointerPlan, or for a bound plan (a training step) a
        BoundPointer holding ``state`` there (parameters and buffers by input name or module path, e.g.
        a ``state_dict``; optimizer state not given starts at zeros)."""
        if self.bound is None:
            if state is not None:
                raise TypeError(f"plan {self.name!r} keeps no state between calls (no output binds an input)")
            return super().send(worker)
        if state is None:
            names = [s.name for s in self.bound.state if s.role != "optim"]
            raise TypeError(
                f"plan {self.name!r} is a {self.kind} plan whose state lives on the worker: "
                f"send(worker, state={{...}}) with its initial values ({', '.join(names[:4])}"
                f"{', ...' if len(names) > 4 else ''})"
            )
        return BoundPointer(self.bound, worker, state)


def load_plan(source: str | os.PathLike[str] | bytes, *, name: str | None = None) -> LoadedPlan:
    """A plan from a .onnx path or its bytes, checked like a worker checks a received plan.

    ValueError when the bytes are not a safe, self-contained ONNX model (external data, custom domains)
    or onnxruntime cannot load them.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data, default = bytes(source), "plan"
    else:
        path = Path(source)
        data, default = path.read_bytes(), path.stem
    try:
        check_model(data, max_bytes=MAX_PLAN_BYTES)
        return LoadedPlan(data, name=name, default_name=default)
    except (PlanRejected, ValueError) as e:
        where = f" {source}" if not isinstance(source, bytes | bytearray | memoryview) else ""
        raise ValueError(f"not a loadable plan{where}: {e}") from e
