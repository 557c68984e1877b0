"""PlanCalls: the plan half of the worker API (registration once per worker session, runs by reference, cancel).

A run is sent without waiting: its result pointers hold the run's Call and read its reply when asked. A
failed run is recorded by the worker against its output keys, so the error surfaces on ``.get()``.
:class:`~planwire.transport.client.WorkerClient` mixes this in; the requests go through its Connection.
A plan called again and again with most of its request fixed (a bound plan's step) runs from a
:class:`RunTemplate`, encoded once, so a call's work does not grow with the inputs that stay stored.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from planwire.transport import codec
from planwire.transport import messages as m
from planwire.transport.arrays import as_array
from planwire.transport.errors import ProtocolError, remote_error
from planwire.transport.framing import SIGNATURE, Frame
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
        self._forms: dict[str, RunForm] = {}  # by variant id: what a run of it sends every time

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
        form = self._forms.get(variant.id)
        if form is None or form.name != name:
            form = self._forms[variant.id] = RunForm(variant, name)
        refs, buffers = self._arguments(args)
        if outputs is None:
            keys = self.new_keys(form.n)
            mine: Sequence[bool] = form.fresh  # fresh keys, each owned by its pointer
            if inline_max is None:
                inline_max = self.inline_max
        else:
            if len(outputs) != form.n:
                raise ValueError(f"plan {name!r} has {form.n} outputs, got {len(outputs)} output keys")
            keys = [k or self.new_key() for k in outputs]
            mine = [not k for k in outputs]
            if inline_max is None:
                inline_max = 0
        conn = self.connection
        rid = conn.new_id()
        header = form.header(rid, b",".join(refs), keys, fetch, inline_max)
        call = conn.post(rid, [SIGNATURE, header, *buffers], form.what, background=not (fetch and wait))
        owned = conn.owned
        results = []
        for i, (dtype, shape, dims) in enumerate(form.results):  # keys and mine have form.n entries too
            k, own = keys[i], mine[i]  # (not zip(strict=True): its keyword costs more than the loop here)
            if own:
                owned[k] = None
            results.append(PointerTensor(self, k, dtype, shape, (), own, False, call, dims))
        if fetch and wait:
            call.result()  # errors raise here
        return results

    def run_template(self, template: RunTemplate, args: Sequence[Any]) -> list[PointerTensor]:
        """Run ``template`` with ``args`` (pointers or local tensors) in its slots, without waiting; returns
        the pointers of its outputs under fresh keys, whose values ride on the run's reply."""
        refs, buffers = self._arguments(args)
        keys = self.new_keys(len(template.fresh))
        conn = self.connection
        rid = conn.new_id()
        header = template.format % (rid, *refs, *map(_encode, keys))
        call = conn.post(rid, [SIGNATURE, header, *buffers], template.what, background=True)
        owned = conn.owned
        results = []
        for k, (dtype, shape, dims) in zip(keys, template.fresh, strict=True):
            owned[k] = None
            results.append(PointerTensor(self, k, dtype, shape, (), True, False, call, dims))
        return results

    def _arguments(self, args: Sequence[Any]) -> tuple[list[bytes], list[Frame]]:
        """Each run argument's encoding (a pointer by reference, a local tensor inline) and the inline
        tensors' frames."""
        refs: list[bytes] = []
        buffers: list[Frame] = []
        for a in args:
            if type(a) is PointerTensor or isinstance(a, PointerTensor):
                if a.worker is not self or a.consumed:
                    self.check_pointer(a)  # raises, saying why
                refs.append(b'{"ref":%s}' % _encode(a.key))
            else:
                wire, shape, buf = codec.to_frame(as_array(a))
                refs.append(_encode(m.Arg(tensor=m.Tensor(dtype=wire, shape=shape, frame=len(buffers)))))
                buffers.append(buf)
        return refs, buffers

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


_encode = m.encoder.encode


