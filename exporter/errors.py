"""The one error a plan build raises, whatever stage failed."""

from __future__ import annotations


class PlanBuildError(RuntimeError):
    """A plan could not be exported to ONNX, or its graph does not compute what eager torch computes.

    ``plan`` names the plan and ``op`` the operator that failed when it could be found; the original
    exception is chained as ``__cause__`` so nothing from the exporter is lost.
    """

    def __init__(self, message: str, *, plan: str, op: str | None = None) -> None:
        super().__init__(message)
        self.plan = plan
        self.op = op


class FixedShapeWarning(UserWarning):
    """A plan was built without dynamic axes: its graph accepts only the example's sizes."""
