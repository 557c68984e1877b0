"""Service: what a worker does with each request. The same object serves in-process and over ZeroMQ.

``handle(frames) -> frames`` is the whole contract: bytes in, bytes out, through the protocol's Session
codec either way, so every in-process (VirtualWorker) test also exercises the wire format.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from msgspec import UNSET

from planwire.transport import codec, dtypes, session
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.session import Frame, Limits
from planwire.transport.spec import plan_id
from planwire.worker.modelcheck import check_model
from planwire.worker.runtime import PlanSession, Ports, providers_for
from planwire.worker.store import Entry, Store

log = logging.getLogger("planwire.worker")

# Opsets of the ONNX default domain this worker's onnxruntime accepts (reported in welcome).
ONNX_OPSET = 23


@dataclass
class Plan:
    """A registered plan: its bytes (kept, so a restarted runner can re-create its session) and ports."""

    name: str
    data: bytes
    ports: Ports


@dataclass
class RegisterJob:
    """A registration that needs a session created (by the sandbox's runner, or in process)."""

    rid: int
    pid: str
    name: str
    data: bytes


@dataclass
class RunJob:
    """A validated run: the plan, its argument arrays and, for stored ones, their store entries."""

    msg: m.Run
    plan: Plan
    args: list[np.ndarray]
    entries: list[Entry | None]


Job = RegisterJob | RunJob
_STOPPED = frozenset({"plan_crashed", "plan_timeout", "out_of_memory", "cancelled"})  # a run that started, or was due


class Service:
    """One worker: a Store of tensors, registered plans, and the request handlers."""

    def __init__(
        self,
        worker_id: str,
        *,
        data: Iterable[tuple[str, np.ndarray, Sequence[str]]] = (),
        public: bool = False,
        device: str = "cpu",
        threads: int = 1,
        limits: Limits | None = None,
    ) -> None:
        self.id = worker_id
        self.session = uuid.uuid4().hex
        self.providers = providers_for(device)
        self.threads = threads
        self.limits = limits or Limits()
        self.store = Store(public=public)
        self.plans: dict[str, Plan] = {}
        self._sessions: dict[str, PlanSession] = {}  # in-process execution only (VirtualWorker, tests)
        for key, array, tags in data:
            try:  # only wire dtypes, stored little-endian and C-contiguous like everything received
                wire = dtypes.to_wire(array.dtype)
            except ValueError as e:
                raise ValueError(f"own tensor {key!r}: {e}") from None
            array = np.ascontiguousarray(array, dtype=dtypes.to_numpy(wire))
            self.store.put(key, array, tags, private=True)
        self._handlers: dict[type, Callable[[m._Message, list[memoryview]], tuple[m._Message, list[Frame]]]] = {
            m.Hello: self._hello,
            m.Ping: lambda msg, _: (m.Ok(re=msg.id, session=self.session), []),
            m.Put: self._put,
            m.Get: self._get,
            m.Delete: self._delete,
            m.Search: self._search,
            m.Describe: self._describe,
            m.RegisterPlan: self._register,
            m.HasPlan: self._has_plan,
            m.Run: self._run,
            m.Cancel: self._cancel,
        }

    # -- entry points ----------------------------------------------------------------------------
    # handle() answers one request in this process (plans run here too). A plan-worker instead drives
    # decode/answer/begin/complete from its supervisor loop (worker/supervisor.py), with begin's jobs
    # executed by the sandboxed runner, so no plan ever runs in the process that holds the data.

    def handle(self, frames: Sequence[Frame]) -> list[Frame]:
        """Answer one request message; never raises: every failure becomes an error reply."""
        msg, buffers = self.decode(frames)
        if msg is None:
            return buffers  # type: ignore[return-value]
        return self.answer(msg, buffers)

    def decode(self, frames: Sequence[Frame]) -> tuple[m._Message | None, list]:
        """(request, raw frames), or (None, error reply frames) for a request refused as a whole."""
        rid = -1
        try:
            total = sum(map(len, frames))
            if total > self.limits.max_message_bytes:
                rid = session.request_id(frames)
                raise ProtocolError(
                    "too_large",
                    f"message of {total} bytes, over the limit of {self.limits.max_message_bytes}",
                )
            return session.unpack_request(frames, self.limits)
        except ProtocolError as e:
            return None, self.refuse(getattr(e, "re", rid), e)
        except Exception as e:  # a bug here must not take the worker down
            return None, self.refuse(rid, e)

    def answer(self, msg: m._Message, buffers: list[memoryview]) -> list[Frame]:
        """Reply frames for a decoded request; never raises."""
        rid = msg.id  # type: ignore[attr-defined]
        try:
            if log.isEnabledFor(logging.DEBUG):
                t0 = time.perf_counter()
            reply, out = self._handlers[type(msg)](msg, buffers)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s #%d -> %s (%.2f ms)",
                    m.type_name(type(msg)),
                    rid,
                    m.type_name(type(reply)),
                    (time.perf_counter() - t0) * 1e3,
                )
            return session.pack(reply, out)
        except Exception as e:
            return self.refuse(rid, e)

    def refuse(self, rid: int, e: Exception) -> list[Frame]:
        """The error reply for a failed request (ProtocolError: its code; anything else: internal)."""
        if isinstance(e, ProtocolError):
            log.info("request #%d refused: %s [%s]", rid, e.message, e.code)
            return session.pack(m.Error(re=rid, session=self.session, code=e.code, message=e.message))  # type: ignore[arg-type]
        log.error("request #%d failed", rid, exc_info=e)
        return session.pack(m.Error(re=rid, session=self.session, code="internal", message=f"{type(e).__name__}: {e}"))

    def begin(self, msg: m.RegisterPlan | m.Run, buffers: list[memoryview]) -> Job | list[Frame]:
        """Validate a registration or run: a Job to execute, or the reply when there is nothing to run
        (already registered, or refused: a refused run's outputs are marked failed). Never raises."""
        try:
            if isinstance(msg, m.RegisterPlan):
                job = self._begin_register(msg, buffers)
                if isinstance(job, m.PlanInfo):
                    return session.pack(job)
                return job
            return self._begin_run(msg, buffers)
        except Exception as e:
            return self.refuse(msg.id, e)

    def complete(self, job: Job, outcome: Ports | list[np.ndarray] | ProtocolError) -> list[Frame]:
        """The reply to ``job`` given what executing it gave: ports (loaded), arrays (ran) or an error."""
        rid = job.rid if isinstance(job, RegisterJob) else job.msg.id
        try:
            if isinstance(job, RegisterJob):
                if isinstance(outcome, ProtocolError):
                    raise outcome
                plan = Plan(job.name, job.data, outcome)  # type: ignore[arg-type]
                self.plans[job.pid] = plan
                log.info("registered plan %r (%s, %d bytes)", job.name, job.pid[:12], len(job.data))
                return session.pack(self._plan_info(rid, job.pid, plan))
            if isinstance(outcome, ProtocolError):
                self._fail_outputs(job.msg, outcome)
                raise outcome
            reply, out = self._end_run(job, outcome)  # type: ignore[arg-type]
            return session.pack(reply, out)
        except Exception as e:
            return self.refuse(rid, e)

    def drop(self, msg: m.Run, error: ProtocolError) -> list[Frame]:
        """The reply to a run that will not start (cancelled while queued); its outputs are marked failed
        unless the run would have been refused as a whole (e.g. a forbidden output key)."""
        try:
            self.store.check_writable(msg.outputs)
            if len(set(msg.outputs)) == len(msg.outputs):
                self._fail_outputs(msg, error)
        except ProtocolError as e:
            return self.refuse(msg.id, e)
        return self.refuse(msg.id, error)

    # -- handlers ---------------------------------------------------------------------------------

    def _hello(self, msg: m.Hello, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        if msg.version != m.PROTOCOL_VERSION:
            raise ProtocolError(
                "bad_version", f"client speaks protocol {msg.version}, this worker {m.PROTOCOL_VERSION}"
            )
        lim = m.Limits(
            max_message_bytes=self.limits.max_message_bytes,
            max_plan_bytes=self.limits.max_plan_bytes,
            max_frames=self.limits.max_frames,
        )
        return m.Welcome(
            re=msg.id,
            session=self.session,
            worker=self.id,
            version=m.PROTOCOL_VERSION,
            providers=self.providers,
            opsets={"ai.onnx": ONNX_OPSET},
            limits=lim,
        ), []

    def _put(self, msg: m.Put, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        arrays = [self._tensor(t.dtype, t.shape, t.frame, buffers, f"put tensor {t.key!r}") for t in msg.tensors]
        self.store.check_writable(t.key for t in msg.tensors)
        for t, arr in zip(msg.tensors, arrays, strict=True):
            self.store.put(t.key, arr, t.tags)
        return m.Ok(re=msg.id, session=self.session), []

    def _get(self, msg: m.Get, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        arrays = self.store.take(msg.keys, msg.keep)
        return self._tensors_reply(msg.id, msg.keys, arrays)

    def _delete(self, msg: m.Delete, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        self.store.delete(msg.keys)
        return m.Ok(re=msg.id, session=self.session), []

    def _search(self, msg: m.Search, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, e) for k, e in self.store.search(msg.tags)]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _describe(self, msg: m.Describe, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, self.store.entry(k)) for k in msg.keys]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _register(self, msg: m.RegisterPlan, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        job = self._begin_register(msg, buffers)
        if isinstance(job, m.PlanInfo):
            return job, []
        plan = PlanSession(job.data, name=job.name, providers=self.providers, threads=self.threads)
        self._sessions[job.pid] = plan
        self.plans[job.pid] = Plan(job.name, job.data, plan)
        log.info("registered plan %r (%s, %d bytes)", job.name, job.pid[:12], len(job.data))
        return self._plan_info(msg.id, job.pid, self.plans[job.pid]), []

    def _begin_register(self, msg: m.RegisterPlan, buffers: list[memoryview]) -> RegisterJob | m.PlanInfo:
        frame = session.frame_at(buffers, msg.frame, "register_plan.frame")
        data = bytes(frame)
        pid = plan_id(data)
        plan = self.plans.get(pid)
        if plan is not None:
            return self._plan_info(msg.id, pid, plan)
        try:
            summary = check_model(data, max_bytes=self.limits.max_plan_bytes)
        except ValueError as e:  # PlanRejected
            code = "too_large" if len(data) > self.limits.max_plan_bytes else "bad_plan"
            raise ProtocolError(code, f"plan {msg.name or pid[:12]!r} rejected: {e}") from None
        name = msg.name or summary.metadata_props.get("planwire.name", "") or pid[:12]
        return RegisterJob(msg.id, pid, name, data)

    def _cancel(self, msg: m.Cancel, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        # In process a run is over before the next request is read: nothing is ever queued or running.
        raise ProtocolError("bad_argument", f"cancel: no run #{msg.run} of this connection is queued or running")

    def _has_plan(self, msg: m.HasPlan, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        plan = self.plans.get(msg.plan)
        if plan is None:
            return m.Missing(re=msg.id, session=self.session, plan=msg.plan), []
        return self._plan_info(msg.id, msg.plan, plan), []

    def _run(self, msg: m.Run, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        job = self._begin_run(msg, buffers)
        pid = job.msg.plan
        try:
            plan = self._sessions.get(pid)
            if plan is None:
                plan = self._sessions[pid] = PlanSession(
                    job.plan.data, name=job.plan.name, providers=self.providers, threads=self.threads
                )
            results = plan.run(job.args, check=False)
        except ProtocolError as e:
            self._fail_outputs(msg, e)
            raise
        except Exception as e:  # onnxruntime's own errors already say what they are
            detail = e if isinstance(e, ort.capi.onnxruntime_pybind11_state.Fail) else f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
            error = ProtocolError("run_failed", f"plan {job.plan.name!r} failed on worker {self.id!r}: {detail}")
            self._fail_outputs(msg, error)
            raise error from None
        return self._end_run(job, results)

    def _begin_run(self, msg: m.Run, buffers: list[memoryview]) -> RunJob:
        # What the schema forbids is refused before anything changes (as any invalid header).
        if len(set(msg.outputs)) != len(msg.outputs):
            raise ProtocolError("invalid_message", f"run.outputs must be distinct keys, got {msg.outputs}")
        for i, arg in enumerate(msg.args):
            if (arg.ref is UNSET) == (arg.tensor is UNSET):
                raise ProtocolError("invalid_message", f"run.args[{i}] needs exactly one of 'ref', 'tensor'")
        self.store.check_writable(msg.outputs)  # forbidden: nothing recorded, the worker's data untouched
        try:
            return self._prepare(msg, buffers)
        except ProtocolError as e:
            self._fail_outputs(msg, e)
            raise

    def _fail_outputs(self, msg: m.Run, e: ProtocolError) -> None:
        # Clients do not wait for runs: record why the outputs will not come, so that a later get,
        # describe or run that uses them fails with run_failed and this reason.
        if e.code == "run_failed":
            why = e.message
        elif e.code in _STOPPED:
            why = f"run #{msg.id} failed: {e.message} [{e.code}]"
        else:
            why = f"run #{msg.id} refused: {e.message} [{e.code}]"
        for key in msg.outputs:
            self.store.fail(key, why)

    def _prepare(self, msg: m.Run, buffers: list[memoryview]) -> RunJob:
        plan = self.plans.get(msg.plan)
        if plan is None:
            raise ProtocolError("unknown_plan", f"no plan {msg.plan[:12]!r} on worker {self.id!r}: register it first")
        n_out = len(plan.ports.outputs)
        if len(msg.outputs) != n_out:
            raise ProtocolError(
                "bad_argument",
                f"plan {plan.name!r} has {n_out} outputs: run.outputs needs {n_out} keys, got {msg.outputs}",
            )
        if msg.fetch and max(msg.fetch) >= n_out:
            raise ProtocolError("bad_argument", f"run.fetch {msg.fetch} out of range for {n_out} outputs")
        entries: list[Entry | None] = []
        args = []
        for i, a in enumerate(msg.args):
            if a.ref is not UNSET:
                entry = self.store.entry(a.ref)
                entries.append(entry)
                args.append(entry.array)
            else:
                t = a.tensor
                entries.append(None)
                args.append(self._tensor(t.dtype, t.shape, t.frame, buffers, f"run argument {i}"))  # type: ignore[union-attr]
        plan.ports.check(args)
        return RunJob(msg, plan, args, entries)

    def _end_run(self, job: RunJob, results: list[np.ndarray]) -> tuple[m._Message, list[Frame]]:
        msg = job.msg
        for key, arr in zip(msg.outputs, results, strict=True):
            self.store.put(key, arr)
        fetch = msg.fetch
        if msg.inline_max:
            fetch = [*fetch, *(i for i, r in enumerate(results) if r.nbytes <= msg.inline_max and i not in fetch)]
        if not fetch:
            return m.Ok(re=msg.id, session=self.session), []
        return self._tensors_reply(msg.id, [msg.outputs[i] for i in fetch], [results[i] for i in fetch])

    # -- helpers ----------------------------------------------------------------------------------

    def _tensor(self, dtype: str, shape: list[int], index: int, buffers: list[memoryview], what: str) -> np.ndarray:
        return codec.from_frame(dtype, shape, session.frame_at(buffers, index, what), what=what)

    def _tensors_reply(self, rid: int, keys: list[str], arrays: list[np.ndarray]) -> tuple[m._Message, list[Frame]]:
        out, frames = [], []
        for key, arr in zip(keys, arrays, strict=True):
            wire, shape, buf = codec.to_frame(arr)
            out.append(m.KeyedTensor(key=key, dtype=wire, shape=shape, frame=len(frames)))
            frames.append(buf)
        return m.Tensors(re=rid, session=self.session, tensors=out), frames

    def _plan_info(self, rid: int, pid: str, plan: Plan) -> m.PlanInfo:
        def ports(items: list) -> list[m.Port]:
            return [
                m.Port(name=n, dtype=t, shape=[d if isinstance(d, int) else (d or None) for d in s])
                for n, t, s in items
            ]

        return m.PlanInfo(
            re=rid, session=self.session, plan=pid, inputs=ports(plan.ports.inputs), outputs=ports(plan.ports.outputs)
        )

    @staticmethod
    def _info(key: str, entry) -> m.TensorInfo:
        return m.TensorInfo(
            key=key,
            dtype=codec.dtypes.to_wire(entry.array.dtype),
            shape=list(entry.array.shape),
            tags=list(entry.tags),
            private=entry.private,
        )