class RunForm:
    """What every Run of one plan variant sends, encoded once: a call writes its header with one bytes
    format (request id, arguments, output keys) instead of building and encoding message structs. The
    bytes are msgspec's encoding of the same :class:`~planwire.transport.messages.Run` (tests/test_runs.py
    holds them equal), so the worker's exact-header check takes its fast path."""

    __slots__ = ("_head", "_tails", "fresh", "n", "name", "results", "what")

    def __init__(self, variant: PlanVariant, name: str) -> None:
        self.name = name
        self.what = f"run of plan {name!r}"
        plan = _encode(variant.id).replace(b"%", b"%%")
        self._head = b'{"type":"run","id":%d,"plan":' + plan + b',"args":[%s],"outputs":%s%s}'
        # (dtype, shape when static else None, declared shape) of each output: what result pointers start with
        self.results = [(d, shape, o.shape) for (d, shape), o in zip(variant.results, variant.outputs, strict=True)]
        self.n = len(self.results)
        self.fresh = (True,) * self.n  # every output under a fresh key its pointer owns (no ``outputs`` given)
        self._tails: dict[int, bytes] = {}  # the header's end by inline_max, for runs without ``fetch``

    def header(self, rid: int, args: bytes, keys: list[str], fetch: Sequence[int], inline_max: int) -> bytes:
        """The run's JSON header: ``args`` the arguments' encodings joined by commas; fields at their
        defaults left out, as msgspec leaves them out."""
        tail = None if fetch else self._tails.get(inline_max)
        if tail is None:
            tail = b',"fetch":%s' % _encode(list(fetch)) if fetch else b""
            if inline_max:
                tail += b',"inline_max":%d' % inline_max
            if not fetch and len(self._tails) < 8:  # a plan's runs use one or two inline_max values
                self._tails[inline_max] = tail
        return self._head % (rid, args, _encode(keys), tail)


_SLOT = "\x00"  # where a template's per-call parts go: no key a client makes is this (msgspec writes "\u0000")


class RunTemplate:
    """A run of ``variant`` whose request is the same every call but for a few parts: inputs are stored
    keys except at the slots (None in ``inputs``), outputs go to keys the caller owns except those given as
    None, which get fresh keys each call and ride on the reply. A bound plan's step is one: its state in
    and out by key, its loss under a fresh key. The header is msgspec's encoding of that Run, made once,
    with ``%d``/``%s`` in place of the request id, the slots' arguments and the fresh keys, so a call costs
    O(slots + fresh outputs) however many inputs and outputs stay fixed."""

    __slots__ = ("format", "fresh", "what")

    def __init__(
        self, variant: PlanVariant, name: str, inputs: Sequence[str | None], outputs: Sequence[str | None]
    ) -> None:
        form = RunForm(variant, name)
        if len(inputs) != len(variant.inputs) or len(outputs) != form.n:
            raise ValueError(f"plan {name!r} has {len(variant.inputs)} inputs and {form.n} outputs")
        if _SLOT in (*inputs, *outputs):
            raise ValueError(f"a run template of plan {name!r} cannot hold the key {_SLOT!r}")
        self.what = form.what
        fresh = [i for i, k in enumerate(outputs) if k is None]
        self.fresh = [form.results[i] for i in fresh]  # (dtype, static shape or None, declared shape)
        slot = m.Arg(ref=_SLOT)
        run = m.Run(
            id=0,
            plan=variant.id,
            args=[slot if k is None else m.Arg(ref=k) for k in inputs],
            outputs=[_SLOT if k is None else k for k in outputs],
            fetch=fresh,
        )
        # The id is the first field after the tag; a slot is an element of the args or outputs array, so it
        # follows a structural [ or a comma. Inside a JSON string a quote is escaped (a key ending in a quote
        # and NUL is written ...\"\u0000"), so no pattern below can start inside a user's string.
        fmt = _encode(run).replace(b"%", b"%%").replace(b'"id":0,', b'"id":%d,', 1)
        for before in (b"[", b","):
            fmt = fmt.replace(before + _encode(slot), before + b"%s").replace(before + _encode(_SLOT), before + b"%s")
        self.format = fmt
