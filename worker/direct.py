"""The direct lane: tiny runs of provably harmless plans, executed by the supervisor itself.

Every run crosses to the sandboxed runner (worker/sandbox.py) so that a plan that crashes, loops or
allocates without bound costs that run only. For a tiny call that hop is most of the cost (a round trip
through a second process and its wake-up). The issue's rule is "static checks refuse what is knowable up
front; containment catches the rest": a run that static checks PROVE cannot crash, loop or allocate much
needs no sandbox. Such a run is executed here, in the supervisor's own onnxruntime session, when both hold:

1. **The plan is direct-safe** (:func:`direct_safe`, decided once per plan from its bytes alone,
   transport/graph.py): every node is in the default ONNX domain and its op in :data:`SAFE_OPS`; every
   input, output, initializer, declared value and constant is a float tensor (:data:`FLOATS`); no local
   functions, no subgraph attributes; at most :data:`MAX_NODES` nodes.
2. **The call is small** (:meth:`DirectLane.small`, decided once per plan and argument shapes): the shape
   of every value of the graph is inferred by rule from the arguments' shapes (transport/shapes.py, never
   a shape the plan merely declares; shapes that do not fit an op, :func:`op_fits`, make no call small),
   all of them together (initializers, arguments, every node's output) take at most ``max_bytes``, and
   transport/estimate.py counts at most :data:`MAX_FLOPS` FLOPs.

The Node.js worker's lane (worker/node/src/direct.js) decides the same for every plan and call: both are
checked against one table of cases, tests/direct_cases.json.

Why that is enough: float arithmetic does not trap (division by zero gives inf, the log of a negative NaN);
none of these ops allocates by data (no op takes a size, a count or a shape from a tensor's values), has a
loop, a branch or a call; so the work and the memory of a run are what its shapes say, bounded above, and
the session's creation folds nothing bigger than the values counted (it is created at the first small
call, after the runner loaded the same bytes at registration). What is excluded, and why:

* integer tensors anywhere: integer ``Div``/``Mod`` of INT_MIN by -1 (or by 0) raises SIGFPE in
  onnxruntime's kernel, which no handler survives; integers also carry shapes and counts;
* ``Reshape``, ``Expand``, ``Tile``, ``ConstantOfShape``, ``Range``, ``Resize``, ``Pad``, ``Slice``,
  ``Gather``, ``Cast``, ``Shape``, ...: their output size or the memory they read comes from tensor
  values (a 132-byte plan can ask for gigabytes);
* ``Loop``, ``If``, ``Scan`` and any subgraph: unbounded trip counts; local functions: nested calls that
  onnxruntime directs exponentially at load;
* other domains (``ai.onnx.ml``, ``com.microsoft``, custom ops): kernels this rule knows nothing of.

Everything else about the run is the sandboxed path's: the Service validates it first (ownership, quotas,
private data and the owner's release policy) and completes it from this lane's results exactly as from the
runner's (worker/supervisor.py), and a run this lane cannot take, or that fails here, goes to the sandbox.
Only CPU workers use the lane (a CUDA worker's plans run on its device).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from planwire.transport.estimate import estimate
from planwire.transport.graph import ELEM_TYPES, Graph, Node, Tensor, read_graph
from planwire.transport.shapes import Info, infer, names, sane
from planwire.worker.jobs import Plan, RunJob
from planwire.worker.resident import Resident

log = logging.getLogger("planwire.worker")

SAFE_OPS = names(
    "Add Sub Mul Div Neg Abs Relu Sigmoid Tanh Exp Log Sqrt Reciprocal Max Min MatMul Gemm Transpose "
    "Identity Softmax LogSoftmax Erf Constant"
)
"""Float ops of the default domain whose output size is set by their inputs' shapes alone (``Constant``:
only with a float ``value`` tensor, counted with the rest)."""
FLOATS = frozenset({1, 11})  # float32, float64 (TensorProto element types); not float16: onnxruntime's CPU
# kernels compute most float16 ops through float32 copies it inserts, memory the bytes rule would not count
ATTRIBUTES = {
    "Gemm": frozenset({"alpha", "beta", "transA", "transB"}),
    "Transpose": frozenset({"perm"}),
    "Softmax": frozenset({"axis"}),
    "LogSoftmax": frozenset({"axis"}),
    "Constant": frozenset({"value"}),
}
"""The attributes a node of each op may have (none for ops not named): the shape rules read these and no others."""
MAX_NODES = 64
MAX_FLOPS = 2_000_000
"""FLOPs of one direct run at most (transport/estimate.py's count): well under a millisecond on one core."""
DEFAULT_MAX_MB = 8.0
"""Bytes of all values of one direct run together (``plan-worker --direct-max-mb``), in MiB."""
_CACHE = 4096  # (plan, shapes) decisions kept per plan
_BOUND = 16  # signatures per plan run by IOBinding at most (the others by the session's run)
_BOUND_BYTES = 64 << 10  # arguments (and results) of a signature run by IOBinding take at most this many bytes
# signatures run by IOBinding in the whole lane: a binding holds its last arguments (onnxruntime keeps a bound
# array alive, a deleted tensor's too, until that signature's next call) and its output buffers, outside the
# clients' quotas: at most _LANE_BOUND * 2 * _BOUND_BYTES (8 MiB) in all
_LANE_BOUND = 64


def direct_safe(g: Graph, max_bytes: int) -> str:
    """Why a plan's graph may not run direct ("" when it may): the module's rule 1."""
    if g.functions:
        return "it defines local functions"
    if g.unread:
        return f"it has {', '.join(sorted(g.unread))}"
    if len(g.nodes) > MAX_NODES:
        return f"it has {len(g.nodes)} nodes (over {MAX_NODES})"
    for node in g.nodes:
        if node.domain or node.op not in SAFE_OPS:
            return f"op {node.domain + '::' if node.domain else ''}{node.op} is not in the direct allowlist"
        if node.subgraphs:
            return f"node {node.op} has a subgraph"
        known = ATTRIBUTES.get(node.op, frozenset())
        if not set(node.attrs) <= known:
            return f"node {node.op} has attributes {sorted(node.attrs)} (the rule reads {sorted(known)})"
        if len(node.outputs) != 1:
            return f"node {node.op} has {len(node.outputs)} outputs"
        if node.op == "Constant":
            value = node.attrs.get("value")
            if node.inputs or not isinstance(value, Tensor) or value.elem not in FLOATS:
                return "a Constant that is not a float tensor without inputs"
    for kind, values in (("input", g.inputs), ("output", g.outputs), ("declared value", g.declared)):
        for name, vt in values.items():
            if vt.elem not in FLOATS:
                return f"{kind} {name!r} is not a float tensor"
    total = 0
    for name, t in g.initializers.items():
        if t.elem not in FLOATS:
            return f"initializer {name!r} is not a float tensor"
        total += math.prod(t.dims) * ELEM_TYPES[t.elem][1]
    if total > max_bytes:
        return f"its initializers take {total} bytes (over {max_bytes})"
    return ""


def value_bytes(g: Graph, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Bytes of every value of ``g`` on arguments of ``shapes`` together (initializers, constants, arguments,
    every node's output), each shape inferred by rule; None when one cannot be (the rule's size is unknown)."""
    info: dict[str, Info] = {n: Info(t.elem, t.dims, t.values) for n, t in g.initializers.items()}
    for name, vt in g.inputs.items():
        info[name] = Info(vt.elem, shapes[name])
    total = sum(math.prod(i.shape) * ELEM_TYPES[i.elem][1] for i in info.values())  # type: ignore[arg-type]
    for node in g.nodes:
        ins = [info.get(n) if n else None for n in node.inputs]
        if any(n and i is None for n, i in zip(node.inputs, ins, strict=True)):
            return None
        if node.op == "MatMul" and any(i is None or i.shape is None or len(i.shape) > 2 for i in ins):
            return None  # batched: onnxruntime's per-matrix work and offsets are not in the bytes or FLOPs counted
        if not op_fits(node, [i.shape if i is not None else None for i in ins]):
            return None
        try:
            outs = infer(node, ins, g.functions)
        except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError):
            return None
        if outs is None or len(outs) < len(node.outputs):
            return None
        for name, out in zip(node.outputs, outs, strict=False):
            out = sane(out)
            if out.shape is None or out.elem not in FLOATS:
                return None
            if name:
                info[name] = out
                total += math.prod(out.shape) * ELEM_TYPES[out.elem][1]
    if any(name not in info for name in g.outputs):
        return None
    return total


def op_fits(node: Node, shapes: list[tuple[int, ...] | None]) -> bool:
    """Whether inputs of ``shapes`` fit ``node`` where the shape rules (transport/shapes.py) do not check:
    Gemm's K and its C (broadcast one way to [M, N]), Transpose's ``perm`` (a permutation of the input's
    axes), (Log)Softmax's ``axis`` (one of the input's). onnxruntime refuses a run that does not fit: the
    rule gives it to the runner up front, which says so (worker/node/src/direct.js decides the same)."""
    op, at = node.op, node.attrs
    x = shapes[0] if shapes else None
    if op == "Gemm":
        if len(shapes) not in (2, 3):
            return False
        a, b, c = shapes[0], shapes[1], shapes[2] if len(shapes) == 3 else None
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return False
        m, k = (a[1], a[0]) if at.get("transA") else a
        k2, n = (b[1], b[0]) if at.get("transB") else b
        if k != k2:
            return False
        if c is None:
            return True
        return len(c) <= 2 and all(d in (1, want) for d, want in zip(c, (m, n)[2 - len(c) :], strict=True))
    if op == "Transpose" and at.get("perm") is not None:
        return x is not None and sorted(at["perm"]) == list(range(len(x)))
    if op in ("Softmax", "LogSoftmax") and at.get("axis") is not None:
        return x is not None and -len(x) <= at["axis"] < len(x)
    return True


@dataclass
class _Variant:
    """An direct-safe plan: its graph, its session once created, the decisions per argument shapes."""

    graph: Graph
    plan: Plan
    session: object = None  # worker/runtime.py OrtPlan, created at the first small call
    small: dict[tuple, bool] = field(default_factory=dict)
    ready: dict[tuple, bool] = field(default_factory=dict)  # (dtype, shape) of each argument -> prepared() admits it
    call: Callable[[list], list] | None = None  # the session's run with its port names bound (prepared())
    bound: dict[tuple, _Bound] = field(default_factory=dict)  # per signature admitted: its run by IOBinding


class _Bound:
    """A prepared run of one signature by IOBinding (onnxruntime's cheapest call here): each input stays bound
    to the memory of the argument array it was last given (no copy: a write to that array is seen, and the
    array is kept alive), rebound when another array comes (or at every run for one that is not C-contiguous,
    which onnxruntime copies); each output is written into a buffer of its known shape (the signature fixes it)
    and copied out, so every run returns arrays of its own, as ``run`` does."""

    __slots__ = ("_bind", "_binding", "_names", "_one", "_options", "_outs", "_run", "arrays", "reply")

    def __init__(self, session: object, names_in: list[str], names_out: list[str], results: list[np.ndarray]) -> None:
        import onnxruntime as ort  # loaded already: the session is onnxruntime's

        binding = session.io_binding()  # type: ignore[attr-defined]
        for name, r in zip(names_out, results, strict=True):
            binding.bind_output(name, "cpu", 0, r.dtype, list(r.shape), r.ctypes.data)
        self._outs = results  # the buffers: the first run's results, this binding's from now on
        self._one = results[0] if len(results) == 1 else None
        self._bind, self._binding = binding.bind_cpu_input, binding._iobinding
        self._run = session._sess.run_with_iobinding  # type: ignore[attr-defined]
        # default run options made once: given None, onnxruntime makes them at every run (measured ~1.2-1.7 us more)
        self._options = ort.RunOptions()
        self._names = names_in
        self.arrays: list[np.ndarray | None] = [None] * len(names_in)
        self.reply: object = None  # worker/tiny.py's form of this signature's replies, once it made one

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        bound = self.arrays
        for i, a in enumerate(arrays):
            if a is not bound[i]:
                self._bind(self._names[i], a)  # onnxruntime reads a C-contiguous array in place, copies any other
                bound[i] = a if a.flags.c_contiguous else None  # a copy is made again at every run
        self._run(self._binding, self._options)
        one = self._one
        if one is not None:
            return [one.copy()]
        return [o.copy() for o in self._outs]


class DirectLane:
    """Runs of direct-safe plans on small arguments, in this process (the module's docstring says which)."""

    def __init__(self, max_bytes: int = int(DEFAULT_MAX_MB * (1 << 20)), max_flops: int = MAX_FLOPS) -> None:
        self.max_bytes = max_bytes
        self.max_flops = max_flops
        self._variants: dict[str, _Variant | None] = {}  # plan id -> its variant, None: not direct-safe
        self.counts = {"direct_runs": 0, "direct_fallbacks": 0}

    def forget(self, pid: str) -> None:
        """Plan ``pid`` was unregistered: its session goes."""
        self._variants.pop(pid, None)

    def declines(self, pid: str) -> bool:
        """Whether plan ``pid`` is known not to be direct-safe: its runs go to the sandbox (a training step)."""
        return self._variants.get(pid, False) is None

    def run(self, job: RunJob) -> list[np.ndarray] | None:
        """The outputs of ``job`` computed here, or None: it goes to the sandbox (not direct-safe, not small,
        an argument held by the runner only, or onnxruntime refused it here)."""
        pid = job.msg.plan
        v = self._variants.get(pid, False)
        if v is False:
            if len(self._variants) >= _CACHE:  # plans unregistered by --idle-ttl are never forgotten otherwise
                self._variants.clear()
            v = self._variants[pid] = self._variant(job.plan)
        if v is None:
            return None
        args = []
        for a in job.args:
            if isinstance(a, Resident):  # an Ahead (a chained run's input) has no host: declined
                if a.host is None:  # only the runner has its data
                    return None
                a = a.host
            args.append(a)
        key = tuple(a.shape for a in args)
        if not self._small(v, key):
            return None
        try:
            if v.session is None:
                from planwire.worker.runtime import OrtPlan

                v.session = OrtPlan(v.plan.data, name=v.plan.name, threads=1, arena=False)
            results = v.session.run(args, check=False)  # type: ignore[attr-defined]
        except Exception as e:  # the sandbox answers it (and says what is wrong, as it would anyway)
            log.debug("plan %r not run direct (%s): the sandbox runs it", v.plan.name, e)
            v.small[key] = False
            self.counts["direct_fallbacks"] += 1
            return None
        self.counts["direct_runs"] += 1
        return results

    def prepared(self, pid: str, plan: Plan, args: list[np.ndarray]) -> Callable[[list], list] | None:
        """The worker/tiny.py path's verdict on host arrays ``args`` of plan ``pid``: its run (the session's
        C-level run, or OrtPlan.run) when the plan's signature accepts them and the lane takes the call, else
        None. Decided once per (dtypes, shapes) of the arguments."""
        v = self._variants.get(pid, False)
        if v is None:
            return None
        if v is False or v.plan is not plan:
            return None  # decided by run() first (the general path), which also counts a fallback
        if v.session is None:  # created by run() at the first small call: no verdict yet
            return None
        key = _signature(args)
        ok = v.ready.get(key)
        if ok is None:
            ok = _remember(v.ready, key, self._ready(v, plan, args))
            if ok:
                self._bind(v, key, args)
        if not ok:
            return None
        bound = v.bound.get(key)
        return bound if bound is not None else v.call

    def decline(self, pid: str, args: list[np.ndarray]) -> None:
        """A prepared run of ``pid`` on ``args`` failed: such calls take the general path from now on."""
        v = self._variants.get(pid)
        if v:
            v.ready[_signature(args)] = False
            v.bound.pop(_signature(args), None)
            v.small[tuple(a.shape for a in args)] = False  # nor does run() try it here again
            self.counts["direct_fallbacks"] += 1

    def _ready(self, v: _Variant, plan: Plan, args: list[np.ndarray]) -> bool:
        try:
            plan.ports.check(args)
        except Exception:
            return False
        if not self._small(v, tuple(a.shape for a in args)):
            return False
        if v.call is None:
            s = v.session
            run, names_in, names_out = s._run, s._input_names, s._output_names  # type: ignore[attr-defined]
            if run is None:
                v.call = s.run  # type: ignore[attr-defined]
            else:  # OrtPlan.run(check=False) without its keyword handling: what check() accepted runs as is
                v.call = lambda arrays: run(names_out, dict(zip(names_in, arrays, strict=True)), None)
        return True

    def _bind(self, v: _Variant, key: tuple, args: list[np.ndarray]) -> None:
        """Prepare signature ``key``'s run by IOBinding (:class:`_Bound`) when its arrays are small, C-contiguous
        and not empty, and it gives the same bytes as the session's run on ``args``; else ``call`` serves it."""
        s = v.session
        if getattr(s, "_run", None) is None or len(v.bound) >= _BOUND:
            return
        if sum(len(w.bound) for w in self._variants.values() if w) >= _LANE_BOUND:  # once per signature
            return
        if any(not a.flags.c_contiguous or not a.size for a in args) or sum(a.nbytes for a in args) > _BOUND_BYTES:
            return
        if set(s._output_names) & set(s._input_names):  # type: ignore[attr-defined]
            return  # an input passed through as an output: onnxruntime never writes that output's bound buffer
        try:
            want = v.call(args)  # type: ignore[misc]
            if any(not r.size for r in want) or sum(r.nbytes for r in want) > _BOUND_BYTES:
                return
            # every buffer starts as the complement of the answer (each byte differs), so an output onnxruntime
            # does not write into its buffer fails the check below instead of passing with the first answer
            blank = [np.bitwise_not(r.reshape(-1).view(np.uint8)).view(r.dtype).reshape(r.shape) for r in want]
            bound = _Bound(s.session, s._input_names, s._output_names, blank)  # type: ignore[attr-defined]
            got = bound(args)
        except Exception as e:  # the session's run serves it
            log.debug("plan %r: no IOBinding run for %s (%s)", v.plan.name, key, e)
            return
        if len(got) == len(want) and all(
            g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes()
            for g, w in zip(got, want, strict=True)
        ):
            v.bound[key] = bound

    def _variant(self, plan: Plan) -> _Variant | None:
        try:
            g = read_graph(plan.data)
        except ValueError:
            return None
        why = direct_safe(g, self.max_bytes)
        if why:
            log.debug("plan %r runs in the sandbox: %s", plan.name, why)
            return None
        log.debug("plan %r is direct-safe: its small calls run in the worker process", plan.name)
        return _Variant(g, plan)

    def _small(self, v: _Variant, shapes: tuple) -> bool:
        """:meth:`small`, decided once per argument shapes."""
        ok = v.small.get(shapes)
        return _remember(v.small, shapes, self.small(v, shapes)) if ok is None else ok

    def small(self, v: _Variant, shapes: tuple) -> bool:
        """Whether a call of ``v`` on arguments of ``shapes`` is small (the module's rule 2)."""
        g = v.graph
        if len(shapes) != len(g.inputs):
            return False
        named = dict(zip(g.inputs, shapes, strict=True))
        total = value_bytes(g, named)
        if total is None or total > self.max_bytes:
            return False
        e = estimate(g, named)
        return e.unknown_values == 0 and not e.uncounted and e.flops <= self.max_flops


def _signature(args: list[np.ndarray]) -> tuple:
    """(dtype, shape) of each argument: what a prepared verdict is kept by."""
    return tuple(map(_dtype_shape, args))  # map(): Python 3.11 makes a function object per comprehension


_dtype_shape = operator.attrgetter("dtype", "shape")


def _remember(cache: dict, key: object, value: bool) -> bool:
    """``cache[key] = value`` (the cache starts over past ``_CACHE`` entries); returns ``value``."""
    if len(cache) >= _CACHE:
        cache.clear()
    cache[key] = value
    return value
