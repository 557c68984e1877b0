"""Service: what a worker does with each request. The same object serves in-process and over ZeroMQ.

``handle(frames, client) -> frames`` is the whole contract: bytes in, bytes out, through the protocol's
Session codec either way, so every in-process (VirtualWorker) test also exercises the wire format.
``client`` (a CURVE public key or a connection's routing id) is who the request counts against: store
quotas and the owner of what it stores. Every answer, wherever it is completed, is logged by client and
plan when refused and reported once to ``stats`` (the operator's view) when that is set.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from msgspec import UNSET

from planwire.transport import codec, dtypes, framing
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.framing import DEFAULT_LIMITS, Frame, Limits
from planwire.transport.plancheck import PlanRejected, check_model
from planwire.transport.spec import plan_id
from planwire.worker import flow
from planwire.worker.owners import DAY, Owners, PlanHolders, label
from planwire.worker.policy import Policy
from planwire.worker.release import Pending, Releaser
from planwire.worker.resident import Resident, hosts
from planwire.worker.runtime import Device, OrtPlan, Ports
from planwire.worker.stats import clean, peer_of
from planwire.worker.store import ClientId, Entry, Store

if TYPE_CHECKING:
    from planwire.worker.stats import Stats

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
class Origin:
    """Who asked for a job and when it began: its request frames (the connection, for logs and stats),
    the client it counts against (quotas, owner of its outputs) and ``perf_counter`` at its start."""

    frames: Sequence[Frame] = ()
    client: ClientId = b""
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class RegisterJob:
    """A registration that needs a session created (by the sandbox's runner, or in process)."""

    msg: m.RegisterPlan
    pid: str
    name: str
    data: bytes
    any_rank: frozenset[str] = frozenset()  # its ports of unknown rank
    origin: Origin = field(default_factory=Origin)

    @property
    def rid(self) -> int:
        return self.msg.id


@dataclass
class RunJob:
    """A validated run: the plan, its argument arrays and, for stored ones, their store entries."""

    msg: m.Run
    plan: Plan
    args: list[np.ndarray]
    entries: list[Entry | None]
    reads_private: bool = False  # an argument is private: a failure's message must not quote values
    private: frozenset[int] = frozenset()  # outputs computed from private data
    pending: dict = field(default_factory=dict)  # their releases the owner's policy allows
    rows: int = 0  # the fewest rows of the worker's data they were computed from
    origin: Origin = field(default_factory=Origin)


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
        gpu_mem_limit: int = 0,
        threads: int = 1,
        limits: Limits | None = None,
        max_plans: int | None = None,
        max_store_bytes: int | None = None,
        max_client_store_bytes: int | None = None,
        curve: bool = False,
        idle_ttl: float | None = DAY,
        policy: Policy | None = None,
        audit: str | None = None,
        plans_dir: Path | None = None,
        max_plans_dir_bytes: int | None = None,
    ) -> None:
        self.id = worker_id
        self.session = uuid.uuid4().hex
        self.device = Device.parse(device, gpu_mem_limit)
        self.providers = self.device.providers
        self.threads = threads
        self.limits = limits or DEFAULT_LIMITS
        self.store = Store(public=public, max_bytes=max_store_bytes, max_client_bytes=max_client_store_bytes)
        self.max_plans = max_plans
        self.plans: dict[str, Plan] = {}
        self.stats: Stats | None = None  # set by plan-worker: observes every answered request
        self.owners = Owners(curve=curve, idle_ttl=idle_ttl)  # identities (worker/owners.py)
        self.holders = PlanHolders()  # which owners registered each plan
        self.flows: dict[str, flow.Flow] = {}  # plan id -> which outputs depend on which inputs
        self.releaser = Releaser(policy, audit)  # the data owner's release rules and audit log
        self.durable: Any = None  # --state-dir (worker/state.py): the supervisor's group commit of its replies
        self.plans_dir = plans_dir  # where a worker with private data keeps the plans it receives, for review
        self.max_plans_dir_bytes = max_plans_dir_bytes  # beyond it the least recently received unused go
        # Caps enforced around the service (plan-worker: the server's queue bound, the sandbox's time and
        # memory bounds), announced with the store's and the plans' caps in welcome.limits.
        self.announced: dict[str, int | float] = {}
        self._conn: bytes = b""  # the connection the request being handled came on
        self._client: ClientId = b""  # its owner (quotas, ownership)
        self._any_rank: dict[str, frozenset[str]] = {}  # plan id -> its ports of unknown rank
        self._ort_plans: dict[str, OrtPlan] = {}  # in-process execution only (VirtualWorker, tests)
        for key, array, tags in data:
            try:  # only wire dtypes, stored little-endian and C-contiguous like everything received
                wire = dtypes.to_wire(array.dtype)
            except ValueError as e:
                raise ValueError(f"own tensor {key!r}: {e}") from None
            array = np.ascontiguousarray(array, dtype=dtypes.to_numpy(wire))
            self.store.put_own(key, array, tags)
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
            m.DeletePlan: self._delete_plan,
            m.Cancel: self._cancel,
        }

    # -- entry points ----------------------------------------------------------------------------
    # handle() answers one request in this process (plans run here too). A plan-worker instead drives
    # decode/answer/begin/complete from its supervisor loop (worker/supervisor.py), with begin's jobs
    # executed by the sandboxed runner, so no plan ever runs in the process that holds the data. Each
    # reply they return has been logged (when refused) and observed by ``stats`` exactly once.

    def handle(self, frames: Sequence[Frame], client: ClientId = b"") -> list[Frame]:
        """Answer one request message from ``client`` (its id for quotas; in process: b"");
        never raises: every failure becomes an error reply."""
        t0 = time.perf_counter()
        msg, buffers = self.decode(frames, client, t0=t0)
        if msg is None:
            return buffers  # type: ignore[return-value]
        return self.answer(msg, buffers, frames, client, t0=t0)

    def decode(
        self, frames: Sequence[Frame], client: ClientId = b"", *, t0: float | None = None
    ) -> tuple[m._Message | None, list]:
        """(request, raw frames), or (None, error reply frames) for a request refused as a whole."""
        t0 = time.perf_counter() if t0 is None else t0
        rid = -1
        try:
            total = sum(map(len, frames))
            if total > self.limits.max_message_bytes:
                rid = framing.request_id(frames)
                raise ProtocolError(
                    "too_large",
                    f"message of {total} bytes, over the limit of {self.limits.max_message_bytes}",
                )
            return framing.unpack_request(frames, self.limits)
        except Exception as e:  # a bug here must not take the worker down
            return None, self.refuse(getattr(e, "re", rid), e, Origin(frames, client, t0))

    def answer(
        self,
        msg: m._Message,
        buffers: list[memoryview],
        frames: Sequence[Frame] = (),
        client: ClientId = b"",
        *,
        t0: float | None = None,
    ) -> list[Frame]:
        """Reply frames for a decoded request from ``client`` (``frames``: its raw request); never raises."""
        origin = Origin(frames, client, time.perf_counter() if t0 is None else t0)
        rid = msg.id  # type: ignore[attr-defined]
        self._act_for(client)
        try:
            reply, out = self._handlers[type(msg)](msg, buffers)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s #%d -> %s (%.2f ms)",
                    m.type_name(type(msg)),
                    rid,
                    m.type_name(type(reply)),
                    (time.perf_counter() - origin.t0) * 1e3,
                )
        except Exception as e:
            return self.refuse(rid, e, origin, msg)
        return self.reply(origin, msg, reply, out)

    def reply(
        self, origin: Origin, msg: m._Message | None, reply: m._Message, out: Sequence[Frame] = ()
    ) -> list[Frame]:
        """The frames of ``reply`` to ``msg``, observed by ``stats`` (once per answered request)."""
        if self.stats is not None:  # the operator's view (plan-worker status, --metrics)
            try:
                owner = self.owners.owner(origin.client)
                self.stats.observe(origin.frames, msg, reply, time.perf_counter() - origin.t0, owner)
            except Exception:
                log.exception("stats of request #%d not recorded", reply.re)  # type: ignore[attr-defined]
        return framing.pack(reply, list(out))

    def refuse(
        self, rid: int, e: Exception, origin: Origin | None = None, msg: m._Message | None = None
    ) -> list[Frame]:
        """The error reply for a failed request (ProtocolError: its code; anything else: internal), logged
        naming the client and plan, and observed."""
        origin = origin or Origin()
        about = self._about(origin.frames, msg)
        if isinstance(e, ProtocolError):
            log.info("request #%d%s refused: %s [%s]", rid, about, clean(e.message), e.code)
            error = m.Error(re=rid, session=self.session, code=e.code, message=e.message)  # type: ignore[arg-type]
        else:
            log.error("request #%d%s failed", rid, about, exc_info=e)
            error = m.Error(re=rid, session=self.session, code="internal", message=f"{type(e).__name__}: {e}")
        return self.reply(origin, msg, error)

    def _about(self, frames: Sequence[Frame], msg: m._Message | None) -> str:
        """' type from CLIENT plan NAME (ID)' for a log line about a refused or failed request."""
        kind = f" {m.type_name(type(msg))}" if msg is not None else ""
        text = f"{kind} from {peer_of(frames, getattr(self.stats, 'curve', False))}"
        pid = getattr(msg, "plan", None)
        if pid is not None:
            plan = self.plans.get(pid)
            text += f" plan {plan.name!r} ({pid[:12]})" if plan is not None else f" plan {clean(pid[:64])!r}"
        elif isinstance(msg, m.RegisterPlan):
            text += f" plan {msg.name!r}"
        return text

    def begin(
        self,
        msg: m.RegisterPlan | m.Run,
        buffers: list[memoryview],
        frames: Sequence[Frame] = (),
        client: ClientId = b"",
    ) -> Job | list[Frame]:
        """Validate a registration or run from ``client``: a Job to execute (it remembers its client and
        start), or the reply when there is nothing to run (already registered, or refused: a refused run's
        outputs are marked failed). Never raises."""
        origin = Origin(frames, client)
        self._act_for(client)
        try:
            if isinstance(msg, m.RegisterPlan):
                job = self._begin_register(msg, buffers)
                if isinstance(job, m.PlanInfo):
                    return self.reply(origin, msg, job)
            else:
                job = self._begin_run(msg, buffers)
        except Exception as e:
            return self.refuse(msg.id, e, origin, msg)
        job.origin = origin
        return job

    def complete(self, job: Job, outcome: Ports | list[np.ndarray] | ProtocolError) -> list[Frame]:
        """The reply to ``job`` given what executing it gave: ports (loaded), arrays (ran) or an error.
        Quotas and ownership are those of the job's client."""
        rid = job.rid if isinstance(job, RegisterJob) else job.msg.id
        self._client = self.owners.owner(job.origin.client)
        try:
            if isinstance(job, RegisterJob):
                if isinstance(outcome, ProtocolError):
                    raise outcome
                plan = self._add_plan(job, outcome)  # type: ignore[arg-type]
                return self.reply(job.origin, job.msg, self._plan_info(rid, job.pid, plan))
            if isinstance(outcome, ProtocolError):
                if job.reads_private and outcome.code == "run_failed":  # the runner's text may quote values
                    log.info("plan %r failed on private data: %s", job.plan.name, clean(outcome.message))
                    outcome = ProtocolError("run_failed", flow.redacted(job.plan.name, self.id, outcome, job.args))
                self._fail_outputs(job.msg, outcome)
                raise outcome
            try:
                reply, out = self._end_run(job, outcome)  # type: ignore[arg-type]
            except ProtocolError as e:  # e.g. quota_exceeded: the outputs were not stored
                self._fail_outputs(job.msg, e)
                raise
            return self.reply(job.origin, job.msg, reply, out)
        except Exception as e:
            return self.refuse(rid, e, job.origin, job.msg)

    def drop(
        self, msg: m.Run, error: ProtocolError, frames: Sequence[Frame] = (), client: ClientId = b""
    ) -> list[Frame]:
        """The reply to a run that will not start (cancelled while queued); its outputs are marked failed
        unless the run would have been refused as a whole (e.g. a forbidden output key)."""
        origin = Origin(frames, client)
        self._act_for(client)
        try:
            self.store.check_writable(self._client, msg.outputs)
            if len(set(msg.outputs)) == len(msg.outputs):
                self._fail_outputs(msg, error)
        except ProtocolError as e:
            return self.refuse(msg.id, e, origin, msg)
        return self.refuse(msg.id, error, origin, msg)

    def _act_for(self, conn: bytes) -> None:
        """Handle what follows for the owner behind connection ``conn`` (worker/owners.py)."""
        self._conn = conn
        self._client = owner = self.owners.owner(conn)
        self.owners.seen(owner, self._free)

    # -- handlers ---------------------------------------------------------------------------------

    def _hello(self, msg: m.Hello, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        if msg.version != m.PROTOCOL_VERSION:
            raise ProtocolError(
                "bad_version", f"client speaks protocol {msg.version}, this worker {m.PROTOCOL_VERSION}"
            )
        self._client, token = self.owners.hello(self._conn, msg.identity)
        lim = m.Limits(
            max_message_bytes=self.limits.max_message_bytes,
            max_plan_bytes=self.limits.max_plan_bytes,
            max_frames=self.limits.max_frames,
            **self._caps(),
        )
        return m.Welcome(
            re=msg.id,
            session=self.session,
            worker=self.id,
            version=m.PROTOCOL_VERSION,
            providers=self.providers,
            opsets={"ai.onnx": ONNX_OPSET},
            limits=lim,
            identity=token,
        ), []

    def _caps(self) -> dict[str, int | float]:
        """The caps this worker holds clients to, for welcome.limits (PROTOCOL.md §8.1)."""
        store, caps = self.store, dict(self.announced)
        if store.max_bytes is not None:
            caps["max_store_bytes"] = store.max_bytes
        per_client = store.max_client_bytes if store.max_client_bytes is not None else store.max_bytes
        if per_client is not None:
            caps["max_client_store_bytes"] = per_client
        if self.max_plans is not None:
            caps["max_plans"] = self.max_plans
        return caps

    def _put(self, msg: m.Put, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        arrays = [self._tensor(t.dtype, t.shape, t.frame, buffers, f"put tensor {t.key!r}") for t in msg.tensors]
        self.store.check_writable(self._client, (t.key for t in msg.tensors))
        self.store.check_quota(
            self._client, ((t.key, a.nbytes) for t, a in zip(msg.tensors, arrays, strict=True)), f"put #{msg.id}"
        )
        for t, arr in zip(msg.tensors, arrays, strict=True):
            self.store.put(self._client, t.key, arr, t.tags)
        return m.Ok(re=msg.id, session=self.session), []

    def _get(self, msg: m.Get, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        entries = [self.store.entry(self._client, k) for k in msg.keys]
        hosts([e.array for e in entries])  # data the runner holds crosses to the host now, in one request
        arrays = self.store.take(self._client, msg.keys, msg.keep, self._release)
        return self._tensors_reply(msg.id, msg.keys, hosts(arrays))

    def _delete(self, msg: m.Delete, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        self.store.delete(self._client, msg.keys)
        return m.Ok(re=msg.id, session=self.session), []

    def _search(self, msg: m.Search, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, e) for k, e in self.store.search(self._client, msg.tags)]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _describe(self, msg: m.Describe, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, self.store.entry(self._client, k)) for k in msg.keys]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _register(self, msg: m.RegisterPlan, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        job = self._begin_register(msg, buffers)
        if isinstance(job, m.PlanInfo):
            return job, []
        ort_plan = OrtPlan(job.data, name=job.name, device=self.device, threads=self.threads)
        plan = self._add_plan(job, ort_plan)
        self._ort_plans[job.pid] = ort_plan
        return self._plan_info(msg.id, job.pid, plan), []

    def _add_plan(self, job: RegisterJob, ports: Ports) -> Plan:
        """Record a plan whose session was created (here or by the runner)."""
        plan = self.plans[job.pid] = Plan(job.name, job.data, ports)
        if job.any_rank:
            self._any_rank[job.pid] = job.any_rank
        self.flows[job.pid] = flow.analyze(job.data, [n for n, _, _ in ports.inputs], [n for n, _, _ in ports.outputs])
        self.holders.add(job.pid, self._client)
        log.info("registered plan %r (%s, %d bytes)", job.name, job.pid[:12], len(job.data))
        if ports.placement:
            log.warning(
                "plan %r (%s) runs on %s: the CPU nodes cost host-device copies",
                job.name,
                job.pid[:12],
                ports.placement,
            )
        if self.plans_dir is not None and any(e.private for _, e in self.store.own()):
            self._keep(job.pid, job.name, job.data)
        return plan

    def _begin_register(self, msg: m.RegisterPlan, buffers: list[memoryview]) -> RegisterJob | m.PlanInfo:
        frame = framing.frame_at(buffers, msg.frame, "register_plan.frame")
        data = bytes(frame)
        pid = plan_id(data)
        plan = self.plans.get(pid)
        if plan is not None:
            self.holders.add(pid, self._client)
            return self._plan_info(msg.id, pid, plan)
        if self.max_plans is not None and len(self.plans) >= self.max_plans:
            raise ProtocolError(
                "quota_exceeded",
                f"plan {msg.name or pid[:12]!r} not registered: the worker already holds {len(self.plans)} plans "
                "(its limit): unregister plans with delete_plan, or start plan-worker with a larger --max-plans",
            )
        try:
            summary = check_model(data, max_bytes=self.limits.max_plan_bytes)
        except PlanRejected as e:
            code = "too_large" if len(data) > self.limits.max_plan_bytes else e.code
            raise ProtocolError(code, f"plan {msg.name or pid[:12]!r} rejected: {e}") from None
        name = msg.name or summary.metadata_props.get("planwire.name", "") or pid[:12]
        return RegisterJob(msg, pid, name, data, summary.unknown_rank)

    def _cancel(self, msg: m.Cancel, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        # In process a run is over before the next request is read: nothing is ever queued or running.
        raise ProtocolError("bad_argument", f"cancel: no run #{msg.run} of this connection is queued or running")

    def _delete_plan(self, msg: m.DeletePlan, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        # A plan-worker's supervisor also tells its runner to drop the session (Sandbox.forget); the plan's
        # bytes stay while another client holds it, so the runner re-creates the session on its next run.
        if self.holders.remove(msg.plan, self._client):
            self._unload(msg.plan)
        return m.Ok(re=msg.id, session=self.session), []

    def _unload(self, pid: str) -> None:
        """Forget a plan nobody holds any more."""
        self._any_rank.pop(pid, None)
        self.flows.pop(pid, None)
        self._ort_plans.pop(pid, None)
        if self.plans.pop(pid, None) is not None:
            log.info("unregistered plan %r", pid[:12])

    def _free(self, owner: ClientId) -> None:
        """Free everything of an owner not seen for --idle-ttl."""
        n, nbytes = self.store.drop_client(owner)
        pids = self.holders.drop_owner(owner)
        if self.stats is not None:
            self.stats.forget(label(owner))
        for pid in pids:
            self._unload(pid)
        log.info(
            "client %s not seen for %.0f s (--idle-ttl): freed its %d tensors (%d bytes) and %d plans",
            label(owner),
            self.owners.idle_ttl or 0,
            n,
            nbytes,
            len(pids),
        )

    def _has_plan(self, msg: m.HasPlan, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        plan = self.plans.get(msg.plan)
        if plan is None or not self.holders.holds(msg.plan, self._client):
            return m.Missing(re=msg.id, session=self.session, plan=msg.plan), []
        return self._plan_info(msg.id, msg.plan, plan), []

    def _run(self, msg: m.Run, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        job = self._begin_run(msg, buffers)
        pid = job.msg.plan
        try:
            plan = self._ort_plans.get(pid)
            if plan is None:
                plan = self._ort_plans[pid] = OrtPlan(
                    job.plan.data, name=job.plan.name, device=self.device, threads=self.threads
                )
            results = plan.run(job.args, check=False)
        except ProtocolError as e:
            self._fail_outputs(msg, e)
            raise
        except Exception as e:  # onnxruntime's own errors already say what they are
            detail = e if isinstance(e, ort.capi.onnxruntime_pybind11_state.Fail) else f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
            error = ProtocolError("run_failed", f"plan {job.plan.name!r} failed on worker {self.id!r}: {detail}")
            if job.reads_private:  # its text may quote tensor values: keep the op, the node and the shapes
                log.info("plan %r failed on private data: %s", job.plan.name, clean(str(e)))
                error = ProtocolError("run_failed", flow.redacted(job.plan.name, self.id, e, job.args))
            self._fail_outputs(msg, error)
            raise error from None
        try:
            return self._end_run(job, results)
        except ProtocolError as e:  # e.g. quota_exceeded: the outputs were not stored
            self._fail_outputs(msg, e)
            raise

    def _begin_run(self, msg: m.Run, buffers: list[memoryview]) -> RunJob:
        # What the schema forbids is refused before anything changes (as any invalid header).
        if len(set(msg.outputs)) != len(msg.outputs):
            raise ProtocolError("invalid_message", f"run.outputs must be distinct keys, got {msg.outputs}")
        for i, arg in enumerate(msg.args):
            if (arg.ref is UNSET) == (arg.tensor is UNSET):
                raise ProtocolError("invalid_message", f"run.args[{i}] needs exactly one of 'ref', 'tensor'")
        self.store.check_writable(self._client, msg.outputs)  # forbidden: nothing recorded, the worker's data untouched
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
            self.store.fail(self._client, key, why)

    def _prepare(self, msg: m.Run, buffers: list[memoryview]) -> RunJob:
        plan = self.plans.get(msg.plan)
        if plan is None or not self.holders.holds(msg.plan, self._client):
            raise ProtocolError("unknown_plan", f"no plan {msg.plan[:12]!r} on worker {self.id!r}: register it first")
        n_out = len(plan.ports.outputs)
        if len(msg.outputs) != n_out:
            raise ProtocolError(
                "bad_argument",
                f"plan {plan.name!r} has {n_out} outputs: run.outputs needs {n_out} keys, got {msg.outputs}",
            )
        if msg.fetch and max(msg.fetch) >= n_out:
            raise ProtocolError("bad_argument", f"run.fetch {msg.fetch} out of range for {n_out} outputs")
        private_args: dict[int, Entry] = {}
        entries: list[Entry | None] = []
        args = []
        for i, a in enumerate(msg.args):
            if a.ref is not UNSET:
                entry = self.store.entry(self._client, a.ref)
                entries.append(entry)
                args.append(entry.array)
                if entry.private:
                    private_args[i] = entry
            else:
                t = a.tensor
                entries.append(None)
                args.append(self._tensor(t.dtype, t.shape, t.frame, buffers, f"run argument {i}"))  # type: ignore[union-attr]
        private = self.flows[msg.plan].private_outputs(list(private_args)) if private_args else frozenset()
        pending: dict = {}
        rows = 0
        if private:
            values = hosts(args) if self.releaser.policy is not None else args  # rules read argument values
            pending = self._pending(msg, plan, values, private_args, private)
            rows = min(e.rows for e in private_args.values())
        any_rank = self._any_rank.get(msg.plan) if self._any_rank else None
        if any_rank is None:
            plan.ports.check(args)
        else:
            self._check_any_rank(plan.ports, args, any_rank)
        return RunJob(
            msg, plan, args, entries, reads_private=bool(private_args), private=private, pending=pending, rows=rows
        )

    def _end_run(self, job: RunJob, results: list[np.ndarray]) -> tuple[m._Message, list[Frame]]:
        msg, private, pending, rows = job.msg, job.private, job.pending, job.rows
        sizes = ((k, r.nbytes) for k, r in zip(msg.outputs, results, strict=True))
        self.store.check_quota(self._client, sizes, f"outputs of run #{msg.id}")
        for i, (key, arr) in enumerate(zip(msg.outputs, results, strict=True)):
            self.store.put(self._client, key, arr, private=i in private, pending=pending.get(i), rows=rows)
        fetch = msg.fetch
        if msg.inline_max:
            fetch = [
                *fetch,
                *(
                    i
                    for i, r in enumerate(results)
                    if r.nbytes <= msg.inline_max
                    and i not in fetch
                    and (i not in private or i in pending and pending[i].ready)
                ),
            ]
        if not fetch:
            return m.Ok(re=msg.id, session=self.session), []
        keys = [msg.outputs[i] for i in fetch]
        values = hosts([results[i] for i in fetch])
        if private:  # a private output leaves only as its release (the owner's policy): read through it
            values = hosts(self.store.readable(self._client, keys, self._release)[1])
        return self._tensors_reply(msg.id, keys, values)

    def _pending(
        self, msg: m.Run, plan: Plan, args: list[np.ndarray], private_args: dict[int, Entry], private: frozenset
    ) -> dict:
        """The releases the owner's policy allows for a run on private data; refuses a fetch of any other
        private output before anything runs."""
        names_in, names_out = [n for n, _, _ in plan.ports.inputs], [n for n, _, _ in plan.ports.outputs]
        pending = self.releaser.prepare(
            msg.plan, plan.name, names_in, names_out, args, private_args, private, self._client
        )
        held = [i for i in msg.fetch if i in private and (i not in pending or not pending[i].ready)]
        if held:
            keys = [msg.outputs[i] for i in held]
            message = (
                f"run.fetch asks for {keys}, computed by plan {plan.name!r} from this worker's private data: such "
                "results are stored and may be used by later runs, but never leave the worker unless the data "
                "owner approves the plan (plan-worker --policy)"
            )
            rule = self.releaser.policy.rules.get(msg.plan) if self.releaser.policy is not None else None
            self.releaser.audit(
                "refused", self._client, rule, plan.name, [names_out[i] for i in held], [], reason=message
            )
            raise ProtocolError("private_data", message)
        return pending

    def _keep(self, pid: str, name: str, data: bytes) -> None:
        """Keep a plan a worker with private data received where its operator reviews it (plan-worker review)."""
        from planwire.worker.review import keep, prune

        try:
            keep(self.plans_dir, pid, data)  # type: ignore[arg-type]
        except OSError as e:
            log.warning("plan %r (%s) not kept in %s: %s", name, pid[:12], self.plans_dir, e)
            return
        if self.max_plans_dir_bytes is None:
            return
        policy = self.releaser.policy
        referenced = self.plans.keys() | (policy.rules.keys() if policy is not None else set())
        removed, total = prune(self.plans_dir, self.max_plans_dir_bytes, referenced)  # type: ignore[arg-type]
        for gone, size in removed:
            log.info(
                "removed kept plan %s (%d bytes) from %s: over --max-plans-dir-mb, least recently received and "
                "neither registered nor approved",
                gone[:12],
                size,
                self.plans_dir,
            )
        if total > self.max_plans_dir_bytes:
            log.warning(
                "kept plans in %s take %d bytes, over --max-plans-dir-mb (%d bytes): the rest are registered now or "
                "approved by the policy, and are kept",
                self.plans_dir,
                total,
                self.max_plans_dir_bytes,
            )

    def _release(self, key: str, entry: Entry) -> np.ndarray:
        if isinstance(entry.array, Resident):  # the release reads the value: its host copy
            entry = dataclasses.replace(entry, array=entry.array.materialize())
        return self.releaser.release(self._client, key, entry)

    # -- helpers ----------------------------------------------------------------------------------

    def _tensor(self, dtype: str, shape: list[int], index: int, buffers: list[memoryview], what: str) -> np.ndarray:
        return codec.from_frame(dtype, shape, framing.frame_at(buffers, index, what), what=what)

    def _tensors_reply(self, rid: int, keys: list[str], arrays: list[np.ndarray]) -> tuple[m._Message, list[Frame]]:
        out, frames = [], []
        for key, arr in zip(keys, arrays, strict=True):
            wire, shape, buf = codec.to_frame(arr)
            out.append(m.KeyedTensor(key=key, dtype=wire, shape=shape, frame=len(frames)))
            frames.append(buf)
        return m.Tensors(re=rid, session=self.session, tensors=out), frames

    @staticmethod
    def _check_any_rank(plan: Ports, args: Sequence[np.ndarray], any_rank: frozenset[str]) -> None:
        """Ports.check for a plan with inputs of unknown rank (which onnxruntime reports as shape
        ``[]``): those take any shape, and only their dtype is checked."""
        if len(args) != len(plan.inputs):
            plan.check(args)  # names the count
        for i, (arr, (name, wire, shape)) in enumerate(zip(args, plan.inputs, strict=True)):
            what = f"plan {plan.name!r} argument {i} ({name!r})"
            if arr.dtype != dtypes.to_numpy(wire):
                raise ProtocolError("bad_argument", f"{what}: expected dtype {dtypes.human(wire)}, got {arr.dtype}")
            if name not in any_rank and (
                len(shape) != arr.ndim
                or any(isinstance(w, int) and w != g for w, g in zip(shape, arr.shape, strict=True))
            ):
                want = "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"
                raise ProtocolError("bad_argument", f"{what}: expected shape {want}, got {list(arr.shape)}")

    def _plan_info(self, rid: int, pid: str, plan: Plan) -> m.PlanInfo:
        any_rank = self._any_rank.get(pid, frozenset())

        def ports(items: list) -> list[m.Port]:
            return [
                m.Port(
                    name=n,
                    dtype=t,
                    shape=None if n in any_rank else [d if isinstance(d, int) else (d or None) for d in s],
                )
                for n, t, s in items
            ]

        return m.PlanInfo(
            re=rid,
            session=self.session,
            plan=pid,
            inputs=ports(plan.ports.inputs),
            outputs=ports(plan.ports.outputs),
            placement=plan.ports.placement,
        )

    @staticmethod
    def _info(key: str, entry) -> m.TensorInfo:
        return m.TensorInfo(
            key=key,
            dtype=codec.dtypes.to_wire(entry.array.dtype),
            shape=list(entry.array.shape),
            tags=list(entry.tags),
            private=entry.private,
            owner="worker" if entry.worker else "client",
            release=entry.pending.how.how if isinstance(entry.pending, Pending) else UNSET,
        )
