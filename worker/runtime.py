"""Running plans: one onnxruntime session per plan (an :class:`OrtPlan`), created once and reused for every call.

``OrtPlan`` places a plan on its ``Device`` (worker/device.py) honestly (wholly on CUDA with CPU fallback
disabled when it can, else naming the nodes that fell back to CPU) and runs it either on numpy arrays or, in
the sandboxed runner, by IOBinding on ``OrtValue``s that stay on the device between runs (worker/devstore.py).
A plan's :class:`Signature` (its typed inputs and outputs, and the per-call argument check) is plain data, so
the supervisor checks arguments without a session.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from planwire.transport import dtypes
from planwire.transport.errors import ProtocolError
from planwire.transport.ortoptions import session_options
from planwire.worker.device import CPU, CUDA, Device
from planwire.worker.nchwc import at_this_block

_FALLBACK_KEY = "session.disable_cpu_ep_fallback"
_ASSIGNMENT_KEY = "session.record_ep_graph_assignment_info"
_SHRINK = ort.RunOptions()  # a run whose session's CPU arena gives back, as it ends, the memory not in use
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


class Signature:
    """A plan's signature: its typed inputs and outputs, and the per-call argument check. Plain data (name, wire
    dtype, shape with ``str``/``None`` for dynamic axes), so the supervisor checks arguments without a session.
    (On the wire each input or output is a ``Port`` of plan_info; on the exporter side a ``TensorSpec``.)"""

    def __init__(
        self, name: str, inputs: list, outputs: list, *, placement: str = "", nchwc: tuple[int, int] = (0, 0)
    ) -> None:
        self.name = name
        self.placement = placement  # where its nodes run, when not wholly on the worker's device
        self.nchwc = nchwc  # (Convs run as onnxruntime's NCHWc kernels, their channel block): worker/nchwc.py
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


class OrtPlan(Signature):
    """A loaded plan: typed ports and a reusable onnxruntime session on ``device``.

    On CUDA the session is first created with CPU fallback disabled (every node on the GPU, or a loud
    failure); a plan with nodes CUDA cannot run is created again with fallback, and ``fallback`` names
    those nodes (reported at registration and in the log). On CPU with ``nchwc`` its eligible Convs run as
    onnxruntime's NCHWc kernels (worker/nchwc.py; the plan as sent when onnxruntime cannot load the rewrite)."""

    def __init__(
        self,
        data: bytes,
        *,
        name: str = "",
        providers: Sequence[str] = (CPU,),
        threads: int = 1,
        arena: bool = True,
        device: Device | None = None,
        nchwc: bool = False,
    ) -> None:
        self.device = device if device is not None else Device("cuda" if CUDA in providers else "cpu")
        self.arena = arena and not self.device.cuda  # a CPU arena whose memory a run may give back (run_bound)
        self.fallback: list[str] = []  # "op (node)" of each node placed on CPU although the device is CUDA
        rewritten = (0, 0)
        try:
            self.session, rewritten = self._create(data, threads, arena, nchwc)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            if is_out_of_memory(e):
                raise ProtocolError("out_of_memory", f"plan {name!r} needs more memory to load: {e}") from None
            raise ProtocolError(
                "bad_plan", f"onnxruntime cannot load plan {name or ''}: {e}".replace("  ", " ")
            ) from None
        if self.device.cuda and CUDA not in self.session.get_providers():
            raise ProtocolError(
                "bad_plan", f"plan {name!r} could not be placed on CUDA (got {self.session.get_providers()})"
            )
        super().__init__(
            name,
            [(i.name, dtypes.from_ort(i.type), list(i.shape)) for i in self.session.get_inputs()],
            [(o.name, dtypes.from_ort(o.type), list(o.shape)) for o in self.session.get_outputs()],
            placement=self._where() if self.fallback else "",
            nchwc=rewritten,
        )
        # On CPU the binding's own run: InferenceSession.run adds only input validation that check() has
        # done (with CUDA, its provider fallback stays in charge).
        self._input_names = [n for n, _, _ in self.inputs]
        self._output_names = [n for n, _, _ in self.outputs]
        binding = getattr(self.session, "_sess", None)
        self._run = binding.run if binding is not None and self.session.get_providers() == [CPU] else None
        self._binding = None  # IOBinding (C object) for run_bound, made at its first call
        self._out_device = None

    def _create(
        self, data: bytes, threads: int, arena: bool, nchwc: bool
    ) -> tuple[ort.InferenceSession, tuple[int, int]]:
        device = self.device
        if not device.cuda:
            options = session_options(threads, arena=arena)
            if nchwc:
                with contextlib.suppress(Exception):  # a rewrite onnxruntime cannot load: the plan as sent
                    rewritten, count, block = at_this_block(data)
                    if count:
                        return ort.InferenceSession(rewritten, options, providers=[CPU]), (count, block)
            return ort.InferenceSession(data, options, providers=[CPU]), (0, 0)
        strict = session_options(threads, arena=arena)
        strict.add_session_config_entry(_FALLBACK_KEY, "1")
        try:
            return ort.InferenceSession(data, strict, providers=device.session_providers(cpu_fallback=False)), (0, 0)
        except Exception:  # some node has no CUDA kernel (or the plan is bad: the second try says which)
            pass
        loose = session_options(threads, arena=arena)
        loose.add_session_config_entry(_ASSIGNMENT_KEY, "1")
        session = ort.InferenceSession(data, loose, providers=device.session_providers())
        self.fallback = cpu_nodes(session) or ["(nodes not reported by this onnxruntime)"]
        return session, (0, 0)

    def _where(self) -> str:
        """Where a plan with CPU nodes runs, in words: ``cuda:0 with N nodes on CPU (ops)``."""
        ops = Counter(n.split(" ", 1)[0] for n in self.fallback)
        listed = ", ".join(f"{op}×{k}" if k > 1 else op for op, k in ops.most_common(8))
        return f"{self.device} with {len(self.fallback)} nodes on CPU ({listed})"

    def run(self, args: Sequence[np.ndarray], *, check: bool = True) -> list[np.ndarray]:
        """Outputs of the plan on ``args`` (``check=False``: the caller has just called ``check``)."""
        if check:
            self.check(args)
        feeds = dict(zip(self._input_names, args, strict=True))
        if self._run is not None:
            return self._run(self._output_names, feeds, None)
        return self.session.run(None, feeds)

    def run_bound(
        self, values: Sequence, outputs: Sequence | None = None, *, shrink: bool = False, addresses: Sequence[int] = ()
    ) -> list:
        """Run on OrtValues (onnxruntime's C values) by IOBinding and return the output OrtValues, which stay
        on the session's device: nothing crosses to the host. ``outputs[i]``, where given, is a buffer of the
        right dtype and shape that output ``i`` is written into (a training step's previous state); with
        ``addresses[i]``, its data address, an output written there is returned as that buffer itself (see
        ``own_values``). ``shrink`` (a session with ``arena``): its CPU arena gives back, as the run ends, the
        memory not in use (else it keeps it for the next run; onnxruntime never gives back the arena's first
        region)."""
        ib = self._binding
        if ib is None:
            ib = self._binding = self.session.io_binding()._iobinding
            self._out_device = ort_device(self.device)
        for name, value in zip(self._input_names, values, strict=True):
            ib.bind_ortvalue_input(name, value)
        ib.clear_binding_outputs()
        for i, name in enumerate(self._output_names):
            buf = outputs[i] if outputs is not None else None
            if buf is None:
                ib.bind_output(name, self._out_device)
            else:
                ib.bind_ortvalue_output(name, buf)
        try:
            self.session._sess.run_with_iobinding(ib, _SHRINK if shrink and self.arena else None)
            bound = (outputs, addresses) if outputs is not None and addresses else None
            return own_values(ib.get_outputs(), len(self._output_names), bound)
        finally:
            ib.clear_binding_inputs()  # the binding must not keep freed inputs alive
            ib.clear_binding_outputs()


