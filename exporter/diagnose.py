"""Export failures told in the user's terms: the line of their code, the layer, the op, and the fix.

torch's exporter reports a failure from deep inside itself (a 50-frame trace, advice about torch.export
internals, graph dumps on stderr). The facts a user needs are in there: the node being translated (with
its module path and the stack trace of the code that made it) or the guard that hit a data-dependent
value (with the user's frame in its traceback). This module digs them out; callers raise a short
:class:`PlanBuildError` and chain the exporter's exception as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import sys
import sysconfig
import threading
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from planwire.exporter.errors import chain

DATA_DEPENDENT_FIX = (
    "a plan is one fixed graph, so Python cannot branch on a tensor's values (if/while on a tensor, "
    ".item(), bool(), int()) while it is exported.\n"
    "  fix: compute both branches and select with torch.where(cond, a, b), or use "
    "torch.cond(pred, true_fn, false_fn, (x,))."
)
UNSUPPORTED_FIX = (
    "  fix: compute this with other torch ops, or register an ONNX translation for the op "
    "(torch.onnx.export's custom_translation_table)."
)
CAUSE_NOTE = "The exporter's full error is chained as __cause__."

# Top-level packages whose frames are never "the user's code".
_LIBRARIES = frozenset({"torch", "planwire", "onnx", "onnxscript", "onnx_ir", "sympy", "functorch", "onnxruntime"})
_LIBRARY_DIRS = tuple(
    {
        os.path.realpath(p) + os.sep
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_path(key))
    }
)


def _planwire_dirs() -> tuple[str, ...]:
    """planwire's own package folders, wherever the install put them (a checkout, editable or wheel)."""
    dirs = set()
    for name in ("planwire", "planwire.exporter", "planwire.transport", "planwire.worker"):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            for location in (spec.submodule_search_locations or []) if spec else []:
                dirs.add(os.path.realpath(location) + os.sep)
    return tuple(dirs)


_PLANWIRE_DIRS = _planwire_dirs()
_STACK_LINE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)$')


def is_data_dependent(exc: BaseException) -> bool:
    """Whether tracing failed because code branched on (or read) a tensor's value."""
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    except ImportError:  # pragma: no cover - another torch
        GuardOnDataDependentSymNode = ()  # type: ignore[assignment,misc]  # noqa: N806
    return any(isinstance(e, GuardOnDataDependentSymNode) or "data-dependent expression" in str(e) for e in chain(exc))


def _is_user_file(filename: str, module: str | None = None) -> bool:
    if module is not None and module.partition(".")[0] in _LIBRARIES:
        return False
    if filename.startswith("<"):
        return filename in ("<string>", "<stdin>")
    path = os.path.realpath(filename)
    if any(path.startswith(d) for d in (*_LIBRARY_DIRS, *_PLANWIRE_DIRS)):
        return False
    parts = path.split(os.sep)
    return not any(lib in parts for lib in _LIBRARIES) and "__editable__" not in path


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of user code in the tracebacks of ``exc``'s chain (innermost exception first)."""
    for e in reversed(list(chain(exc))):
        found = None
        tb: TracebackType | None = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if _is_user_file(frame.f_code.co_filename, frame.f_globals.get("__name__")):
                found = tb
            tb = tb.tb_next
        if found is not None:
            return traceback.extract_tb(found, limit=1)[0]
    return None


def where(filename: str, line: int | None, code: str | None = None) -> str:
    """``file:line: code`` with the path relative to the working directory when below it."""
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(filename)
        if not rel.startswith(".."):
            filename = rel
    at = f"{filename}:{line}" if line else filename
    code = (code or "").strip()
    return f"{at}: {code}" if code else at


def failed_node(exc: BaseException) -> Any | None:
    """The FX node the ONNX translator was working on when it failed (from its frames), if any."""
    try:
        from torch.fx import Node
    except ImportError:  # pragma: no cover
        return None
    for e in chain(exc):
        tb: TracebackType | None = e.__traceback__
        while tb is not None:
            node = tb.tb_frame.f_locals.get("node")
            if isinstance(node, Node):
                return node
            tb = tb.tb_next
    return None


