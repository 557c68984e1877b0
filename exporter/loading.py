"""Plans read back from .onnx files or bytes: sendable and runnable, but never rebuilt."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from planwire.exporter import metadata
from planwire.exporter.base import PlanRunner
from planwire.transport.spec import PlanVariant
from planwire.worker.modelcheck import PlanRejected, check_model

MAX_PLAN_BYTES = 2**31 - 1  # protobuf's limit


class LoadedPlan(PlanRunner):
    """A plan from ONNX bytes: one fixed variant; a call that does not fit raises TypeError."""

    def __init__(self, data: bytes, *, name: str | None = None, default_name: str = "plan") -> None:
        info = metadata.read(onnx.load_from_string(data), default_name=default_name)
        self.name = name or info.name
        self.kind = info.kind
        self.state_names = info.state
        self._variants = [PlanVariant(data, info.inputs, info.outputs)]
        self._sessions: dict[str, ort.InferenceSession] = {}


def load_plan(source: str | os.PathLike[str] | bytes, *, name: str | None = None) -> LoadedPlan:
    """A plan from a .onnx path or its bytes, checked like a worker checks a received plan.

    ValueError when the bytes are not a safe, self-contained ONNX model (external data, custom domains).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data, default = bytes(source), "plan"
    else:
        path = Path(source)
        data, default = path.read_bytes(), path.stem
    try:
        check_model(data, max_bytes=MAX_PLAN_BYTES)
    except PlanRejected as e:
        raise ValueError(f"not a loadable plan: {e}") from e
    return LoadedPlan(data, name=name, default_name=default)
