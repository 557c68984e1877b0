"""Running plans: one onnxruntime session per plan (an :class:`OrtPlan`), created once and reused for every call."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from planwire.transport import dtypes
from planwire.transport.errors import ProtocolError
from planwire.transport.ortoptions import session_options

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for ``cpu``, ``cuda`` or ``auto``; RuntimeError lists what is available."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                f"--device cuda: onnxruntime has no CUDA provider here (available: {', '.join(available)}); "
                "install onnxruntime-gpu with a matching CUDA, or use --device cpu"
            )
        return [CUDA, CPU]
    raise ValueError(f"unknown device {device!r}: use cpu, cuda or auto")


class Ports:
    """A plan's typed inputs and outputs, and the per-call argument check. Plain data (name, wire dtype,
    shape with ``str``/``None`` for dynamic axes), so the supervisor checks arguments without a session."""

    def __init__(self, name: str, inputs: list, outputs: list) -> None:
        self.name = name
        self.inputs = [(n, t, list(s)) for n, t, s in inputs]
        self.outputs = [(n, t, list(s)) for n, t, s in outputs]
        self._dtypes = []
        for n, t, _ in self.inputs:
            try:
                self._dtypes.append(dtypes.to_numpy(t))
            except ValueError as e:
                raise ProtocolError("bad_plan", f"plan {name!r} input {n!r}: {e}") from None
        for n, t, _ in self.outputs:
            if t not in dtypes.WIRE_TO_NUMPY:
                raise ProtocolError(
                    "bad_plan", f"plan {name!r} output {n!r} has type {t!r}; supported: {dtypes.human_list()}"
                )
        # Per-call fast path: (dtype, static shape or None, rank, fixed axes) of each input for check().
        self._fast = [
            (dt, _static(s), len(s), _fixed_axes(s)) for dt, (_, _, s) in zip(self._dtypes, self.inputs, strict=True)
        ]

    def check(self, args: Sequence[np.ndarray]) -> None:
        """ProtocolError(bad_argument) naming the first argument that does not fit the graph."""
        if len(args) == len(self._fast):
            for arr, (dt, static, rank, fixed) in zip(args, self._fast, strict=True):
                if arr.dtype != dt:
                    break
                shape = arr.shape
                if static is not None:
                    if shape != static:
                        break
                elif len(shape) != rank or any(shape[a] != d for a, d in fixed):
                    break
            else:
                return
        self._explain(args)

    def _explain(self, args: Sequence[np.ndarray]) -> None:
        if len(args) != len(self.inputs):
            raise ProtocolError(
                "bad_argument", f"plan {self.name!r} takes {len(self.inputs)} arguments, got {len(args)}"
            )
        for i, (arr, dt, (name, wire, shape)) in enumerate(zip(args, self._dtypes, self.inputs, strict=True)):
            if arr.dtype != dt:
                raise ProtocolError(
                    "bad_argument",
                    f"plan {self.name!r} argument {i} ({name!r}): expected dtype {dtypes.human(wire)}, got {arr.dtype}",
                )
            if len(shape) != arr.ndim or any(
                isinstance(w, int) and w != g for w, g in zip(shape, arr.shape, strict=True)
            ):
                want = "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"
                raise ProtocolError(
                    "bad_argument",
                    f"plan {self.name!r} argument {i} ({name!r}): expected shape {want}, got {list(arr.shape)}",
                )


class OrtPlan(Ports):
    """A loaded plan: typed ports and a reusable onnxruntime session (``.session``)."""

    def __init__(
        self, data: bytes, *, name: str = "", providers: Sequence[str] = (CPU,), threads: int = 1, arena: bool = True
    ) -> None:
        try:
            self.session = ort.InferenceSession(data, session_options(threads, arena=arena), providers=list(providers))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            if is_out_of_memory(e):
                raise ProtocolError("out_of_memory", f"plan {name!r} needs more memory to load: {e}") from None
            raise ProtocolError(
                "bad_plan", f"onnxruntime cannot load plan {name or ''}: {e}".replace("  ", " ")
            ) from None
        if CUDA in providers and CUDA not in self.session.get_providers():
            raise ProtocolError(
                "bad_plan", f"plan {name!r} could not be placed on CUDA (got {self.session.get_providers()})"
            )
        super().__init__(
            name,
            [(i.name, dtypes.from_ort(i.type), list(i.shape)) for i in self.session.get_inputs()],
            [(o.name, dtypes.from_ort(o.type), list(o.shape)) for o in self.session.get_outputs()],
        )
        # On CPU the binding's own run: InferenceSession.run adds only input validation that check() has
        # done (with CUDA, its provider fallback stays in charge).
        self._input_names = [n for n, _, _ in self.inputs]
        self._output_names = [n for n, _, _ in self.outputs]
        binding = getattr(self.session, "_sess", None)
        self._run = binding.run if binding is not None and self.session.get_providers() == [CPU] else None

    def run(self, args: Sequence[np.ndarray], *, check: bool = True) -> list[np.ndarray]:
        """Outputs of the plan on ``args`` (``check=False``: the caller has just called ``check``)."""
        if check:
            self.check(args)
        feeds = dict(zip(self._input_names, args, strict=True))
        if self._run is not None:
            return self._run(self._output_names, feeds, None)
        return self.session.run(None, feeds)


PlanSession = OrtPlan  # the name before "session" came to mean only the worker incarnation


def is_out_of_memory(e: BaseException) -> bool:
    """Whether an exception from onnxruntime or numpy means an allocation failed (e.g. at the rlimit)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return "bad_alloc" in text or "Failed to allocate" in text or "Cannot allocate memory" in text


def _static(shape: list) -> tuple[int, ...] | None:
    return tuple(shape) if all(isinstance(d, int) for d in shape) else None


def _fixed_axes(shape: list) -> tuple[tuple[int, int], ...]:
    return tuple((axis, d) for axis, d in enumerate(shape) if isinstance(d, int))
