"""Service: what a worker does with each request. The same object serves in-process and over ZeroMQ.

``handle(frames, client) -> frames`` is the whole contract: bytes in, bytes out, through the protocol's
Session codec either way, so every in-process (VirtualWorker) test also exercises the wire format.
``client`` (a CURVE public key or a connection's routing id) is who the request counts against: store
quotas and the owner of what it stores. Every answer, wherever it is completed, is logged by client and
plan when refused and reported once to ``stats`` (the operator's view) when that is set.

The handlers of plans (worker/registry.py), of runs (worker/runs.py) and of tensors (worker/tensors.py) are
parts of the Service, mixed in; this module holds its state, its entry points and the handlers of the
conversation (hello, ping, cancel) and of a client that went (--idle-ttl).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from planwire.transport import dtypes, framing
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.framing import DEFAULT_LIMITS, Frame, Limits
from planwire.worker import flow
from planwire.worker.device import Device
from planwire.worker.jobs import Job, Origin, Plan, RegisterJob, RunJob
from planwire.worker.owners import DAY, Owners, PlanHolders, label
from planwire.worker.peers import clean, peer_of
from planwire.worker.policy import Policy
from planwire.worker.registry import PlanRegistry
from planwire.worker.release import Releaser
from planwire.worker.runs import RunPath
from planwire.worker.runtime import OrtPlan, Signature
from planwire.worker.store import ClientId, Entry, Store
from planwire.worker.tensors import TensorHandlers

if TYPE_CHECKING:
    from planwire.worker.stats import Stats

log = logging.getLogger("planwire.worker")

# Opsets of the ONNX default domain this worker's onnxruntime accepts (reported in welcome).
ONNX_OPSET = 23


class Service(PlanRegistry, RunPath, TensorHandlers):
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
        nchwc: bool = True,
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
        self.nchwc = nchwc  # a plan's eligible Convs run as onnxruntime's NCHWc kernels (worker/nchwc.py)
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
        self.unloaded: list[Callable[[str], None]] = []  # told of each plan nobody holds any more (sessions go)
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
    # executed by the sandboxed runner (or, tiny and provably harmless, by the direct lane). Each
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
                self.stats.observe(origin.frames, msg, reply, time.perf_counter() - origin.t0, owner, origin.client)
            except Exception:
                log.exception("stats of request #%d not recorded", reply.re)  # type: ignore[attr-defined]
        return framing.pack(reply, list(out))

    def _ran(self, job: RunJob, results: list, reply: m._Message, out: Sequence[Frame]) -> list[Frame]:
        """``reply`` of a run that stored its ``results``: observed as ``reply`` does, by the batched
        ``Stats.ran`` (the tiny path's: each output's bytes given, not looked up in the store)."""
        if self.stats is not None:
            origin = job.origin
            try:
                owner = self.owners.owner(origin.client)
                sizes = [r.nbytes for r in results]
                self.stats.ran(origin.frames, origin.client, owner, job.msg, time.perf_counter() - origin.t0, sizes)
            except Exception:
                log.exception("stats of request #%d not recorded", job.msg.id)
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
        ahead: Mapping[str, Entry] | None = None,
    ) -> Job | list[Frame]:
        """Validate a registration or run from ``client``: a Job to execute (it remembers its client and
        start), or the reply when there is nothing to run (already registered, or refused: a refused run's
        outputs are marked failed). ``ahead``: a run's arguments read in place of the stored ones (outputs of
        the run in flight it is chained behind, worker/chain.py). Never raises."""
        origin = Origin(frames, client)
        self._act_for(client)
        try:
            if isinstance(msg, m.RegisterPlan):
                job = self._begin_register(msg, buffers)
                if isinstance(job, m.PlanInfo):
                    return self.reply(origin, msg, job)
            else:
                job = self._begin_run(msg, buffers, ahead)
        except Exception as e:
            return self.refuse(msg.id, e, origin, msg)
        job.origin = origin
        return job

    def complete(self, job: Job, outcome: Signature | list[np.ndarray] | ProtocolError) -> list[Frame]:
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
            return self._ran(job, outcome, reply, out)  # type: ignore[arg-type]
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

    def _cancel(self, msg: m.Cancel, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        # In process a run is over before the next request is read: nothing is ever queued or running.
        raise ProtocolError("bad_argument", f"cancel: no run #{msg.run} of this connection is queued or running")

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