def node_layer(node: Any) -> str | None:
    """``path (Class)`` of the innermost module (below the plan itself) whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, kind in reversed(list(stack.values())):
        if path:
            name = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
            return f"{path} ({name})"
    return None


def node_source(node: Any) -> str | None:
    """``file:line: code`` of the innermost user frame in the stack trace the exporter kept for ``node``."""
    lines = (node.meta.get("stack_trace") or "").splitlines()
    best = None
    for i, text in enumerate(lines):
        match = _STACK_LINE.match(text)
        if match and _is_user_file(match["file"]):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not _STACK_LINE.match(lines[i + 1]) else None
            best = where(match["file"], int(match["line"]), code)
    return best


def locate_op(fn: Any, args: Any, op: str) -> str | None:
    """``file:line: code`` of the user's line where running ``fn(*args)`` eagerly first dispatches ``op``
    (``aten.foo.default``): where an op came from when the exporter's node kept no user frame."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not found and str(func) == op:
                frame = sys._getframe(1)
                while frame is not None:
                    code = frame.f_code
                    if _is_user_file(code.co_filename, frame.f_globals.get("__name__")):
                        line = traceback.FrameSummary(code.co_filename, frame.f_lineno, code.co_name).line
                        found.append(where(code.co_filename, frame.f_lineno, line))
                        break
                    frame = frame.f_back  # type: ignore[assignment]
            return func(*args, **(kwargs or {}))

    with contextlib.suppress(Exception), torch.no_grad(), Spy():
        fn(*args)
    return found[0] if found else None


def data_dependent_message(plan: str, exc: BaseException, *, what: str = "could not be exported to ONNX") -> str:
    """The short explanation of a data-dependent branch, naming the user's line."""
    frame = user_frame(exc)
    at = f" at {where(frame.filename, frame.lineno, frame.line)}" if frame else ""
    return f"plan {plan!r} {what}: data-dependent control flow{at}\n  {DATA_DEPENDENT_FIX}\n{CAUSE_NOTE}"


def unsupported_op_message(plan: str, op: str, exc: BaseException, *, rerun: Any = None) -> str:
    """The short explanation of an op without ONNX translation: op, layer, line, fix. ``rerun``, a
    ``(fn, args)`` pair, finds the line by running the code eagerly when the exporter kept none."""
    node = failed_node(exc)
    layer = node_layer(node) if node is not None else None
    source = node_source(node) if node is not None else None
    if source is None and rerun is not None:
        source = locate_op(rerun[0], rerun[1], op)
    found = [f"in layer {layer}" if layer else "", f"at {source}" if source else ""]
    detail = ", ".join(f for f in found if f)
    return (
        f"plan {plan!r} could not be exported to ONNX at op {op}: it has no ONNX translation"
        + (f"\n  {detail}" if detail else "")
        + f"\n{UNSUPPORTED_FIX}\n{CAUSE_NOTE}"
    )


class _QuietFilter(logging.Filter):
    """Drops the exporter's own warnings (guard and symbol chatter) while a plan is exported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _ThreadStderr(io.TextIOBase):
    """stderr that swallows what one thread writes (torch prints partial graphs there) and passes the
    rest through, so other threads (a progress bar, the user's own) are not silenced."""

    def __init__(self, target: Any, owner: int) -> None:
        self.target, self.owner = target, owner

    def write(self, s: str) -> int:
        if threading.get_ident() == self.owner:
            return len(s)
        return self.target.write(s)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.target, "isatty", lambda: False)())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


_QUIET_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Within this block, this thread's stderr writes and torch's export warnings are dropped.

    The exporter's failures are raised as exceptions (and explained by the callers); what it prints on
    the way is a duplicate of them. Callers hold the export lock.
    """
    quiet = _QuietFilter()
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    saved = sys.stderr
    wrapper = sys.stderr = _ThreadStderr(saved, threading.get_ident())
    try:
        yield
    finally:
        if sys.stderr is wrapper:
            sys.stderr = saved
        for logger in loggers:
            logger.removeFilter(quiet)