def ort_device(device: Device):  # noqa: ANN201  (onnxruntime's C OrtDevice)
    """onnxruntime's C device object for ``device`` (IOBinding outputs)."""
    make = getattr(ort, "OrtDevice", None)
    if make is not None and hasattr(make, "make"):
        return make.make(device.ort_name, device.id)._get_c_device()
    from onnxruntime.capi import _pybind_state as C  # older onnxruntime

    kind = C.OrtDevice.cuda() if device.cuda else C.OrtDevice.cpu()
    return C.OrtDevice(kind, C.OrtDevice.default_memory(), device.id)


def own_values(vector: object, n: int, bound: tuple[Sequence, Sequence[int]] | None = None) -> list:
    """The ``n`` OrtValues of an onnxruntime OrtValueVector, each in a vector of its own: an element of
    the vector a binding returns is valid only while that vector lives (iterating it gives dangling ones),
    and a value of its own is freed alone when the Store drops it. ``bound``: (buffers, their data
    addresses) the outputs were bound to (None, 0 where not): an output at its buffer's address is that
    buffer (the caller holds it, so no other tensor can be at that address), returned as is: one address
    read instead of a new vector per output (a training step's ~90 state tensors)."""
    from onnxruntime.capi import _pybind_state as C

    out = []
    buffers, addresses = bound if bound is not None else ((), ())
    for i in range(n):
        ptr = addresses[i] if addresses else 0
        if ptr and vector[i].data_ptr() == ptr:  # type: ignore[index]
            out.append(buffers[i])
            continue
        box = C.OrtValueVector()
        box.push_back(vector[i])  # type: ignore[index]  # a reference-counted copy, not of the data
        out.append(box[0])  # keeps its box alive
    return out


def cpu_nodes(session: ort.InferenceSession) -> list[str]:
    """``op (node name)`` of each node onnxruntime placed on the CPU provider (empty when it cannot say)."""
    info = getattr(session, "get_provider_graph_assignment_info", None)
    if info is None:
        return []
    out = []
    with contextlib.suppress(Exception):
        for sub in info():
            if sub.ep_name == CPU:
                out += [f"{n.op_type} ({n.name})" if n.name else n.op_type for n in sub.get_nodes()]
    return out


def is_out_of_memory(e: BaseException) -> bool:
    """Whether an exception from onnxruntime or numpy means an allocation failed (e.g. at the rlimit)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return any(
        words in text
        for words in (
            "bad_alloc",
            "Failed to allocate",
            "Cannot allocate memory",
            "is smaller than requested bytes",  # a CUDA arena at its --gpu-mem-limit
            "CUDA failure 2: out of memory",
            "CUDA_ERROR_OUT_OF_MEMORY",
        )
    )


def _static(shape: list) -> tuple[int, ...] | None:
    return tuple(shape) if all(isinstance(d, int) for d in shape) else None


def _fixed_axes(shape: list) -> tuple[tuple[int, int], ...]:
    return tuple((axis, d) for axis, d in enumerate(shape) if isinstance(d, int))
