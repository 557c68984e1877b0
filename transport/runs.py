"""PlanCalls: the plan half of the worker API (registration once per worker session, runs by reference, cancel).

A run is sent without waiting: its result pointers hold the run's Call and read its reply when asked. A
failed run is recorded by the worker against its output keys, so the error surfaces on ``.get()``.
:class:`~planwire.transport.client.WorkerClient` mixes this in; the requests go through its Connection.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from planwire.transport import codec
from planwire.transport import messages as m
from planwire.transport.arrays import as_array
from planwire.transport.errors import ProtocolError, remote_error
from planwire.transport.framing import Frame
from planwire.transport.pointers import PointerPlan, PointerTensor
from planwire.transport.spec import PlanSource, PlanVariant

if TYPE_CHECKING:
    from planwire.transport.connection import Connection

INLINE_MAX = 64 << 10  # run results up to this size come back with the run's reply: get() then costs nothing


class PlanCalls:
    """Plans and runs on one worker (mixed into WorkerClient, whose connection, keys and requests it uses)."""

    connection: Connection
    id: str

    if TYPE_CHECKING:

        def new_key(self) -> str: ...
        def new_keys(self, n: int) -> list[str]: ...
        def check_pointer(self, p: PointerTensor) -> None: ...
        def ping(self) -> None: ...
        def request(
            self, make: Any, buffers: Sequence[Frame] = (), *, what: str = ""
        ) -> tuple[m.Reply, list[Frame]]: ...

    def _init_plans(self) -> None:
        self._plans: set[str] = set()  # plan ids registered in the worker session ``_plans_session``
        self._plans_session: str | None = None
        self._pointers: weakref.WeakKeyDictionary[Any, PointerPlan] = weakref.WeakKeyDictionary()
        self.inline_max = INLINE_MAX
        self._run_what: dict[str, str] = {}  # "run of plan 'name'", made once per plan name

    def plan_pointer(self, source: PlanSource) -> PointerPlan:
        """A PointerPlan for ``source`` on this worker; its bytes are sent once per worker session."""
        pointer = self._pointers.get(source)
        if pointer is None:
            pointer = self._pointers[source] = PointerPlan(source, self)
        for variant in getattr(source, "variants", ()):
            self.ensure_plan(variant, source.name)
        return pointer

    def check_connection(self) -> None:
        """After the connection dropped, learn the worker's session again: a restarted worker has lost its
        plans and tensors, so plans are registered again on demand instead of failing the next run."""
        if self.connection.check():
            self.ping()  # the reply carries the worker's (possibly new) session

    def ensure_plan(self, variant: PlanVariant, name: str = "") -> None:
        """Register a plan variant unless this worker session already has it (waits: errors show here)."""
        conn = self.connection
        if conn.check():  # the connection dropped: learn the worker's session again
            self.ping()
        session = conn.session
        if self._plans_session != session or session is None:
            self._plans.clear()
            self._plans_session = session
        if variant.id in self._plans:
            return
        limits = conn.limits
        if limits is not None and len(variant.data) > limits.max_plan_bytes:
            raise ValueError(
                f"plan {name!r} is {len(variant.data)} bytes, over worker {self.id!r}'s limit of "
                f"{limits.max_plan_bytes} bytes per plan (plan-worker --max-plan-mb)"
            )
        reply, _ = self.request(
            lambda rid: m.RegisterPlan(id=rid, frame=0, name=name), [variant.data], what=f"plan {name!r}"
        )
        if not isinstance(reply, m.PlanInfo) or reply.plan != variant.id:
            raise ProtocolError("bad_plan", f"worker {self.id!r} registered plan {name!r} under an unexpected id")
        if self._plans_session != conn.session:  # the registration itself met a restarted worker
            self._plans.clear()
            self._plans_session = conn.session
        self._plans.add(variant.id)

    def delete_plan(self, plan: str) -> None:
        """Unregister a plan (by id) on the worker, freeing its place under ``--max-plans``."""
        self.request(lambda rid: m.DeletePlan(id=rid, plan=plan))
        self._plans.discard(plan)

    def signature_of(self, arg: Any) -> tuple[str, tuple[int, ...]]:
        """(wire dtype, shape) of a plan argument, pointer or local tensor (a pointer's shape may wait
        for the run that makes it)."""
        if type(arg) is PointerTensor or isinstance(arg, PointerTensor):
            if arg.worker is not self or arg.consumed:
                self.check_pointer(arg)  # raises, saying why
            shape = arg._shape
            return arg.dtype, shape if shape is not None else arg.shape
        array = as_array(arg)
        return codec.dtypes.to_wire(array.dtype), array.shape

    def run(
        self,
        variant: PlanVariant,
        args: Sequence[Any],
        *,
        outputs: Sequence[str | None] | None = None,
        fetch: Sequence[int] = (),
        name: str = "",
        wait: bool = True,
        inline_max: int | None = None,
    ) -> list[PointerTensor]:
        """Run a registered plan on pointers and/or local tensors (sent inline). Returns result pointers
        at once. ``outputs[i]`` names the key of output i: None (or no ``outputs``) makes a fresh key the
        result pointer owns, a string a key the caller owns (e.g. state a training step updates in place).
        Outputs listed in ``fetch`` and, without ``outputs``, every output of at most ``inline_max`` bytes
        ride on the run's reply and ``get()`` reads them there, so ``plan(x).get()`` is one message each
        way; with ``fetch`` and ``wait`` the call waits for that reply (errors raise here)."""
        wire_args: list[m.Arg] = []
        buffers: list[Frame] = []
        for a in args:
            if type(a) is PointerTensor or isinstance(a, PointerTensor):
                if a.worker is not self or a.consumed:
                    self.check_pointer(a)  # raises, saying why
                wire_args.append(m.Arg(ref=a.key))
            else:
                wire, shape, buf = codec.to_frame(as_array(a))
                wire_args.append(m.Arg(tensor=m.Tensor(dtype=wire, shape=shape, frame=len(buffers))))
                buffers.append(buf)
        specs = variant.outputs
        if outputs is None:
            keys = self.new_keys(len(specs))
            mine: Sequence[bool] = (True,) * len(specs)  # fresh keys, each owned by its pointer
            if inline_max is None:
                inline_max = self.inline_max
        else:
            keys = [k or self.new_key() for k in outputs]
            mine = [not k for k in outputs]
            if inline_max is None:
                inline_max = 0
            if len(keys) != len(specs):
                raise ValueError(f"plan {name!r} has {len(specs)} outputs, got {len(keys)} output keys")
        conn = self.connection
        fetch = list(fetch)
        msg = m.Run(id=conn.new_id(), plan=variant.id, args=wire_args, outputs=keys, fetch=fetch, inline_max=inline_max)
        what = self._run_what.get(name) or self._run_what.setdefault(name, f"run of plan {name!r}")
        call = conn.send(msg, buffers, what, background=not (fetch and wait))
        owned = conn.owned
        results = []
        for k, own, (dtype, shape), spec in zip(keys, mine, variant.results, specs, strict=True):
            if own:
                owned[k] = None
            results.append(PointerTensor(self, k, dtype, shape, (), own, False, call, spec.shape))
        if fetch and wait:
            call.result()  # errors raise here
        return results

    def cancel(self, pointer: PointerTensor) -> bool:
        """Stop the run that makes ``pointer`` if the worker has it queued or running: the worker answers
        that run ``cancelled`` and records its outputs as failed with that reason (their ``get`` raises,
        saying so), and goes on with the requests after it. True when the run was cancelled; False when it
        had already finished (or the pointer is not a run's result, or a worker that runs requests strictly
        in order, such as an in-process one, had answered it)."""
        call = pointer._call
        if call is None or call.done:
            return False
        conn = self.connection
        reply = conn.send(m.Cancel(id=conn.new_id(), run=call.id), (), f"cancel of run #{call.id}").wait()
        if type(reply) is m.Ok:
            return True
        if type(reply) is m.Error and reply.code == "bad_argument":  # it finished before the cancel arrived
            return False
        raise remote_error(self.id, getattr(reply, "code", "internal"), getattr(reply, "message", repr(reply)))
