"""The one error a plan build raises, whatever stage failed, and how to read an exporter's error chain."""

from __future__ import annotations

from collections.abc import Iterator


class PlanBuildError(RuntimeError):
    """A plan could not be exported to ONNX, or its graph does not compute what eager torch computes.

    ``plan`` names the plan and ``op`` the operator that failed when it could be found; the original
    exception is chained as ``__cause__`` so nothing from the exporter is lost.
    """

    def __init__(self, message: str, *, plan: str, op: str | None = None) -> None:
        super().__init__(message)
        self.plan = plan
        self.op = op


class TrainingExportError(PlanBuildError):
    """A training or gradient plan could not be built; ``op`` and ``module`` name the culprit if known."""

    def __init__(self, message: str, *, plan: str, op: str | None = None, module: str | None = None) -> None:
        super().__init__(message, plan=plan, op=op)
        self.module = module


class FixedShapeWarning(UserWarning):
    """A plan was built without dynamic axes: its graph accepts only the example's sizes."""


class TrainingModeWarning(UserWarning):
    """A plan was built from layers in training mode (BatchNorm, Dropout): it computes what they compute
    in training mode on each call, but updates no running statistics."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts, outermost first, each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, stripped."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception of the chain: what actually went wrong, without
    the exporter's advice around it."""
    root = list(chain(exc))[-1]
    return f"{type(root).__name__}: {first_line(root)}"
